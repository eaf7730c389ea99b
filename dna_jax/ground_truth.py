r"""A ground truth for ranking fidelity: stand-alone accuracies with a measured noise ceiling.

    python -m dna_jax.ground_truth --config configs/fmnist28_ground_truth.py \
        --workdir workdir/fmnist28_ground_truth --out results/fmnist28_ground_truth.json [--commit]

What it trains (issue 19, item 3):
  * a sample stratified over cost: `num_bins` bins whose centres are log-spaced between the
    `low_quantile` and `high_quantile` of the space's cost distribution; each bin holds
    `per_bin` DISTINCT architectures whose cost is within `bin_tolerance` (relative) of the
    centre, drawn at random among the pool members that qualify (so within a bin, size is
    controlled and only the architecture differs);
  * every architecture with seed 0, and `multi_seed_per_bin` architectures of every bin with
    `num_seeds` seeds (the seed-noise ceiling);
  * first the PILOT: `pilot_archs` of the multi-seed architectures (spread over the bins) x 2
    seeds; its seed SD and accuracy spread are written to the file, so a reader sees whether
    the training length met "seed SD <= spread / 4" before the rest was trained
    (`multi_seed_per_bin=0`, `pilot_archs=0`: seed 0 only, no pilot).

A CONFIRMATION sample (`sample.pick_seed >= 0`, `sample.exclude`): the pool and the bin centres
still come from `sample.seed` (the same bins as the file it confirms), but the architectures
of each bin are drawn with their own rng (`pick_seed`) among those the `exclude` file did not
sample, so its networks are new ones, fixed before any of them is trained, and the two files
can be analysed together (`fidelity.GroundTruth.merged`).

Order: the pilot, then seed 0 of the other architectures interleaved over the bins (so a
partial file is still stratified), then the extra seeds. Every run is one stand-alone training
with the classifier trainer (`dna_jax.retrain`, recipe `config.standalone`), checkpointed in
`<workdir>/runs/<arch>_s<seed>/`; a killed run resumes from its last checkpoint and finished
runs are never retrained. After each run the JSON file (`--out`) is rewritten atomically with
every result so far, and with `--commit` it is committed to git on its own (`git commit --only`),
so a session that ends keeps what was done and a fresh machine continues from the file: a run
whose result is already in the file is not trained again.

The file (format_version 1) holds: `sample` (the sampling record and every architecture with
its bin, encoding, block strings, params / macs / dna_flops / effective macs), `runs` (one
entry per (architecture, seed): test accuracy and loss, steps, seconds, the commit and machine
that trained it), `pilot` (its statistics), `recipe` (the stand-alone config), `command`.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from dna_jax import artifacts
from dna_jax import costs as costs_lib
from dna_jax import data as data_lib
from dna_jax import host_memory
from dna_jax import machine_info
from dna_jax import metrics as metrics_lib
from dna_jax import retrain as retrain_lib
from dna_jax import sharding as sharding_lib
from dna_jax.space import Arch, SearchSpace, get_space

FORMAT_VERSION = 1


# ---- configuration -----------------------------------------------------------------------------


def get_default_config() -> ml_collections.ConfigDict:
    """Every field a ground-truth run reads.

    Fields:
      space: the search-space preset.
      resolution: the images' size (the costs are counted there).
      sample: seed, pool_size, num_bins, per_bin, bin_tolerance (relative half-width of a bin
        around its centre), low_quantile / high_quantile (the range of bin centres, as
        quantiles of the pool's cost), cost (the cost the bins cut: `macs`); pick_seed (-1:
        the picks continue the pool's rng; >= 0: their own rng, for a confirmation sample
        in the same bins) and exclude ('' or the path of a ground-truth file made with the
        same seed / pool / bin fields, whose architectures are not picked again; needs
        pick_seed >= 0; a relative path is read from the current folder, else from the
        repository's root, and recorded as given). Both are left out of the file's record
        at their defaults, so files made before they existed still match.
      seeds: multi_seed_per_bin (architectures per bin trained with `num_seeds` seeds; 0:
        seed 0 only), num_seeds (>= 2; unused without multi-seed architectures), pilot_archs
        (multi-seed architectures trained first with 2 seeds; 0: no pilot).
      standalone: a full trainer config (dna_jax.retrain) for every run; its `seed` is set per
        run.
    """
    config = ml_collections.ConfigDict()
    config.space = "fmnist28"
    config.resolution = 28
    config.sample = dict(seed=0, pool_size=200_000, num_bins=6, per_bin=6, bin_tolerance=0.02,
                         low_quantile=0.0005, high_quantile=0.9995, cost="macs",
                         pick_seed=-1, exclude="")
    config.seeds = dict(multi_seed_per_bin=1, num_seeds=3, pilot_archs=4)
    config.standalone = retrain_lib.get_default_config()
    return config


def check_config(config: ml_collections.ConfigDict) -> None:
    """Fails early, naming the field."""
    get_space(config.space)
    s, d = config.sample, config.seeds
    if s.cost not in costs_lib.COST_NAMES:
        raise ValueError(f"config.sample.cost must be one of {costs_lib.COST_NAMES}, got {s.cost!r}")
    for name in ("num_bins", "per_bin", "pool_size"):
        if s[name] < 1:
            raise ValueError(f"config.sample.{name} must be >= 1, got {s[name]}")
    if not 0.0 < s.bin_tolerance < 0.5:
        raise ValueError(f"config.sample.bin_tolerance must be in (0, 0.5), got {s.bin_tolerance}")
    if not 0.0 <= s.low_quantile < s.high_quantile <= 1.0:
        raise ValueError("config.sample needs 0 <= low_quantile < high_quantile <= 1, got "
                         f"{s.low_quantile}, {s.high_quantile}")
    if d.num_seeds < 2 or not 0 <= d.multi_seed_per_bin <= s.per_bin:
        raise ValueError("config.seeds: num_seeds must be >= 2 and multi_seed_per_bin in "
                         f"0..per_bin, got {d.num_seeds}, {d.multi_seed_per_bin}")
    if not 0 <= d.pilot_archs <= d.multi_seed_per_bin * s.num_bins:
        raise ValueError(f"config.seeds.pilot_archs={d.pilot_archs} must be in 0..the multi-seed "
                         f"architectures ({d.multi_seed_per_bin} x {s.num_bins} bins)")
    if config.resolution < 8:
        raise ValueError(f"config.resolution must be >= 8, got {config.resolution}")
    if s.pick_seed < -1:
        raise ValueError(f"config.sample.pick_seed must be -1 (the pool's rng) or >= 0, got "
                         f"{s.pick_seed}")
    if s.exclude:
        if s.pick_seed < 0:
            raise ValueError(f"config.sample.exclude={s.exclude!r} needs config.sample.pick_seed "
                             ">= 0 (with -1 the picks are the excluded file's own)")
        _excluded_file(config)


# The fields that define the pool and the bins: a confirmation sample shares them with the
# file it excludes (same bins, and the excluded architectures are the pool's).
BIN_FIELDS = ("seed", "pool_size", "num_bins", "bin_tolerance", "low_quantile", "high_quantile",
              "cost")


def _exclude_path(path: str) -> str:
    """`path` as given if it exists (absolute or from the current folder), else from the
    repository's root (configs name it relative to the root; the record keeps it as given)."""
    if os.path.isabs(path) or os.path.exists(path):
        return path
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(root, path)


def _excluded_file(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The `config.sample.exclude` file, checked to share this config's space, resolution and
    bin-defining fields (BIN_FIELDS); a ValueError names the field otherwise."""
    s = config.sample
    path = _exclude_path(s.exclude)
    if not os.path.isfile(path):
        raise ValueError(f"config.sample.exclude={s.exclude!r}: no such file")
    try:
        data = load_file(path)
        record, archs = data["sample"]["record"], data["sample"]["archs"]
        missing = [k for a in archs for k in ("bin", "bin_centre", "blocks") if k not in a]
        if missing:
            raise KeyError(f"sample.archs[*].{missing[0]}")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"config.sample.exclude={s.exclude!r} is not a ground-truth file "
                         f"({type(e).__name__}: {e})") from e
    ours = {"space": config.space, "resolution": config.resolution,
            **{name: s[name] for name in BIN_FIELDS}}
    for name, value in ours.items():
        if record.get(name) != value:
            field = name if name in ("space", "resolution") else f"sample.{name}"
            raise ValueError(f"config.sample.exclude={s.exclude!r} was made with {name}="
                             f"{record.get(name)!r}, this config has config.{field}={value!r}: "
                             "a confirmation sample needs the same space, resolution and bins")
    return data


# ---- the sample --------------------------------------------------------------------------------


def arch_costs(space: SearchSpace, arch: Arch, resolution: int, num_classes: int
               ) -> dict[str, int]:
    """params, macs, dna_flops and effective_macs (padding taps excluded) of a child network."""
    spec = space.to_network_spec(arch)
    out = costs_lib.network_costs(spec, resolution, num_classes).total.as_dict()
    out["effective_macs"] = costs_lib.effective_macs(spec, resolution, num_classes)
    return out


def cost_stratified_sample(space: SearchSpace, cfg: Any, resolution: int,
                           num_classes: int = 10) -> list[dict[str, Any]]:
    """Bins of near-equal-cost architectures (see the module docstring); deterministic.

    With `cfg.pick_seed >= 0` the pool and the centres are the same, the picks use their own
    rng and skip the architectures of the `cfg.exclude` file (whose bin centres must be these:
    `check_config` has checked its fields, this checks the sampler still agrees).

    Returns:
      [{'bin', 'bin_centre', 'arch': Arch, 'cost'}], bin-major, `per_bin` per bin.

    Raises:
      ValueError: a bin has fewer than `per_bin` distinct qualifying architectures (widen
        `bin_tolerance` or grow `pool_size`), or the excluded file's bins differ.
    """
    from dna_jax import ranking  # pylint: disable=import-outside-toplevel
    rng = np.random.default_rng(cfg.seed)
    blocks, first, block_costs = ranking.distinct_pool(space, cfg.pool_size, rng, resolution,
                                                       cfg.cost)
    block_costs = block_costs.astype(np.float64)
    fixed = costs_lib.fixed_costs(space, resolution, num_classes).as_dict()[cfg.cost]
    total = block_costs[first] + fixed
    low, high = np.quantile(total, [cfg.low_quantile, cfg.high_quantile])
    centres = np.geomspace(low, high, cfg.num_bins)
    pick_seed, exclude = cfg.get("pick_seed", -1), cfg.get("exclude", "")
    if exclude and pick_seed < 0:
        raise ValueError(f"config.sample.exclude={exclude!r} needs config.sample.pick_seed >= 0")
    if pick_seed >= 0:
        rng = np.random.default_rng(pick_seed)
    excluded: set[Arch] = set()
    if exclude:
        archs = load_file(_exclude_path(exclude))["sample"]["archs"]
        excluded = {Arch.of(a["blocks"]) for a in archs}
        for a in archs:
            if not np.isclose(a["bin_centre"], centres[a["bin"]], rtol=1e-9, atol=0.0):
                raise ValueError(f"config.sample.exclude={exclude!r}: bin {a['bin']} has centre "
                                 f"{a['bin_centre']!r}, this sampler {centres[a['bin']]!r} (the "
                                 "sampler changed?)")
    chosen: list[dict[str, Any]] = []
    for b, centre in enumerate(centres):
        inside = first[np.abs(total / centre - 1.0) <= cfg.bin_tolerance]
        skipped = 0
        if excluded:
            keep = np.asarray([Arch.of(block[i] for block in blocks) not in excluded
                               for i in inside], bool)
            inside, skipped = inside[keep], int((~keep).sum())
        if len(inside) < cfg.per_bin:
            raise ValueError(f"cost bin {b} (centre {centre:,.0f} {cfg.cost}) has {len(inside)} "
                             f"distinct architectures within {cfg.bin_tolerance:.0%} in a pool of "
                             f"{cfg.pool_size}"
                             + (f" ({skipped} more excluded)" if excluded else "")
                             + f", fewer than per_bin={cfg.per_bin}: raise "
                             "config.sample.bin_tolerance or pool_size")
        pick = rng.choice(inside, size=cfg.per_bin, replace=False)
        for i in pick:
            chosen.append({"bin": b, "bin_centre": float(centre),
                           "arch": Arch.of(block[i] for block in blocks),
                           "cost": float(block_costs[i] + fixed)})
    return chosen


def run_order(num_bins: int, per_bin: int, multi_seed_per_bin: int, num_seeds: int,
              pilot_archs: int) -> list[tuple[int, int]]:
    """(architecture index, seed) in training order: pilot, seed 0 interleaved, extra seeds.

    The multi-seed architectures are the first `multi_seed_per_bin` of each bin; the pilot
    takes `pilot_archs` of them spread over the bins (cheapest, dearest, between).
    """
    multi = [b * per_bin + j for j in range(multi_seed_per_bin) for b in range(num_bins)]
    pilot_bins = np.unique(np.round(np.linspace(0, len(multi) - 1, pilot_archs)).astype(int))
    pilot = [multi[i] for i in pilot_bins]
    order = [(a, s) for a in pilot for s in (0, 1)]
    done = set(order)
    for j in range(per_bin):
        for b in range(num_bins):
            item = (b * per_bin + j, 0)
            if item not in done:
                order.append(item)
                done.add(item)
    for s in range(1, num_seeds):
        for a in multi:
            if (a, s) not in done:
                order.append((a, s))
                done.add((a, s))
    return order


# ---- statistics of the noise -------------------------------------------------------------------


def seed_noise(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Seed-to-seed SD (pooled over architectures with >= 2 seeds) against the spread of the
    per-architecture mean accuracies (max - min, and the SD across architectures)."""
    by_arch: dict[int, list[float]] = {}
    for r in runs:
        by_arch.setdefault(r["arch"], []).append(r["test_accuracy"])
    multi = {a: v for a, v in by_arch.items() if len(v) >= 2}
    if not multi:
        return {"archs_with_seeds": 0}
    pooled_var = (sum(np.var(v, ddof=1) * (len(v) - 1) for v in multi.values())
                  / sum(len(v) - 1 for v in multi.values()))
    means = np.asarray([np.mean(v) for v in by_arch.values()])
    seed_sd = float(np.sqrt(pooled_var))
    spread = float(means.max() - means.min())
    return {"archs_with_seeds": len(multi), "seed_sd": seed_sd, "spread": spread,
            "arch_sd": float(means.std(ddof=1)) if len(means) > 1 else None,
            "sd_over_spread": seed_sd / spread if spread > 0 else None,
            "meets_quarter_rule": bool(spread > 0 and seed_sd <= spread / 4)}


# ---- the runs ----------------------------------------------------------------------------------


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True, cwd=os.path.dirname(__file__)).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> str:
    return f"{jax.devices()[0].device_kind} ({jax.default_backend()}); {machine_info.cpu_summary()}"


def standalone_config(config: ml_collections.ConfigDict, seed: int) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict(config.standalone.to_dict())
    cfg.seed = seed
    return cfg


def train_one(config: ml_collections.ConfigDict, space: SearchSpace, arch: Arch, index: int,
              seed: int, run_dir: str, train_data: data_lib.Dataset,
              eval_data: data_lib.Dataset, mesh: jax.sharding.Mesh) -> dict[str, Any]:
    """One stand-alone training of one architecture with one seed: the ranking benchmark's
    (`ranking.train_standalone`: resumes in `run_dir`, reuses its result.json), plus who and
    where."""
    from dna_jax import ranking  # pylint: disable=import-outside-toplevel
    run_config = ml_collections.ConfigDict({"standalone": standalone_config(config, seed)})
    result = ranking.train_standalone(run_config, space, arch, index, run_dir, train_data,
                                      eval_data, mesh)
    # One process trains many networks of different shapes: without this the heap that
    # host_memory keeps grew to 15 GB over the runs (fragmentation) and the OOM killer ended it.
    host_memory.release_free_memory()
    return {"arch": index, "seed": seed,
            **{k: result[k] for k in ("test_accuracy", "test_loss", "train_loss", "steps",
                                      "train_time_s", "wall_time_s")},
            "commit": _git_commit(), "machine": machine(),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}


class RunData:
    """The datasets of stand-alone runs, made on first use (a process that trains nothing
    reads no data): the eval split once, and the training stream per seed, because the data
    order follows the run's seed too (seed 0's stream is kept; another seed's is made for its
    run)."""

    def __init__(self, standalone: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
        self.cfg, self.mesh = standalone, mesh
        self._train0 = self._eval = None

    def _make(self, split: str, training: bool, seed: int) -> data_lib.Dataset:
        return data_lib.make_dataset(self.cfg.data, split, training=training, mesh=self.mesh,
                                     seed=seed)

    def eval(self) -> data_lib.Dataset:
        if self._eval is None:
            self._train0 = self._make(self.cfg.data.train_split, True, 0)
            self._eval = self._make(self.cfg.data.eval_split, False, 0)
        return self._eval

    def train(self, seed: int) -> data_lib.Dataset:
        self.eval()
        return self._train0 if seed == 0 else self._make(self.cfg.data.train_split, True, seed)


# Sample fields left out of the record at these values: files made before they existed match.
_RECORD_DEFAULTS = {"pick_seed": -1, "exclude": ""}


def _sample_record(config: ml_collections.ConfigDict) -> dict[str, Any]:
    sample = {k: v for k, v in config.sample.to_dict().items()
              if not (k in _RECORD_DEFAULTS and v == _RECORD_DEFAULTS[k])}
    return {"space": config.space, "resolution": config.resolution,
            **sample, **config.seeds.to_dict()}


def load_file(path: str) -> dict[str, Any] | None:
    if not os.path.exists(path):
        return None
    data = artifacts.read_json(path)
    if data.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {data.get('format_version')}, expected "
                         f"{FORMAT_VERSION}")
    return data


def commit_file(path: str, message: str) -> None:
    """`git commit --only path` (retried while another git command holds the index lock)."""
    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.abspath(path))).stdout.strip()
    for attempt in range(10):
        add = subprocess.run(["git", "add", "--", os.path.abspath(path)], cwd=root,
                             capture_output=True, text=True)
        done = add.returncode == 0 and subprocess.run(
            ["git", "commit", "-q", "--only", "-m", message, "--", os.path.abspath(path)],
            cwd=root, capture_output=True, text=True).returncode == 0
        if done:
            return
        time.sleep(2 + 3 * attempt)
    logging.warning("could not commit %s (git busy or nothing changed)", path)


def new_file(config: ml_collections.ConfigDict, space: SearchSpace,
             sample: Sequence[dict[str, Any]], order: Sequence[tuple[int, int]],
             command: str = "") -> dict[str, Any]:
    """The file before any run: the record, the sample with its costs, the order."""
    num_classes = 10
    return {"format_version": FORMAT_VERSION,
            "description": ("stand-alone test accuracies of architectures of the "
                            f"{space.name!r} space, stratified over {config.sample.cost}, "
                            "for rating fidelity (dna_jax.ground_truth)"),
            "command": command, "recipe": artifacts.to_jsonable(config.standalone.to_dict()),
            "sample": {"record": artifacts.to_jsonable(_sample_record(config)), "archs": [
                {"index": i, "bin": s["bin"], "bin_centre": s["bin_centre"],
                 "blocks": [list(b) for b in s["arch"].blocks],
                 "block_strings": space.to_network_spec(s["arch"]).to_strings(),
                 **arch_costs(space, s["arch"], config.resolution, num_classes)}
                for i, s in enumerate(sample)]},
            "order": [list(o) for o in order], "runs": [], "pilot": {}}


def run_ground_truth(config: ml_collections.ConfigDict, workdir: str, out: str,
                     commit: bool = False, max_runs: int = 0,
                     command: str = "") -> dict[str, Any]:
    """Trains what the file does not hold yet, in order; returns the file's content."""
    check_config(config)
    space = get_space(config.space)
    workdir, out = os.path.abspath(workdir), os.path.abspath(out)
    sample = cost_stratified_sample(space, config.sample, config.resolution)
    order = run_order(config.sample.num_bins, config.sample.per_bin,
                      config.seeds.multi_seed_per_bin, config.seeds.num_seeds,
                      config.seeds.pilot_archs)
    recipe = artifacts.to_jsonable(config.standalone.to_dict())
    record = _sample_record(config)
    data = load_file(out)
    if data is not None and (data["sample"]["record"] != artifacts.to_jsonable(record)
                             or data["recipe"] != recipe):
        raise ValueError(f"{out} was made by another config "
                         f"({artifacts.config_changes(data['sample']['record'], record)}; recipe "
                         f"{'same' if data['recipe'] == recipe else 'changed'}): use another --out")
    if data is not None and [a["blocks"] for a in data["sample"]["archs"]] != [
            [list(b) for b in s["arch"].blocks] for s in sample]:
        raise ValueError(f"{out} holds other architectures than this code samples from the same "
                         "record (the sampler changed?): use another --out")
    if data is None:
        data = new_file(config, space, sample, order, command)
    done = {(r["arch"], r["seed"]) for r in data["runs"]}
    pilot_items = order[:2 * config.seeds.pilot_archs]
    mesh = sharding_lib.mesh_from_config(config.standalone.mesh)
    run_data = RunData(config.standalone, mesh)
    trained = 0
    for index, seed in order:
        if (index, seed) in done:
            continue
        if max_runs and trained >= max_runs:
            break
        arch = sample[index]["arch"]
        logging.info("ground truth: architecture %d (bin %d) seed %d: %s", index,
                     sample[index]["bin"], seed, arch)
        eval_data = run_data.eval()
        result = train_one(config, space, arch, index, seed,
                           os.path.join(workdir, "runs", f"arch{index:03d}_s{seed}"),
                           run_data.train(seed), eval_data, mesh)
        data["runs"].append(result)
        done.add((index, seed))
        trained += 1
        if pilot_items and all(item in done for item in pilot_items) and not data["pilot"]:
            data["pilot"] = {"runs": [list(i) for i in pilot_items],
                             **seed_noise([r for r in data["runs"]
                                           if (r["arch"], r["seed"]) in set(pilot_items)])}
            logging.info("ground truth pilot: %s", data["pilot"])
        data["noise"] = seed_noise(data["runs"])
        data["progress"] = {"runs_done": len(data["runs"]), "runs_planned": len(order)}
        if jax.process_index() == 0:
            artifacts.write_json(out, data)
            if commit:
                commit_file(out, f"ground truth: arch {index} seed {seed} "
                                 f"({len(data['runs'])}/{len(order)} runs, test accuracy "
                                 f"{result['test_accuracy']:.4f})")
    return data


# ---- command line ------------------------------------------------------------------------------


def main(argv: Sequence[str]) -> None:
    from absl import flags  # pylint: disable=import-outside-toplevel
    from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel

    if len(argv) > 1:
        raise ValueError(f"unexpected arguments: {' '.join(argv[1:])}")
    absl_logging.set_verbosity(absl_logging.INFO)
    f = flags.FLAGS
    data = run_ground_truth(f.config, f.workdir, f.out, commit=f.commit, max_runs=f.max_runs,
                            command=" ".join(sys.argv))
    print(metrics_lib.final_line({"runs_done": len(data["runs"]),
                                  "runs_planned": len(data["order"]),
                                  "pilot": data.get("pilot"), "noise": data.get("noise"),
                                  "out": os.path.abspath(f.out)}), flush=True)


def run(argv: Sequence[str] | None = None) -> None:
    """python -m dna_jax.ground_truth --config ... --workdir ... --out ..."""
    from absl import app, flags  # pylint: disable=import-outside-toplevel
    from ml_collections import config_flags  # pylint: disable=import-outside-toplevel

    config_flags.DEFINE_config_file("config", None, "Ground-truth config (file.py[:arg]).",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Checkpoints of the runs (not committed).")
    flags.DEFINE_string("out", None, "The versioned JSON file of results (commit it).")
    flags.DEFINE_bool("commit", False, "git-commit the JSON file after every finished run.")
    flags.DEFINE_integer("max_runs", 0, "Stop after this many new runs (0 = all).")
    flags.mark_flags_as_required(["config", "workdir", "out"])
    host_memory.keep_freed_memory()  # before JAX starts its CPU threads
    app.run(main, argv=sys.argv if argv is None else ["dna_jax.ground_truth", *argv])


if __name__ == "__main__":
    run()
