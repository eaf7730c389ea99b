"""Export a searched architecture: `arch.json`, block strings and a stand-alone child network.

The search hands over an `Arch` (or a `SearchResult`); the export writes what retraining and
deployment need, in open formats, into one folder:

  arch.json         `Arch.to_json(space)`: op indices per block, op names, timm block strings
  variables/        Orbax checkpoint of the child network's {'params', 'batch_stats'}
  inheritance.json  which variable leaves came from the supernet and why the others did not
  model.tflite, model_int8.tflite, model.stablehlo
                    with `deploy_options` (`dna-jax export --format tflite|stablehlo|all`):
                    the child network as deployable files (dna_jax.deploy, which documents
                    their calling convention), batch fixed (`--batch`, default 1)
  export.json       the summary (written last: its presence marks a complete export); under
                    `deploy` each deploy file's SHA-256, size and input shape, its parity with
                    the Flax model and the TFLite latency

Everything is verified when read back (`load_exported`): export.json is sealed (its `sha256`
field, dna_jax.artifacts.sealed), it records the SHA-256 of arch.json (`arch_sha256`) and of
every deploy file, and the variables' files have their checksums beside them
(`variables.sha256.json`, dna_jax.integrity). A file that fails is named with how to export it
again (in a pipeline workdir: which manifest to remove so the search stage, and nothing else,
runs again).

A trained network (a teacher checkpoint such as the pipeline's retrain/network) gets its
deploy files from `deploy_network` (`dna-jax export --network DIR`; the pipeline's deploy
stage): the files and a sealed deploy.json, verified by `load_deployed`.

Weights can be inherited from the supernet ({'block<k>': {'params', 'batch_stats'}}, see
`dna_jax.models.supernet`). Child layer i of a block is the supernet's `layers_<l>/ops_<j>`
(j = the op's branch position); block 0's `stem` and `first` are the child's stem and first
layer. Shapes do not always agree: the supernet's last layer of a block maps to the TEACHER's
width and a block's first layer reads the teacher's previous stage, while the child uses the
hidden widths throughout. Each leaf is copied only where its shape is exactly the child's;
everything else (and the head and classifier, which the supernet lacks) keeps its fresh
initialisation, and `inheritance.json` lists both sets.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
from typing import Any, Mapping, Sequence

import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from dna_jax import artifacts, costs, deploy, files, integrity, multihost, rating_table
from dna_jax.models.childnet import build_childnet
from dna_jax.models.efficientnet import EfficientNet
from dna_jax.models.initialize import init_variables
from dna_jax.models.layers import LayerConfig
from dna_jax.netspec import NetworkSpec
from dna_jax.search import SearchResult
from dna_jax.space import Arch, SearchSpace, get_space

PyTree = Any
EXPORT_FORMAT = "dna_jax.export/1"
ARCH_FILE = "arch.json"
SUMMARY_FILE = "export.json"
INHERITANCE_FILE = "inheritance.json"
VARIABLES_DIR = "variables"
COLLECTIONS = ("params", "batch_stats")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


# ---- the architecture ------------------------------------------------------------------------

def arch_of(space: SearchSpace, choice: Arch | SearchResult | Sequence[Sequence[int]]) -> Arch:
    """The `Arch` of a search result (or an Arch, or op-index lists), validated in `space`.

    Raises:
      ValueError: if it is not an architecture of `space` (names the block, layer, reason).
    """
    if isinstance(choice, SearchResult):
        arch = Arch.of(choice.encodings)
    elif isinstance(choice, Arch):
        arch = choice
    else:
        arch = Arch.of(choice)
    space.validate(arch)
    return arch


def ops_per_stage(space: SearchSpace, arch: Arch) -> dict[str, list[str]]:
    """Op names per searched block, skips included: {'block0': ['mb6_k3', ...], ...}."""
    return {block.name: [space.op_name(o) for o in ops]
            for block, ops in zip(space.blocks, arch.blocks)}


# ---- weight inheritance ----------------------------------------------------------------------

def supernet_sources(space: SearchSpace, arch: Arch) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Child module name -> (supernet block name, module path inside that block).

    Skip ops have no child layer; the head and classifier have no supernet counterpart.
    """
    sources = {"stem": (space.blocks[0].name, ("stem",)),
               "blocks_0": (space.blocks[0].name, ("first",))}
    child_layer = 1
    for b, ops in enumerate(arch.blocks):
        for l, op in enumerate(ops):
            if op == space.skip_index:
                continue
            branch = space.layer_choices(b, l).index(op)
            sources[f"blocks_{child_layer}"] = (space.blocks[b].name,
                                                (f"layers_{l}", f"ops_{branch}"))
            child_layer += 1
    return sources


def inherit_supernet_weights(space: SearchSpace, arch: Arch, child_variables: PyTree,
                             supernet_variables: Mapping[str, PyTree]
                             ) -> tuple[dict, dict[str, list]]:
    """Copies the supernet's weights wherever they fit the child exactly; the rest stays fresh.

    The unit of inheritance is a conv with its BatchNorm (`conv_pw`, `conv_dw`, `conv_pwl`,
    the stem), or an SE module: it is copied only if every leaf of it, parameters and
    BatchNorm statistics alike, exists in the supernet with the child's shape, so no
    BatchNorm is ever paired with a conv it was not trained with.

    Args:
      child_variables: freshly initialised {'params', 'batch_stats'} of the child network.
      supernet_variables: {'block<k>': {'params', 'batch_stats'}} for every block of `space`.

    Returns:
      (variables, report) with report = {'inherited': [leaf paths], 'fresh': [[leaf path,
      reason]]}; leaf paths read 'params/blocks_1/conv_pw/conv/kernel'.

    Raises:
      ValueError: if the supernet variables lack a block of the space.
    """
    missing = [b.name for b in space.blocks if b.name not in supernet_variables]
    if missing:
        raise ValueError(f"supernet variables have no {', '.join(map(repr, missing))} (they "
                         f"have: {', '.join(map(str, supernet_variables)) or 'nothing'}); "
                         f"expected {{'block<k>': {{'params', 'batch_stats'}}}} for every block")
    sources = supernet_sources(space, arch)
    flat = traverse_util.flatten_dict(jax.device_get(dict(child_variables)))
    found, problems = {}, {}
    for key, value in flat.items():
        unit = _unit(key)
        if key[1] not in sources:
            problems.setdefault(unit, "no supernet counterpart")
            continue
        block, prefix = sources[key[1]]
        source_key = (key[0], *prefix, *key[2:])
        source = _lookup(supernet_variables[block], source_key)
        if source is None:
            problems.setdefault(unit, f"{block} has no {'/'.join(source_key)}")
        elif source.shape != value.shape:
            problems.setdefault(unit, f"{'/'.join(key)} has shape {tuple(value.shape)}, "
                                      f"{block}/{'/'.join(source_key)} {tuple(source.shape)}")
        else:
            found[key] = np.asarray(source, dtype=value.dtype)
    report: dict[str, list] = {"inherited": [], "fresh": []}
    out = {}
    for key, value in flat.items():
        path = "/".join(key)
        if _unit(key) in problems:
            out[key] = value
            report["fresh"].append([path, problems[_unit(key)]])
        else:
            out[key] = found[key]
            report["inherited"].append(path)
    return traverse_util.unflatten_dict(out), report


def _unit(key: tuple[str, ...]) -> tuple[str, ...]:
    """The module a leaf belongs to for inheritance: ('blocks_3', 'conv_pw'), ('stem',)."""
    return key[1:3] if key[1].startswith("blocks_") and len(key) > 4 else key[1:2]


def _lookup(tree: Any, key: Sequence[str]) -> np.ndarray | None:
    for part in key:
        if not isinstance(tree, Mapping) or part not in tree:
            return None
        tree = tree[part]
    return None if isinstance(tree, Mapping) else np.asarray(jax.device_get(tree))


def load_supernet_variables(path: str) -> dict[str, PyTree]:
    """Supernet variables {'block<k>': {'params', 'batch_stats'}} from an Orbax checkpoint.

    Accepts a checkpoint of that tree, of a train state with 'params' and 'batch_stats' each
    {'block<k>': ...} (the distillation state), or a manager folder of numbered steps (the
    latest is used).

    Raises:
      ValueError: naming the folder if it is missing or holds neither layout.
    """
    path = files.absolute(path)
    if not files.isdir(path):
        raise ValueError(f"{path}: supernet checkpoint folder does not exist")
    from dna_jax.supernet import artifact as artifact_lib  # pylint: disable=import-outside-toplevel
    from dna_jax import teacher as teacher_lib  # pylint: disable=import-outside-toplevel
    if files.exists(os.path.join(path, teacher_lib.METADATA_FILE)) or files.exists(
            os.path.join(os.path.dirname(path), teacher_lib.METADATA_FILE)):
        raise ValueError(f"{path} is a teacher checkpoint ({teacher_lib.METADATA_FILE}), not a "
                         "supernet: give the distill stage's output, <workdir>/distill/supernet")
    if files.exists(os.path.join(path, artifact_lib.SUPERNET_MANIFEST)):
        path = os.path.join(path, artifact_lib.SUPERNET_ITEM)  # the pipeline's artifact folder
    steps = [int(name) for name in files.listdir(path) if name.isdigit()]
    if steps:
        path = os.path.join(path, str(max(steps)))
        for item in ("default", "state"):  # CheckpointManager item folders
            if files.isdir(os.path.join(path, item)):
                path = os.path.join(path, item)
                break
    try:
        tree = ocp.StandardCheckpointer().restore(path)
    except Exception as error:  # Orbax raises many types; all mean "unusable"
        raise ValueError(f"{path}: not a readable Orbax checkpoint ({error})") from error
    if isinstance(tree, Mapping) and "params" in tree and "batch_stats" in tree \
            and isinstance(tree["params"], Mapping) \
            and all(k.startswith("block") for k in tree["params"]):
        return {name: {"params": tree["params"][name],
                       "batch_stats": tree["batch_stats"].get(name, {})}
                for name in tree["params"]}
    if isinstance(tree, Mapping) and tree and all(
            isinstance(v, Mapping) and "params" in v for v in tree.values()):
        return dict(tree)
    keys = ", ".join(map(str, tree)) if isinstance(tree, Mapping) else type(tree).__name__
    if isinstance(tree, Mapping) and isinstance(tree.get("params"), Mapping):
        inner = ", ".join(list(map(str, tree["params"]))[:4])
        raise ValueError(f"{path}: these are one network's variables (params: {inner}, ...), "
                         "not a supernet's (params: block0, block1, ...): give the distill "
                         "stage's output, <workdir>/distill/supernet")
    raise ValueError(f"{path}: expected supernet variables {{'block<k>': {{'params', "
                     f"'batch_stats'}}}} or a state with 'params'/'batch_stats'; found: {keys}")


# ---- export and load -------------------------------------------------------------------------

def _layer_config_dict(config: LayerConfig) -> dict:
    data = dataclasses.asdict(config)
    data["dtype"] = jnp.dtype(config.dtype).name
    return data


def _layer_config_from(data: Mapping[str, Any]) -> LayerConfig:
    data = dict(data)
    data["dtype"] = _DTYPES[data.get("dtype", "float32")]
    return LayerConfig(**data)


def init_child(module: EfficientNet, resolution: int, seed: int) -> dict:
    """Fresh {'params', 'batch_stats'} of a child network for square RGB inputs."""
    image = jnp.zeros((1, resolution, resolution, 3), jnp.float32)
    variables = init_variables(module, jax.random.key(seed), image, train=False)
    return {c: variables.get(c, {}) for c in COLLECTIONS}


def _abstract_variables(module: EfficientNet, resolution: int) -> dict:
    """Shapes and dtypes of the child's variables, without computing them."""
    image = jax.ShapeDtypeStruct((1, resolution, resolution, 3), jnp.float32)
    shapes = jax.eval_shape(lambda x: module.init(jax.random.key(0), x, train=False), image)
    return {c: shapes.get(c, {}) for c in COLLECTIONS}


def export_winner(space: SearchSpace, arch: Arch | SearchResult, out_dir: str, *,
                  num_classes: int, resolution: int | None = None,
                  supernet_variables: Mapping[str, PyTree] | None = None, seed: int = 0,
                  layer_config: LayerConfig | None = None,
                  deploy_options: deploy.DeployOptions | None = None) -> dict:
    """Writes arch.json, the child network's variables (Orbax) and a summary to `out_dir`.

    Args:
      space: the search space.
      arch: the chosen architecture, or the SearchResult naming it (its costs are then
        checked against the exported network's; a mismatch is reported and logged).
      out_dir: the export folder (created; an earlier export there is replaced).
      num_classes: classifier outputs.
      resolution: input side length for the costs and the initialisation (default: the
        space's).
      supernet_variables: if given, weights are inherited where shapes match exactly.
      seed: initialisation seed of the fresh weights.
      layer_config: padding, BatchNorm and activation options of the child network.
      deploy_options: deployable files to write too (TFLite, StableHLO: dna_jax.deploy), of
        the exported variables, at `resolution`; None or no formats: none.

    Returns:
      The summary (also `export.json`): params, macs, dna_flops, ops per stage, block
      strings, inherited and fresh leaf counts, the search result if given, and under
      `deploy` the deploy files (SHA-256, size, input shape), their parity and latency.

    Raises:
      deploy.DeployError: TFLite asked for where TensorFlow is missing (before any write).
    """
    result = arch if isinstance(arch, SearchResult) else None
    arch = arch_of(space, arch)
    resolution = resolution or space.resolution
    formats = deploy_options.formats if deploy_options else ()
    problem = deploy.tensorflow_problem(formats, "--format stablehlo")
    if problem:
        raise deploy.DeployError(problem)
    layer_config = layer_config or LayerConfig()
    module = build_childnet(space, arch, num_classes, layer_config)
    variables = init_child(module, resolution, seed)
    report = {"inherited": [], "fresh": []}
    if supernet_variables is not None:
        variables, report = inherit_supernet_weights(space, arch, variables, supernet_variables)
    out_dir = files.absolute(out_dir)
    summary_path = os.path.join(out_dir, SUMMARY_FILE)
    if multihost.is_writer():  # small files: process 0 (dna_jax.multihost)
        files.makedirs(out_dir)
        if files.exists(summary_path):
            files.remove(summary_path)  # the old export is incomplete from here on
    multihost.barrier("export: the old summary removed")
    _save_variables(os.path.join(out_dir, VARIABLES_DIR), variables)  # every process (Orbax)
    summary = _summary(space, arch, module.spec, variables, report, num_classes, resolution,
                       seed, layer_config, result, supernet_variables is not None)
    if multihost.is_writer():
        _remove_deploy_files(out_dir)  # an earlier export's are not this network's
        if formats:
            fn = deploy.inference_fn(module, multihost.replicated_to_host(variables))
            shape = (deploy_options.batch_size, resolution, resolution, 3)
            summary["deploy"] = deploy.write_deploy_files(fn, shape, out_dir, deploy_options)
            summary["files"]["deploy"] = [r["file"] for r in summary["deploy"]["files"]]
        arch_text = arch.to_json(space) + "\n"
        artifacts.write_text(os.path.join(out_dir, ARCH_FILE), arch_text)
        artifacts.write_json(os.path.join(out_dir, INHERITANCE_FILE), report)
        integrity.record_sidecar(os.path.join(out_dir, VARIABLES_DIR))
        summary["arch_sha256"] = hashlib.sha256(arch_text.encode()).hexdigest()
        summary = artifacts.sealed(summary)
        artifacts.write_json(summary_path, summary)
    multihost.barrier("export written")
    return summary


def _remove_deploy_files(out_dir: str) -> None:
    for _, path, _ in deploy.file_records(out_dir, deploy.FORMATS):
        files.remove(path, missing_ok=True)


def _save_variables(path: str, variables: PyTree) -> None:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, multihost.replicated_to_host(variables), force=True)
    checkpointer.wait_until_finished()
    checkpointer.close()


def _summary(space, arch, spec: NetworkSpec, variables, report, num_classes, resolution, seed,
             layer_config, result, inherited) -> dict:
    total = costs.network_costs(spec, resolution, num_classes).total.as_dict()
    counted = sum(math.prod(np.shape(x)) for x in jax.tree.leaves(variables["params"]))
    summary = {
        "format": EXPORT_FORMAT, "space": space.name, "arch": [list(b) for b in arch.blocks],
        "ops": ops_per_stage(space, arch), "block_strings": spec.to_strings(),
        "stem_channels": spec.stem_channels, "stem_stride": spec.stem_stride,
        "head_channels": spec.head_channels, "num_classes": num_classes,
        "resolution": resolution, **total, "params_in_variables": int(counted),
        "layers": sum(spec.stage_depths), "from_supernet": inherited,
        "inherited_leaves": len(report["inherited"]), "fresh_leaves": len(report["fresh"]),
        "seed": seed, "layer_config": _layer_config_dict(layer_config),
        "files": {"arch": ARCH_FILE, "variables": VARIABLES_DIR,
                  "inheritance": INHERITANCE_FILE},
    }
    if result is not None:
        mismatch = {name: {"search": result.costs[name], "exported": total[name]}
                    for name in total if name in result.costs
                    and result.costs[name] != total[name]}
        if mismatch:
            logging.warning("export: search costs differ from the exported network's: %s "
                            "(were the fixed parts or the resolution different?)", mismatch)
        summary["search"] = result.to_dict()
        summary["search_costs_match"] = not mismatch
        summary["cost_mismatch"] = mismatch
    return summary


def load_exported(out_dir: str, space: SearchSpace | None = None
                  ) -> tuple[EfficientNet, dict, Arch]:
    """The exported (module, variables, arch) of `export_winner`.

    Args:
      out_dir: the export folder.
      space: the search space, if it is not a preset (the export names its space).

    Raises:
      ValueError: naming the folder if the export is missing, incomplete or inconsistent.
    """
    out_dir = files.absolute(out_dir)
    summary_path = os.path.join(out_dir, SUMMARY_FILE)
    if not files.exists(summary_path):
        raise ExportError(f"{out_dir}: no complete export ({SUMMARY_FILE} is missing); "
                          f"{redo_hint(out_dir)}")
    try:
        summary = artifacts.read_json(summary_path)
    except (ValueError, UnicodeDecodeError) as error:
        raise ExportError(f"{summary_path} is not readable JSON ({error}); "
                          f"{redo_hint(out_dir)}") from error
    problem = artifacts.seal_problem(summary)
    if problem:
        raise ExportError(f"{summary_path} is corrupt: {problem}; {redo_hint(out_dir)}")
    if summary.get("format") != EXPORT_FORMAT:
        raise ExportError(f"{summary_path}: format {summary.get('format')!r}, expected "
                          f"{EXPORT_FORMAT!r}; {redo_hint(out_dir)}")
    arch_path = os.path.join(out_dir, ARCH_FILE)
    try:
        arch_bytes = files.read_bytes(arch_path)
        recorded = summary.get("arch_sha256")
        if recorded is None:
            logging.warning("%s has no recorded SHA-256 (exported by an older dna_jax): read "
                            "unverified.", arch_path)
        elif hashlib.sha256(arch_bytes).hexdigest() != recorded:
            raise ExportError(f"{arch_path} is corrupt: its SHA-256 "
                              f"{hashlib.sha256(arch_bytes).hexdigest()[:12]}... differs from "
                              f"the {recorded[:12]}... recorded in {SUMMARY_FILE}; "
                              f"{redo_hint(out_dir)}")
        arch = Arch.from_json(arch_bytes.decode("utf-8"))
    except ExportError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ExportError(f"{arch_path} is not a readable architecture "
                          f"({type(error).__name__}: {error}); {redo_hint(out_dir)}") from error
    problems = deploy.verify_deploy_files(out_dir, summary.get("deploy"))
    if problems:
        raise ExportError(f"{'; '.join(problems)} (the deploy files recorded in "
                          f"{SUMMARY_FILE}); {redo_hint(out_dir)}")
    space = space or get_space(summary["space"])
    config = _layer_config_from(summary["layer_config"])
    module = build_childnet(space, arch, summary["num_classes"], config)
    if module.spec.to_strings() != summary["block_strings"]:
        raise ExportError(f"{out_dir}: the block strings of {ARCH_FILE} in space "
                          f"{space.name!r} differ from the exported network's; "
                          f"{redo_hint(out_dir)}")
    target = _abstract_variables(module, summary["resolution"])
    variables_dir = os.path.join(out_dir, VARIABLES_DIR)
    try:
        integrity.verify(variables_dir, integrity.read_sidecar(variables_dir),
                         "the exported child network's variables")
    except integrity.IntegrityError as error:
        raise ExportError(f"{error}; {redo_hint(out_dir)}") from error
    try:
        checkpointer = ocp.StandardCheckpointer()
        variables = checkpointer.restore(variables_dir, target)
    except Exception as error:  # Orbax raises many types; all mean "unusable"
        raise ExportError(f"{variables_dir}: cannot restore the child network's variables "
                          f"({type(error).__name__}: {error}); {redo_hint(out_dir)}") from error
    return module, variables, arch


# ---- deploy files of a trained network -------------------------------------------------------

DEPLOY_FILE = "deploy.json"


def input_channels(variables: Mapping[str, Any]) -> int:
    """The image channels a network's stem reads (3 when it cannot tell)."""
    kernel = _lookup(variables, ("params", "stem", "conv", "kernel"))
    return int(kernel.shape[2]) if kernel is not None else 3


def deploy_network(network_dir: str, out_dir: str, options: deploy.DeployOptions, *,
                   resolution: int = 0, preprocessing: Mapping[str, Any] | None = None,
                   redo: str | None = None) -> dict:
    """Deploy files of a trained network (a teacher checkpoint, e.g. the pipeline's
    retrain/network) in `out_dir`, described in a sealed `deploy.json` (written last).

    Every process loads the network (like any reader of a checkpoint); process 0 converts,
    checks, times and writes (dna_jax.multihost), the others wait at a barrier.

    Args:
      network_dir: the teacher checkpoint (dna_jax.teacher: teacher.json + variables/).
      out_dir: the folder of the deploy files and deploy.json (created; earlier deploy files
        there are removed first).
      options: formats, batch, threads, timing repeats, parity images.
      resolution: input side length; 0: the checkpoint's `preprocessing.resolution`.
      preprocessing: how inputs are normalised (recorded for the deployer), if known.
      redo: how to ask for StableHLO only, named by the TensorFlow error.

    Returns:
      deploy.json's content on process 0 ({} elsewhere): the network (name, block strings,
      costs), its source (path, teacher.json's SHA-256) and `write_deploy_files`' description.

    Raises:
      deploy.DeployError: TFLite without TensorFlow; ValueError: no resolution known.
    """
    from dna_jax import teacher as teacher_lib  # pylint: disable=import-outside-toplevel

    problem = deploy.tensorflow_problem(options.formats, redo or "--format stablehlo")
    if problem:
        raise deploy.DeployError(problem)
    network_dir, out_dir = files.absolute(network_dir), files.absolute(out_dir)
    metadata = teacher_lib.read_teacher_metadata(network_dir)
    resolution = resolution or int(metadata.get("preprocessing", {}).get("resolution") or 0)
    if not resolution:
        raise ValueError(f"{network_dir}: its teacher.json records no input resolution; give "
                         "one (--resolution)")
    module, variables = teacher_lib.load_teacher(str(metadata["model"]), network_dir)
    variables = multihost.replicated_to_host(variables)
    content: dict = {}
    if multihost.is_writer():
        files.makedirs(out_dir)
        files.remove(os.path.join(out_dir, DEPLOY_FILE), missing_ok=True)
        _remove_deploy_files(out_dir)
        shape = (options.batch_size, resolution, resolution, input_channels(variables))
        description = deploy.write_deploy_files(deploy.inference_fn(module, variables), shape,
                                                out_dir, options)
        total = costs.network_costs(module.spec, resolution, module.num_classes).total
        metadata_text = files.read_bytes(os.path.join(network_dir, teacher_lib.METADATA_FILE))
        content = artifacts.sealed({
            **description,
            "network": {"name": metadata["model"], "block_strings": module.spec.to_strings(),
                        "num_classes": int(module.num_classes), "resolution": resolution,
                        **total.as_dict()},
            "source": {"network_dir": network_dir,
                       "teacher_json_sha256": hashlib.sha256(metadata_text).hexdigest()},
            "preprocessing": dict(preprocessing or {}),
        })
        artifacts.write_json(os.path.join(out_dir, DEPLOY_FILE), content)
    multihost.barrier("deploy files written")
    return content


def load_deployed(out_dir: str, redo: str | None = None) -> dict:
    """deploy.json of `deploy_network`, verified: its seal and every file's SHA-256.

    Raises:
      deploy.DeployError: naming the file that fails and `redo` (how to make it again).
    """
    out_dir = files.absolute(out_dir)
    redo = redo or deploy_redo_hint(out_dir)
    path = os.path.join(out_dir, DEPLOY_FILE)
    try:
        content = artifacts.read_json(path)
    except FileNotFoundError as error:
        raise deploy.DeployError(f"{path} is missing (no complete deploy files in {out_dir}); "
                                 f"{redo}") from error
    except (ValueError, UnicodeDecodeError) as error:
        raise deploy.DeployError(f"{path} is not readable JSON ({error}); {redo}") from error
    problem = artifacts.seal_problem(content)
    if problem:
        raise deploy.DeployError(f"{path} is corrupt: {problem}; {redo}")
    problems = deploy.verify_deploy_files(out_dir, content)
    if problems:
        raise deploy.DeployError(f"{'; '.join(problems)} (recorded in {DEPLOY_FILE}); {redo}")
    return content


def deploy_redo_hint(out_dir: str) -> str:
    """How to make a deploy folder again: in a pipeline workdir (`<workdir>/deploy`), remove
    its manifest so that the deploy stage alone runs again."""
    manifest = os.path.join(files.absolute(out_dir), artifacts.MANIFEST)
    if files.exists(manifest):
        return (f"remove {manifest} (nothing else) and rerun the same command: the deploy "
                "stage then runs again and rewrites the files; no other stage reruns")
    return "write them again (dna-jax export --network ... --format ...)"


class ExportError(ValueError):
    """An export is missing, damaged or inconsistent; the message names the file and the fix."""


def redo_hint(out_dir: str) -> str:
    """How to make an export again. In a pipeline workdir (`<workdir>/search/winner`) the
    search stage is skipped while its manifest says complete: removing that manifest, and
    nothing else, makes the search (only it: later stages keep theirs) run and export again."""
    manifest = os.path.join(os.path.dirname(files.absolute(out_dir)), artifacts.MANIFEST)
    if files.exists(manifest):
        return (f"remove {manifest} (nothing else) and rerun the same command: the search "
                "stage then runs again and rewrites the export; the stages after it keep their "
                "results")
    return "export it again (dna-jax export)"


# ---- command line: `dna-jax export` ----------------------------------------------------------

def _parser():
    from dna_jax.cli import ArgumentParser, nonnegative_int, positive_int

    parser = ArgumentParser(
        prog="dna-jax export",
        description="Search the rating tables under budgets (or read an arch.json) and export "
                    "the winner: arch.json, block strings, an Orbax checkpoint of the child, "
                    "and with --format deployable files (TFLite, StableHLO); or write the "
                    "deployable files of a trained network (--network).")
    parser.add_argument("--space", help="search-space preset name (with --table-dir, --arch)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--table-dir", help="folder of <block>.npz rating tables")
    source.add_argument("--arch", help="an arch.json (or any JSON with 'blocks')")
    source.add_argument("--network", help="a trained network (teacher checkpoint: "
                        "teacher.json + variables/), e.g. a pipeline's <workdir>/retrain/network: "
                        "writes its deployable files and deploy.json (default --out: 'deploy' "
                        "beside it)")
    parser.add_argument("--budget", action="append", default=[],
                        help="NAME=HIGH or NAME=LOW:HIGH on whole-network costs, e.g. "
                             "macs=460M (repeat for two costs)")
    parser.add_argument("--combine", default="sum", choices=("sum", "product"))
    parser.add_argument("--standardize", action="store_true")
    parser.add_argument("--out", help="export folder (default: 'export' beside the source)")
    parser.add_argument("--num-classes", type=positive_int, default=1000)
    parser.add_argument("--resolution", type=nonnegative_int, default=0,
                        help="input side length in pixels (default 0: the space's, or the "
                             "network's recorded one)")
    parser.add_argument("--supernet", help="the supernet whose weights the child inherits: "
                        "a pipeline's <workdir>/distill/supernet (or its variables/ folder), "
                        "or a distillation checkpoint folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", default=None,
                        help="deployable files: tflite (model.tflite float32 and "
                             "model_int8.tflite dynamic-range int8), stablehlo "
                             "(model.stablehlo), all, or none (default; --network: all); "
                             "comma-separated")
    parser.add_argument("--batch", type=positive_int, default=1,
                        help="the batch fixed in the deployable files (default 1)")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="TFLite interpreter threads of the latency measurement (default 1)")
    parser.add_argument("--timing-repeats", type=nonnegative_int, default=100,
                        help="timed TFLite invocations, the median is reported (0: no timing)")
    return parser


def choose_from_tables(space: SearchSpace, table_dir: str, budgets: Mapping[str, Any], *,
                       resolution: int, num_classes: int, combine: str = "sum",
                       standardize: bool = False) -> SearchResult:
    """The exact best network of the space's rating tables under whole-network budgets."""
    from dna_jax import search

    if not budgets:
        raise ValueError("give at least one budget, e.g. --budget macs=460M")
    tables = rating_table.load_space_tables(table_dir, space, resolution=resolution)
    fixed = search.space_fixed_costs(space, resolution, num_classes)
    return search.best_under_budget(tables, budgets, fixed_cost=fixed, combine=combine,
                                    standardize=standardize)


def main(argv: Sequence[str]) -> dict:
    """`dna-jax export`: prints the summary; the caller prints it as the last JSON line.

    Bad input (unknown space, unreadable tables, unreachable budgets ...) exits with status 1
    and a one-line message naming what to fix.
    """
    parser = _parser()
    args = parser.parse_args(list(argv))
    if not args.network and not args.space:
        parser.error("--space is required with --table-dir and --arch")
    try:
        return _run(args)
    except ValueError as error:
        raise SystemExit(f"dna-jax export: {error}") from error
    except OSError as error:  # an unwritable --out, a full disk, ...
        raise SystemExit(f"dna-jax export: cannot write the export "
                         f"({error.strerror or error}: {error.filename or args.out}); "
                         "choose a writable --out") from error


def _deploy_options(args, default: str) -> deploy.DeployOptions:
    formats = deploy.parse_formats(default if args.format is None else args.format)
    return deploy.DeployOptions(formats=formats, batch_size=args.batch, threads=args.threads,
                                timing_repeats=args.timing_repeats)


def _run(args) -> dict:
    from dna_jax import search

    if args.network:
        return _run_network(args)
    space = get_space(args.space)
    resolution = args.resolution or space.resolution
    options = _deploy_options(args, "none")
    if args.table_dir:
        budgets = search.parse_budget_strings(args.budget)
        choice = choose_from_tables(space, args.table_dir, budgets, resolution=resolution,
                                    num_classes=args.num_classes, combine=args.combine,
                                    standardize=args.standardize)
        source = args.table_dir
    else:
        if args.budget:
            raise ValueError("--budget applies to --table-dir, not to --arch")
        if not files.exists(args.arch):
            raise ValueError(f"{args.arch}: architecture file does not exist")
        choice = Arch.from_json(files.read_text(args.arch))
        source = os.path.dirname(files.absolute(args.arch))
    out = args.out or os.path.join(os.path.dirname(files.absolute(source.rstrip("/"))),
                                   "export")
    supernet = load_supernet_variables(args.supernet) if args.supernet else None
    summary = export_winner(space, choice, out, num_classes=args.num_classes,
                            resolution=resolution, supernet_variables=supernet, seed=args.seed,
                            deploy_options=options)
    print(describe(summary, out))
    return {k: v for k, v in summary.items() if k not in ("layer_config", "files")} | \
        {"out_dir": out}


def _run_network(args) -> dict:
    """`--network`: the deployable files of a trained network and its deploy.json."""
    ignored = [flag for flag, value in (("--space", args.space), ("--budget", args.budget),
                                        ("--supernet", args.supernet)) if value]
    if ignored:
        raise ValueError(f"{', '.join(ignored)}: not used with --network (the network's "
                         "architecture and weights are in its checkpoint); leave it out")
    if not files.isdir(args.network):
        raise ValueError(f"{args.network}: no such network folder (a teacher checkpoint: "
                         "teacher.json + variables/, e.g. <workdir>/retrain/network)")
    out = args.out or os.path.join(os.path.dirname(files.absolute(args.network.rstrip("/"))),
                                   "deploy")
    options = _deploy_options(args, "all")
    if not options.formats:
        raise ValueError("--network writes deployable files: give --format tflite, stablehlo "
                         "or all")
    content = deploy_network(args.network, out, options, resolution=args.resolution)
    print(describe_deploy(content, out))
    return {"out_dir": out, "network": content["network"], "files": content["files"],
            "latency": content["latency"], "parity": content["parity"]}


def describe(summary: Mapping[str, Any], out_dir: str) -> str:
    """A few human-readable lines about an export."""
    lines = [f"Exported {summary['space']} architecture to {out_dir}",
             f"  params {summary['params']:,}  macs {summary['macs']:,}  "
             f"dna_flops {summary['dna_flops']:,}  ({summary['resolution']} px, "
             f"{summary['num_classes']} classes)"]
    for (name, ops), strings in zip(summary["ops"].items(), summary["block_strings"][1:]):
        lines.append(f"  {name:<8} {' '.join(ops):<40} {', '.join(strings)}")
    if summary["from_supernet"]:
        lines.append(f"  weights: {summary['inherited_leaves']} leaves from the supernet, "
                     f"{summary['fresh_leaves']} fresh (see {INHERITANCE_FILE})")
    if "search" in summary:
        lines.append(f"  search score {summary['search']['score']:.6g}; costs match the "
                     f"export: {summary['search_costs_match']}")
    if summary.get("deploy"):
        lines += deploy_lines(summary["deploy"])
    return "\n".join(lines)


def describe_deploy(content: Mapping[str, Any], out_dir: str) -> str:
    """A few human-readable lines about `deploy_network`'s output."""
    network = content["network"]
    return "\n".join([f"Deployable files of {network['name']} in {out_dir}",
                      f"  params {network['params']:,}  macs {network['macs']:,}  "
                      f"({network['resolution']} px, {network['num_classes']} classes)",
                      *deploy_lines(content)])


def deploy_lines(description: Mapping[str, Any]) -> list[str]:
    """One line per deploy file: size, parity with the Flax model, TFLite latency."""
    lines = [f"  deploy files (input {description['input']['shape']} float32 NHWC):"]
    for record in description["files"]:
        parity = description.get("parity", {}).get(record["file"])
        latency = description.get("latency", {}).get(record["file"])
        text = f"    {record['file']:<18} {record['bytes']:>11,} bytes"
        if parity:
            text += (f"  max |error| {parity['max_abs_error']:.2g} of logits up to "
                     f"{parity['logit_scale']:.3g}, top-1 agreement "
                     f"{parity['top1_agreement']:.3f}")
        if latency:
            text += (f"  {latency['median_ms']:.3f} ms ({latency['threads']} thread(s), "
                     f"batch {latency['batch']})")
        lines.append(text)
    return lines
