"""What the pipeline's stages share within one run, whatever supervises the supernet.

The driver (dna_jax.pipeline) builds one `Context` per run; every stage runner, the common
ones (dna_jax.stages, dna_jax.report) and those of a supervision kind
(dna_jax.supervision), takes it and nothing else. The kind is reachable as `ctx.kind`, so a
common stage asks it for what differs (the search space, the number of classes, the cost a
budget fraction is taken of, the supernet's weights) instead of branching on its name.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any

import jax
import ml_collections

from dna_jax import artifacts
from dna_jax import costs as costs_lib
from dna_jax import files
from dna_jax import multihost
from dna_jax.space import SearchSpace

if TYPE_CHECKING:  # the registry imports the kinds, which import this module
    from dna_jax.supervision import Supervision

WORKDIR_PLACEHOLDER = "{workdir}"  # in teacher.checkpoint: this run's workdir (DNA+ rounds)


class StageError(RuntimeError):
    """A stage cannot run: a missing upstream artifact, an impossible request, ..."""


@dataclasses.dataclass
class Context:
    """What the stages share within one run: config, workdir, mesh, the supervision kind and
    the artifacts already loaded (`cache`)."""

    config: ml_collections.ConfigDict
    workdir: str
    mesh: jax.sharding.Mesh
    digests: dict[str, str]
    kind: "Supervision"
    cache: dict[str, Any] = dataclasses.field(default_factory=dict)

    def stage_dir(self, stage: str) -> str:
        return os.path.join(self.workdir, stage)

    @property
    def space(self) -> SearchSpace:
        """The search space as the kind sees it (DNA+ rounds re-align it to their teacher)."""
        if "space" not in self.cache:
            self.cache["space"] = self.kind.space(self)
        return self.cache["space"]

    def figures(self, stage: str) -> dict[str, Any]:
        """A completed stage's figures (from its manifest)."""
        return artifacts.read_manifest(self.stage_dir(stage)).get("figures", {})


def is_main_process() -> bool:
    """Process 0 writes the small files (manifests, JSON, plots); Orbax saves run on all
    (dna_jax.multihost)."""
    return multihost.is_writer()


def resolve_workdir_path(path: str, workdir: str) -> str:
    """`path` with a leading '{workdir}' replaced by `workdir` (keeps workdirs movable)."""
    if path.startswith(WORKDIR_PLACEHOLDER):
        return files.normpath(workdir + path[len(WORKDIR_PLACEHOLDER):])
    return path


def resolution(config: ml_collections.ConfigDict, space: SearchSpace) -> int:
    """The image size the rating tables' costs (and the search's budgets) are counted at."""
    return int(config.rate.cost_resolution or config.data.image_size or space.resolution)


def network_cost_figures(spec, image_size: int, num_classes: int) -> dict[str, int]:
    """params, macs and dna_flops of a whole network (a stage's figures)."""
    total = costs_lib.network_costs(spec, image_size, num_classes).total
    return {"params": total.params, "macs": total.macs, "dna_flops": total.dna_flops}
