"""Experiment config files as building blocks: load another file's `get_config(arg)`.

Experiment configs build on each other (the demo reuses the teacher recipe, DNA+ and the
ranking benchmark reuse the demo, the ImageNet variants reuse `imagenet_dna.py`) and tests load
configs with a few fields changed. This one loader serves all of them, so a config file never
needs to know how another one is imported.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Any

import ml_collections


def load_config(path: str, arg: str | None = None, *, unlocked: bool = False,
                **overrides: Any) -> ml_collections.ConfigDict:
    """`get_config(arg)` of the config file at `path`.

    Args:
      path: a config file (e.g. configs/fashion_mnist_dna.py).
      arg: the variant passed to its `get_config`.
      unlocked: return an unlocked deep copy (to build another config on top of it);
        otherwise the file's own (locked) config, with `overrides` applied.
      overrides: dotted keys to set (`**{'distill.num_steps': 2}`); a misspelt key fails.

    Raises:
      FileNotFoundError: no such config file.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config file {path!r}")
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(f"dna_jax_config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg)
    if unlocked:
        config = ml_collections.ConfigDict(config.to_dict())
    with config.unlocked() if config.is_locked else contextlib.nullcontext():
        for dotted, value in overrides.items():
            node = config
            *parents, leaf = dotted.split(".")
            for part in parents:
                node = node[part]
            if leaf not in node:
                raise KeyError(f"{path}: no config field {dotted!r}")
            node[leaf] = value
    return config


def variant(arg: str | None) -> str:
    """A config file's variant from its `:arg`: 'full' ('' or None) or 'tiny' (the tests'
    seconds-long version); anything else is an error naming both."""
    name = arg or "full"
    if name not in ("full", "tiny"):
        raise ValueError(f"Unknown variant {arg!r}; use '' or 'tiny'.")
    return name


def sibling_config(this_file: str, name: str, arg: str | None = None, *,
                   unlocked: bool = False) -> ml_collections.ConfigDict:
    """`load_config` of `name`.py in the folder of `this_file` (a config's own __file__)."""
    path = os.path.join(os.path.dirname(os.path.abspath(this_file)), f"{name}.py")
    return load_config(path, arg, unlocked=unlocked)

