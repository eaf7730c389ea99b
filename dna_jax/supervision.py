"""Supervision kinds: what trains the supernet blocks and rates their candidates.

The pipeline (dna_jax.pipeline) is one driver for every kind: it keeps manifests, hashes,
resume and the order of stages, and names no kind. A kind says what differs:

  teacher  DNA (and DNA+ rounds): teacher -> distill, candidates rated by their error against
           the teacher's features (dna_jax.supervisions.dna).
  ssl      DNA++: the `ssl` stage trains the blocks by self-supervision, no teacher;
           candidates rated by their SSL loss (dna_jax.supervisions.dna_pp).

Both end with the common stages rate -> search -> retrain -> deploy -> report
(dna_jax.stages, dna_jax.report): `rate` is run by the kind (its runner writes DNA's rating
tables), the others ask the kind through `Context.kind` for the space, the classes, the
supernet and the cost a `search.budget_fraction` is taken of.

To add a kind: write one module that builds a `Supervision` and calls `register`, and add a
line to `BUILTIN` (its config name -> module), so that `get` can import it by name.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Mapping, Sequence

# Config name (`config.supervision`) -> the module that registers that kind.
BUILTIN = {"teacher": "dna_jax.supervisions.dna", "ssl": "dna_jax.supervisions.dna_pp"}

DEFAULT = "teacher"  # a config without `supervision` runs DNA

# The stages every kind ends with, in order; a kind's own stages come before them.
COMMON_STAGES = ("rate", "search", "retrain", "deploy", "report")

Runner = Callable[[Any], dict[str, Any]]  # (Context) -> the stage's figures


@dataclasses.dataclass(frozen=True)
class Supervision:
    """One kind of block-wise supervision, as the pipeline sees it.

    Fields:
      name: its `config.supervision` value.
      label: how reports and errors name it ('DNA', 'DNA++').
      example_config: 'configs/<file>.py:<variant>', a seconds-long run of the whole kind
        (the tests run every registered kind's).
      add_config: adds the kind's own sections to the pipeline's default config.
      neutral_defaults: {section: {field: value}} of its fields that a plain run leaves at
        that value and that are left out of the stage hashes there (DNA+'s teacher fields).
      own_stages: the stages it adds before COMMON_STAGES (DNA: teacher, distill).
      data_stages: those of its own stages that read `config.data` (validation).
      upstream: {stage: the stages whose artifacts it reads}, for every stage of the kind.
      sections: {stage: the config sections the stage's hash covers} for its own stages and
        'rate' (the common stages' sections are the pipeline's).
      runners: {stage: runner} for its own stages and 'rate'.
      space_name: config -> the search-space preset.
      space: Context -> the SearchSpace of the run (DNA+ re-aligns it to its teacher).
      num_classes: Context -> the classes of the searched network's head.
      load_supernet: Context -> the supernet variables ({'block<k>': {'params',
        'batch_stats'}}), what retraining can inherit.
      reference_costs: Context -> the costs of the network a budget fraction is taken of
        ({'params', 'macs', 'dna_flops'}), or None when the kind has none (absolute only).
      report_figures: Context -> the kind's entries of summary.json.
      report_lines: summary -> the kind's lines of report.md.
      validate: (problems, config, stages, devices, workdir) -> None: checks the kind's own
        sections statically (dna_jax.validate).
      reference_spec: (config, workdir) -> the NetworkSpec a budget fraction is taken of, when
        known before running, else None (validation).
      static_space: (config, reference spec) -> the SearchSpace, or None when it depends on
        an artifact not yet made (validation).
      reference_static_cost: (config, reference spec, num_classes, cost) -> that network's
        cost when known before running, else None (validation of the budget).
      has_reference: whether a budget fraction can be given at all (DNA++: no teacher).
    """

    name: str
    label: str
    example_config: str
    add_config: Callable[[Any], None]
    neutral_defaults: Mapping[str, Mapping[str, Any]]
    own_stages: tuple[str, ...]
    data_stages: tuple[str, ...]
    upstream: Mapping[str, tuple[str, ...]]
    sections: Mapping[str, tuple[str, ...]]
    runners: Mapping[str, Runner]
    space_name: Callable[[Any], str]
    space: Callable[[Any], Any]
    num_classes: Callable[[Any], int]
    load_supernet: Callable[[Any], dict[str, Any]]
    reference_costs: Callable[[Any], Mapping[str, float] | None]
    report_figures: Callable[[Any], dict[str, Any]]
    report_lines: Callable[[Mapping[str, Any]], list[str]]
    validate: Callable[..., None]
    reference_spec: Callable[[Any, str | None], Any]
    static_space: Callable[[Any, Any], Any]
    reference_static_cost: Callable[[Any, Any, int, str], float | None]
    has_reference: bool

    @property
    def stages(self) -> tuple[str, ...]:
        """Every stage of a run of this kind, in order."""
        return (*self.own_stages, *COMMON_STAGES)


_REGISTRY: dict[str, Supervision] = {}


def register(kind: Supervision) -> Supervision:
    """Adds a kind (called by its module at import); a second kind of the same name is an
    error, not a silent replacement."""
    if kind.name in _REGISTRY and _REGISTRY[kind.name] is not kind:
        raise ValueError(f"supervision kind {kind.name!r} is registered twice")
    missing = (set(kind.own_stages) | {"rate"}) - set(kind.runners)
    if missing:
        raise ValueError(f"supervision kind {kind.name!r} has no runner for {sorted(missing)}")
    _REGISTRY[kind.name] = kind
    return kind


def names() -> tuple[str, ...]:
    """Every known kind's config name (built-in and registered)."""
    return tuple(dict.fromkeys([*BUILTIN, *_REGISTRY]))


def get(name: str) -> Supervision:
    """The kind registered as `name` (importing a built-in on first use).

    Raises:
      ValueError: an unknown name, listing the known ones.
    """
    if name not in _REGISTRY and name in BUILTIN:
        importlib.import_module(BUILTIN[name])
    if name not in _REGISTRY:
        raise ValueError(f"config.supervision must be one of {names()}, got {name!r}")
    return _REGISTRY[name]


def of(config: Any) -> Supervision:
    """The kind a pipeline config runs (`config.supervision`)."""
    return get(config.get("supervision", DEFAULT))


def all_kinds() -> list[Supervision]:
    return [get(name) for name in names()]


def stage_order() -> tuple[str, ...]:
    """Every stage of every kind in pipeline order: the kinds' own stages, then the common."""
    own: list[str] = []
    for kind in all_kinds():
        own += [s for s in kind.own_stages if s not in own]
    return (*own, *COMMON_STAGES)


def stages_text(kinds: Sequence[Supervision] | None = None) -> str:
    """'teacher, distill, rate, ... (DNA) or ssl, rate, ... (DNA++)' for error messages."""
    return " or ".join(f"{', '.join(k.stages)} ({k.label})" for k in kinds or all_kinds())
