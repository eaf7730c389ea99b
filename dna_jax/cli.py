"""`dna-jax` console command: a thin dispatcher to the library's entry points.

  dna-jax info [--resolution 224] [--num-classes 1000]   search spaces and the model zoo
  dna-jax run --config configs/X.py --workdir DIR        the DNA pipeline (dna_jax.main)
  dna-jax train --config configs/X.py --workdir DIR      classifier training (teacher, retrain)
  dna-jax export --space NAME (--table-dir DIR --budget macs=460M | --arch arch.json) [--out DIR]
                 [--format tflite|stablehlo|all] [--batch 1]
                                                         export the winner (dna_jax.export)
  dna-jax export --network W/retrain/network [--format all] [--out DIR]
                                                         deployable files of a trained network

Every command ends by printing one JSON object on its last output line. `dna-jax CMD --help`
lists a command's flags; a bad argument is refused with one line on stderr and status 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Callable, Sequence

from dna_jax import costs, host_memory, space
from dna_jax.models import zoo


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line on stderr (status 2), not usage + error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _integer(text: str, minimum: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _integer(text, 1, "a positive integer")


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _integer(text, 0, "an integer >= 0")


def zoo_table(resolution: int = 224, num_classes: int = 1000) -> tuple[str, dict]:
    """A text table of every zoo model and its costs, and the same figures as a dict."""
    header = (f"{'model':<16} {'params':>11} {'macs':>14} {'dna_flops':>14}  "
              f"{'stage widths':<34} stage depths")
    lines, figures = [header, "-" * len(header)], {}
    for name in zoo.names():
        spec = zoo.get_network_spec(name)
        total = costs.network_costs(spec, resolution, num_classes).total
        figures[name] = total.as_dict()
        widths = "/".join(map(str, spec.stage_channels))
        depths = "/".join(map(str, spec.stage_depths))
        lines.append(f"{name:<16} {total.params:>11,} {total.macs:>14,} {total.dna_flops:>14,}  "
                     f"{widths:<34} {depths}")
    return "\n".join(lines), figures


def info(argv: Sequence[str]) -> dict:
    parser = ArgumentParser(prog="dna-jax info",
                            description="Search-space presets and the model zoo.")
    parser.add_argument("--resolution", type=positive_int, default=224,
                        help="input side length in pixels for the zoo's costs (default 224)")
    parser.add_argument("--num-classes", type=positive_int, default=1000,
                        help="classifier outputs for the zoo's costs (default 1000)")
    args = parser.parse_args(argv)
    print("Search spaces:")
    sizes = {}
    for name in space.PRESETS:
        sp = space.get_space(name)
        sizes[name] = sp.size()
        per_block = " x ".join(str(sp.block_size(b)) for b in range(len(sp.blocks)))
        print(f"  {name:<14} {sp.size():>26,} architectures ({sp.size():.3g}) = {per_block}")
        print(f"  {'':<14} {sp.description}")
    print(f"\nModel zoo at {args.resolution} px, {args.num_classes} classes "
          "(macs: conv+dense multiply-adds; dna_flops: the original DNA counter):")
    table, figures = zoo_table(args.resolution, args.num_classes)
    print(table)
    return {"spaces": sizes, "zoo": figures}


_HELP = ("-h", "--help", "-?", "--helpshort")


def _absl_entry(module: str, command: str) -> Callable[[Sequence[str]], dict | None]:
    """Delegates to `module.run(argv)`: an absl app that defines its flags, parses `argv`
    (without the program name) and prints its own JSON line. `--help` lists the module's
    flags here (absl's own --help lists only the flags of `__main__`)."""
    def run(argv: Sequence[str]):
        lib = importlib.import_module(module)
        if any(arg in _HELP for arg in argv):
            print(absl_help(lib, command))
            return None
        return lib.run(list(argv))
    return run


def absl_help(lib, command: str) -> str:
    """Usage of an absl command: its module docstring's first paragraph and its flags."""
    from absl import flags  # pylint: disable=import-outside-toplevel
    lib.define_flags()
    summary = (lib.__doc__ or "").strip().split("\n\n")[0]
    listed = "".join(f"\n  --{name}: {flags.FLAGS[name].help} (required)"
                     for name in ("config", "workdir"))
    return (f"usage: dna-jax {command} --config FILE.py[:ARG] --workdir DIR "
            f"[--config.FIELD=VALUE ...]\n\n{summary}\n\nflags:{listed}\n"
            "  --config.FIELD=VALUE: override any field of the config, e.g. "
            "--config.seed=1\n\nabsl's own flags: dna-jax " + command + " --helpfull")


def _library_entry(module: str) -> Callable[[Sequence[str]], dict | None]:
    """Delegates to `module.main(argv)`, which returns the figures this command prints."""
    def run(argv: Sequence[str]):
        return importlib.import_module(module).main(list(argv))
    return run


COMMANDS: dict[str, Callable[[Sequence[str]], dict | None]] = {
    "info": info,
    "run": _absl_entry("dna_jax.main", "run"),
    "train": _absl_entry("dna_jax.retrain", "train"),
    "export": _library_entry("dna_jax.export"),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        known = ", ".join(COMMANDS)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"dna-jax: unknown command {argv[0]!r}; known: {known}", file=sys.stderr)
            return 2
        print(__doc__)
        return 0
    host_memory.keep_freed_memory()  # before a command starts JAX's CPU threads
    result = COMMANDS[argv[0]](argv[1:])
    if isinstance(result, dict):
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
