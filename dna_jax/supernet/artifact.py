"""The supernet artifact: variables {'block<k>': {'params', 'batch_stats'}} (Orbax) and a
manifest of their shapes and of the SHA-256 of every file, so a later stage that expects
another space or teacher fails loudly, naming the differences, instead of restoring into the
wrong shapes, and a changed byte is caught before it becomes a rating (dna_jax.integrity).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dna_jax import files
from dna_jax import integrity
from dna_jax import multihost

PyTree = Any


class SupernetCheckpointError(ValueError):
    """A saved supernet is missing, corrupt, or does not match the expected variables."""


SUPERNET_ITEM = "variables"
SUPERNET_MANIFEST = "supernet.json"


def _flat_shapes(tree: PyTree) -> dict[str, list]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): [list(x.shape), str(np.dtype(x.dtype))]
            for path, x in leaves}


def save_supernet(directory: str, variables: dict) -> None:
    """Saves supernet variables (Orbax) and a shape manifest, atomically.

    Everything is written to `directory.tmp`, then renamed to `directory` (an older artifact
    there is replaced only once the new one is complete; on gs:// a rename copies the objects,
    so it is not atomic, but the stage's manifest comes later). Every process calls this.
    """
    directory = files.absolute(directory)
    tmp, old = directory + ".tmp", directory + ".old"
    if multihost.is_writer():
        for path in (tmp, old):
            files.rmtree(path, missing_ok=True)
    multihost.barrier("supernet staging cleared")  # nobody saves into a folder being removed
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(tmp, SUPERNET_ITEM), variables)
    checkpointer.wait_until_finished()
    checkpointer.close()
    if multihost.is_writer():
        files.write_text(os.path.join(tmp, SUPERNET_MANIFEST), json.dumps(
            {"format": "dna_jax.supernet/1", "shapes": _flat_shapes(variables),
             "checksums": integrity.tree_checksums(os.path.join(tmp, SUPERNET_ITEM))}))
        if files.exists(directory):
            files.move(directory, old)
        files.move(tmp, directory)
        files.rmtree(old, missing_ok=True)
    multihost.barrier("supernet saved")


def _shape_differences(found: dict[str, list], expected: dict[str, list]) -> list[str]:
    problems = [f"missing {key}" for key in expected if key not in found]
    problems += [f"unexpected {key}" for key in found if key not in expected]
    problems += [f"{key}: saved {found[key]}, expected {value}"
                 for key, value in expected.items() if key in found and found[key] != value]
    return problems


def _redo_hint(directory: str) -> str:
    """How to make the supernet again (a pipeline's distill stage is skipped while its
    manifest says complete: remove the manifest and the stage resumes from its checkpoints)."""
    manifest = os.path.join(os.path.dirname(directory), "manifest.json")
    if files.exists(manifest):
        return (f"remove {manifest} (nothing else) and rerun: the distill stage then resumes "
                "from its checkpoints and saves the supernet again")
    return "distil it again"


def load_supernet(directory: str, distiller_or_abstract: Any, mesh: Mesh | None = None
                  ) -> dict:
    """Restores variables written by `save_supernet`.

    Args:
      directory: the artifact directory.
      distiller_or_abstract: a trainer whose supernet is expected (its
        `abstract_variables()`), or a tree of arrays / ShapeDtypeStructs with the expected
        structure, shapes and dtypes.
      mesh: restore replicated on this mesh (default: on the first device).

    Raises:
      SupernetCheckpointError: the directory or its manifest is missing, the saved shapes do
        not match the expected ones (the first differences are named), or Orbax cannot read it.
    """
    directory = files.absolute(directory)
    abstract = (distiller_or_abstract.abstract_variables()
                if hasattr(distiller_or_abstract, "abstract_variables")
                else distiller_or_abstract)
    manifest_path = os.path.join(directory, SUPERNET_MANIFEST)
    if not files.exists(manifest_path):
        raise SupernetCheckpointError(
            f"no supernet in {directory} (missing {SUPERNET_MANIFEST}); run the distill stage "
            "or point to its output directory")
    try:
        manifest = json.loads(files.read_text(manifest_path))
        found = manifest["shapes"]
    except (OSError, ValueError, KeyError) as error:
        raise SupernetCheckpointError(f"{manifest_path} is corrupt ({error}); "
                                      + _redo_hint(directory)) from error
    problems = _shape_differences(found, _flat_shapes(abstract))
    if problems:
        raise SupernetCheckpointError(
            f"the supernet in {directory} does not match the expected space/teacher: "
            + "; ".join(problems[:5]) + (f" (+{len(problems) - 5} more)" if len(problems) > 5
                                         else ""))
    sharding = (NamedSharding(mesh, P()) if mesh is not None
                else jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                          abstract)
    item = os.path.join(directory, SUPERNET_ITEM)
    # The bytes first (as the teacher and the export do): a flipped byte in a compressed chunk
    # can also make Orbax fail, with a message that names no file.
    if files.exists(item):
        try:
            integrity.verify(item, manifest.get("checksums"), "the supernet's variables")
        except integrity.IntegrityError as error:
            raise SupernetCheckpointError(f"{error}; " + _redo_hint(directory)) from error
    checkpointer = ocp.StandardCheckpointer()
    try:
        restored = checkpointer.restore(item, target)
    except Exception as error:  # Orbax raises many types; all mean "unusable".
        raise SupernetCheckpointError(
            f"the supernet in {directory} cannot be restored ({type(error).__name__}: "
            f"{error}); " + _redo_hint(directory)) from error
    finally:
        checkpointer.close()
    return restored
