r"""The original PyTorch rating loop (changlin31/DNA), timed on the job of `rate_throughput.py`.

    git clone https://github.com/changlin31/DNA /tmp/DNA     # the original: fetched by you
    .venv/bin/python benchmarks/original_dna_rate.py --dna-repo /tmp/DNA [--num-candidates 3]

What runs: the original's own `dna.distill_train._potential` on block 1 of its released
supernet (`dna.student_supernet.StudentSuperNet`, block configs [40, 80, stride 2, 4 layers],
6 ops per layer: 6^4 = 1,296 candidates, input 48 x 56 x 56, output 80 x 28 x 28), batch 32,
one rating batch, with its defaults `reset_bn_eval=True` (per candidate: every BN of the
supernet reset, one training-mode forward over the recalibration batch with momentum 1, then
the evaluation-mode forward), `guide_input=True`, `print_detail=True` (without it the
non-distributed branch reads an unset variable), `prefetcher=True` and the MSE guide loss.
Nothing of the original is copied into this repository: you fetch it and pass its root (or
its `searching/` folder) as `--dna-repo`.

The teacher is not run: `_potential` calls it on the recalibration batch and on each rating
batch once (not per candidate) to get the block's input and target features. A stand-in
module returns random features of the right shapes instead, as `rate_throughput.py` feeds
ours random inputs and targets; the timed loop is the per-candidate work.

Run-time fixes (nothing is edited on disk):
  * no CUDA (`--device cpu`, or 'auto' without a GPU): `Tensor.cuda` and `Module.cuda`
    return their object unchanged and `torch.cuda.synchronize` does nothing;
  * a torchvision that cannot be imported (a CPU torch beside a CUDA torchvision wheel): the
    placeholders of `tests/torchvision_shim.py` stand in (the original imports torchvision
    at import time but the rating never uses it);
  * its stdout (one line per BatchNorm, the potentials dict) goes to /dev/null.

`--num-candidates n` rates n candidates and extrapolates linearly to all 1,296 (labelled in
the output): the first n in the original's order (`itertools.product`; its first 36 all start
with two MB6 3x3 layers, so they cost more than the average candidate) or, with
`--sample random`, n drawn without replacement (seed `--sample-seed`), unbiased on average. One
candidate is rated untimed first (`--warmup 1`) so first-call set-up does not weigh on a short
sample. The last output line is one JSON object.

`--keep-freed-memory 1` gives the original the allocator settings that ours runs with
(`dna_jax.host_memory.keep_freed_memory`: one glibc arena, no `mmap` for large blocks, no heap
trimming), set before torch is imported. Without it (the default: the original as its users
run it) glibc `mmap`s and `munmap`s PyTorch's big activations on every candidate: in a full
run on the project's 2-vCPU Zen 3, 390M minor page faults and 1,420 s of its 3,206 CPU
seconds in the kernel. Both are reported so a speed-up can be read either way.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import sys
import time
import types

_HERE = os.path.dirname(os.path.abspath(__file__))
BLOCK = 1  # the supernet block (stage) rated: the paper's block 1
NUM_LAYERS, NUM_OPS = 4, 6
IN_SHAPE, OUT_SHAPE = (48, 56, 56), (80, 28, 28)  # channels, height, width (NCHW)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dna-repo", required=True,
                        help="a checkout of github.com/changlin31/DNA (its root or searching/)")
    parser.add_argument("--num-candidates", type=int, default=0,
                        help="rate n candidates (see --sample) and extrapolate (0 = all 1,296)")
    parser.add_argument("--sample", choices=("first", "random"), default="first",
                        help="which n candidates --num-candidates rates")
    parser.add_argument("--sample-seed", type=int, default=0,
                        help="seed of --sample random")
    parser.add_argument("--batch", type=int, default=32, help="examples per rating batch")
    parser.add_argument("--rating-batches", type=int, default=1, help="rating batches")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=0,
                        help="torch.set_num_threads (0 = torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=1, choices=(0, 1),
                        help="rate one candidate untimed first (1, default) or not (0)")
    parser.add_argument("--keep-freed-memory", type=int, default=0, choices=(0, 1),
                        help="1: ours' glibc allocator settings (dna_jax.host_memory) for the "
                             "original too; 0 (default): glibc's defaults, as shipped")
    args = parser.parse_args(argv)
    total = NUM_OPS ** NUM_LAYERS
    if not 0 <= args.num_candidates <= total:
        parser.error(f"--num-candidates must be in [0, {total}]")
    if args.batch < 1 or args.rating_batches < 1 or args.threads < 0:
        parser.error("need --batch >= 1, --rating-batches >= 1, --threads >= 0")
    args.searching_dir = searching_dir(args.dna_repo)
    if args.searching_dir is None:
        parser.error(f"--dna-repo {args.dna_repo!r}: no dna/distill_train.py under it or its "
                     "searching/ folder (clone github.com/changlin31/DNA)")
    return args


def searching_dir(repo: str) -> str | None:
    """The folder that holds the original's `dna` and `timm_` packages, or None."""
    for candidate in (os.path.join(repo, "searching"), repo):
        if os.path.isfile(os.path.join(candidate, "dna", "distill_train.py")):
            return os.path.abspath(candidate)
    return None


@contextlib.contextmanager
def cpu_patches(torch, enabled: bool):
    """Makes the original's unconditional `.cuda()` and `torch.cuda.synchronize()` no-ops."""
    if not enabled:
        yield
        return
    saved = (torch.Tensor.cuda, torch.nn.Module.cuda, torch.cuda.synchronize)
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.nn.Module.cuda = lambda self, *args, **kwargs: self
    torch.cuda.synchronize = lambda *args, **kwargs: None
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.nn.Module.cuda, torch.cuda.synchronize = saved


def import_original(searching: str):
    """(distill_train, student_supernet) modules of the original; torchvision shimmed if broken.

    Returns the modules and why torchvision was replaced (None if it imported).
    """
    sys.path.insert(0, os.path.join(os.path.dirname(_HERE), "tests"))
    import torchvision_shim  # pylint: disable=import-outside-toplevel
    shimmed = torchvision_shim.install_if_broken()
    sys.path.insert(0, searching)
    import importlib  # pylint: disable=import-outside-toplevel
    distill_train = importlib.import_module("dna.distill_train")
    student_supernet = importlib.import_module("dna.student_supernet")
    return distill_train, student_supernet, shimmed


def make_teacher(torch, features: list[tuple]):
    """A stand-in for the teacher: maps each given input tensor to its (target, input) pair.

    `_potential` calls `teacher(x, end_block=stage)` and `teacher.forward(...)` and reads
    `(guides, last_guide)`: the block's target and the block's input.
    """
    class FeatureTeacher(torch.nn.Module):
        def forward(self, x, end_block=None):  # pylint: disable=unused-argument
            for inputs, targets in features:
                if x is inputs:
                    return targets, inputs
            raise ValueError("the stand-in teacher was called on an unknown tensor")
    return FeatureTeacher()


def original_args(batches: int) -> types.SimpleNamespace:
    """The fields of the original's argparse namespace that `_potential` and BN_Correction read
    (its train_pipeline.yaml defaults; one break step past the last rating batch)."""
    return types.SimpleNamespace(
        potential_eval_times=batches + 1, prefetcher=True, reset_bn_eval=True,
        print_detail=True, guide_input=True, reverse_train=False, distributed=False,
        local_rank=0, world_size=1)


def rate_original(args: argparse.Namespace) -> dict:
    kept = False
    if args.keep_freed_memory:  # before torch starts threads (their arenas are made once)
        sys.path.insert(0, os.path.dirname(_HERE))
        from dna_jax import host_memory  # pylint: disable=import-outside-toplevel
        kept = host_memory.keep_freed_memory()
        if not kept:
            raise SystemExit("--keep-freed-memory 1: the glibc options could not be set (not "
                             "glibc, or $DNA_JAX_KEEP_FREED_MEMORY=0)")
    import numpy as np  # pylint: disable=import-outside-toplevel
    import torch  # pylint: disable=import-outside-toplevel

    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no GPU")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if cuda else "cpu")
    with cpu_patches(torch, enabled=not cuda):
        distill_train, student_supernet, shimmed = import_original(args.searching_dir)
        torch.backends.cudnn.benchmark = True  # as the original's train.py
        torch.manual_seed(args.seed)
        supernet = student_supernet.StudentSuperNet(num_classes=1000).to(device)
        rng = np.random.default_rng(args.seed)

        def batch():
            x = rng.standard_normal((args.batch, *IN_SHAPE), dtype=np.float32)
            t = rng.standard_normal((args.batch, *OUT_SHAPE), dtype=np.float32)
            return torch.from_numpy(x).to(device), torch.from_numpy(t).to(device)

        rating = [batch() for _ in range(args.rating_batches)]
        recal = batch()
        teacher = make_teacher(torch, rating + [recal]).to(device)
        loader = [(x, torch.zeros(args.batch, dtype=torch.long)) for x, _ in rating]
        pool = [list(c) for c in itertools.product(range(NUM_OPS), repeat=NUM_LAYERS)]
        total = len(pool)
        if supernet.get_layers(BLOCK) != NUM_LAYERS or len(student_supernet.PRIMITIVES) != NUM_OPS:
            raise SystemExit("this checkout's supernet is not the released one (4 layers x 6 "
                             "ops in block 1)")
        if args.sample == "random" and args.num_candidates:
            chosen = np.random.default_rng(args.sample_seed).choice(
                total, args.num_candidates, replace=False)
            pool = [pool[i] for i in sorted(chosen)]
        else:
            pool = pool[:args.num_candidates or total]
        loss_fn = torch.nn.MSELoss().to(device)

        def potential_of(candidates):
            with open(os.devnull, "w", encoding="utf-8") as devnull, \
                    contextlib.redirect_stdout(devnull):
                return distill_train._potential(  # pylint: disable=protected-access
                    supernet=supernet, teacher=teacher, eval_loader=loader, loss_fn=loss_fn,
                    args=original_args(args.rating_batches), stage=BLOCK,
                    stage_model_pool=candidates, reset_data=(recal[0], None))

        start = time.perf_counter()
        if args.warmup:  # one candidate, untimed: first-call set-up (allocator, cuDNN search)
            potential_of(pool[:1])
        warmup_seconds = time.perf_counter() - start
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        potential = potential_of(pool)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    n = len(pool)
    all_seconds = seconds * total / n
    figures = {
        "what": "original PyTorch loop (changlin31/DNA dna.distill_train._potential), "
                "reset_bn_eval=True (like-for-like with bn_mode recalibrate)",
        "bn_mode": "recalibrate", "block": BLOCK, "candidates_rated": n, "candidates": total,
        "sample": args.sample if n < total else "all",
        "seconds": round(seconds, 3), "warmup_seconds": round(warmup_seconds, 3),
        "seconds_all_candidates": round(all_seconds, 2),
        "extrapolated": n < total, "candidates_per_second": round(n / seconds, 3),
        "batch": args.batch, "rating_batches": args.rating_batches,
        "device": str(device) if not cuda else torch.cuda.get_device_name(0),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "cpu_patches": not cuda, "torchvision_shimmed": shimmed,
        "mse_first": [round(float(v), 6) for v in potential["loss"][:3]],
        "cpu_count": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2),
        "keep_freed_memory": kept,
    }
    return figures


def main(argv=None) -> dict:
    args = parse_args(argv)
    figures = rate_original(args)
    print(f"original loop: {figures['candidates_rated']} candidates in {figures['seconds']:.1f} s"
          f" on {figures['device']} ({figures['candidates_per_second']:.2f} candidates/s); all "
          f"{figures['candidates']}: {figures['seconds_all_candidates']:.1f} s"
          + (" (EXTRAPOLATED)" if figures["extrapolated"] else ""), flush=True)
    print(json.dumps(figures, sort_keys=True))
    return figures


if __name__ == "__main__":
    main()
