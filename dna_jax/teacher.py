"""Teacher checkpoints: save and load a zoo network's variables as a validated Orbax checkpoint.

A teacher checkpoint is a directory:

    teacher.json   what the weights are: zoo name, classes, padding/BatchNorm options, where the
                   weights came from (e.g. converted timm weights), preprocessing, versions,
                   and the SHA-256 of every file of variables/ (`checksums`)
    variables/     Orbax (StandardCheckpointer) checkpoint of {'params', 'batch_stats'}

`load_teacher` rebuilds the module from the zoo, verifies the files against their checksums
(dna_jax.integrity), checks the checkpoint against the network (names, shapes, dtypes, layer
options) and fails with one error naming the path and every problem. Nothing here
needs torch: timm weights are converted once by `python -m dna_jax.porting.timm`.

A teacher need not be a zoo network: `save_teacher(..., spec=NetworkSpec)` stores the
architecture itself in teacher.json (`network`: stem, timm block strings per stage, head), so
any trained network, e.g. a DNA+ round's retrained winner, can teach; `load_teacher` rebuilds
it from there.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from dna_jax import files
from dna_jax import integrity
from dna_jax.models import zoo
from dna_jax.models.efficientnet import EfficientNet
from dna_jax.models.layers import LayerConfig
from dna_jax.netspec import NetworkSpec

FORMAT = "dna_jax.teacher/1"
METADATA_FILE = "teacher.json"
VARIABLES_DIR = "variables"
COLLECTIONS = ("params", "batch_stats")
# timm's defaults for ImageNet models (`IMAGENET_DEFAULT_MEAN` / `_STD`), as 0-1 RGB.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TeacherCheckpointError(ValueError):
    """A teacher checkpoint that is unreadable or does not fit the requested network."""


def layer_config_dict(config: LayerConfig) -> dict[str, Any]:
    """The numeric options of a LayerConfig that weights depend on (JSON-friendly)."""
    return {"padding": config.padding, "bn_eps": config.bn_eps, "act": config.act}


def network_spec_to_dict(spec: NetworkSpec) -> dict[str, Any]:
    """A NetworkSpec as JSON: stem, timm block strings per stage, head."""
    return {"name": spec.name, "stem_channels": spec.stem_channels,
            "stem_stride": spec.stem_stride, "stem_kernel": spec.stem_kernel,
            "head_channels": spec.head_channels, "stages": spec.to_strings()}


def network_spec_from_dict(data: Mapping[str, Any]) -> NetworkSpec:
    """Inverse of `network_spec_to_dict`."""
    spec = NetworkSpec.from_strings(str(data["name"]), int(data["stem_channels"]),
                                    [list(stage) for stage in data["stages"]],
                                    int(data["head_channels"]),
                                    stem_stride=int(data["stem_stride"]))
    return dataclasses.replace(spec, stem_kernel=int(data.get("stem_kernel", 3)))


def _layer_config_from_dict(data: Mapping[str, Any]) -> LayerConfig:
    return LayerConfig(padding=data["padding"], bn_eps=float(data["bn_eps"]), act=data["act"])


def teacher_network_spec(name: str, checkpoint_dir: str | os.PathLike | None = None
                         ) -> NetworkSpec:
    """The architecture of a teacher: stored in its checkpoint, else the zoo network `name`."""
    if checkpoint_dir:
        metadata = read_teacher_metadata(checkpoint_dir)
        if "network" in metadata:
            return network_spec_from_dict(metadata["network"])
        name = str(metadata["model"])
    return zoo.get_network_spec(name)


def expected_variables(model: nn.Module) -> dict[str, Any]:
    """Abstract `{params, batch_stats}` (jax.ShapeDtypeStruct leaves) of a zoo network."""
    image = jnp.zeros((1, 32, 32, 3), jnp.float32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), image))
    shapes = flax.core.unfreeze(shapes)
    return {c: shapes.get(c, {}) for c in COLLECTIONS}


def flat_shapes(tree: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], str]]:
    """{'params/stem/conv/kernel': (shape, dtype name)} for a nested dict of array-likes."""
    flat = traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")
    return {k: (tuple(int(d) for d in v.shape), np.dtype(v.dtype).name) for k, v in flat.items()}


def compare_shapes(found: Mapping[str, tuple], expected: Mapping[str, tuple],
                   found_label: str = "checkpoint") -> list[str]:
    """Problems between two `flat_shapes` maps: missing, unexpected, wrong shape or dtype."""
    problems = []
    for key in sorted(expected.keys() - found.keys()):
        problems.append(f"missing in {found_label}: {key} {expected[key][0]}")
    for key in sorted(found.keys() - expected.keys()):
        problems.append(f"unexpected in {found_label}: {key} {found[key][0]}")
    for key in sorted(found.keys() & expected.keys()):
        if found[key] != expected[key]:
            problems.append(f"{key}: {found_label} has {found[key][0]} {found[key][1]}, "
                            f"the network expects {expected[key][0]} {expected[key][1]}")
    return problems


def _versions() -> dict[str, str]:
    import orbax.checkpoint  # pylint: disable=import-outside-toplevel
    return {"jax": jax.__version__, "flax": flax.__version__,
            "orbax-checkpoint": getattr(orbax.checkpoint, "__version__", "unknown")}


def save_teacher(directory: str | os.PathLike, name: str, variables: Mapping[str, Any],
                 num_classes: int, source: Mapping[str, Any] | None = None,
                 preprocessing: Mapping[str, Any] | None = None,
                 overwrite: bool = False, spec: NetworkSpec | None = None,
                 layer_config: LayerConfig | None = None) -> dict[str, Any]:
    """Writes a teacher checkpoint after checking `variables` against the zoo network.

    The directory is assembled under a temporary name beside `directory` and renamed into
    place, so a killed run never leaves a half-written teacher behind. In a multi-process run
    only the calling process writes (its own Orbax checkpointer, the others are not involved):
    call it from process 0 with host (numpy) variables, then pass a barrier before any
    process loads it.

    Args:
      directory: the checkpoint directory to create.
      name: zoo name (e.g. 'tf_efficientnet_b7'); fixes the architecture and layer options.
      variables: {'params': ..., 'batch_stats': ...} as numpy or jax arrays.
      num_classes: classifier outputs (0: no classifier).
      source: JSON-friendly description of where the weights came from.
      preprocessing: input expectations (resolution, mean, std) for the pipeline.
      overwrite: replace an existing directory instead of failing.
      spec: the architecture, for a network that is not in the zoo (stored in teacher.json
        under `network`; `name` is then only its name).
      layer_config: the network's layer options (default: the zoo's for `name`).

    Returns:
      The metadata written to teacher.json.

    Raises:
      FileExistsError: `directory` exists and `overwrite` is False.
      TeacherCheckpointError: `variables` do not fit the network.
    """
    directory = files.absolute(directory)
    if files.exists(directory) and not overwrite:
        raise FileExistsError(f"teacher checkpoint {directory} already exists (pass overwrite)")
    layer_config = layer_config or zoo.default_layer_config(name)
    if spec is not None:
        model = EfficientNet(spec=spec, num_classes=num_classes, layer_config=layer_config)
    else:
        model = zoo.get_model(name, num_classes=num_classes, layer_config=layer_config)
    variables = {c: flax.core.unfreeze(variables.get(c, {})) for c in COLLECTIONS}
    problems = compare_shapes(flat_shapes(variables), flat_shapes(expected_variables(model)),
                              "variables")
    if problems:
        raise TeacherCheckpointError(f"variables do not fit {name} ({num_classes} classes):\n  "
                                     + "\n  ".join(problems))
    variables = jax.tree.map(lambda x: np.asarray(x, np.float32), variables)
    param_count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))
    metadata = {
        "format": FORMAT, "model": name, "num_classes": int(num_classes),
        "layer_config": layer_config_dict(layer_config), "param_count": param_count,
        "source": dict(source or {}),
        "preprocessing": dict(preprocessing or {}),
        "versions": _versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if spec is not None:
        metadata["network"] = network_spec_to_dict(spec)
    staging = files.staging_dir(directory)
    try:
        alone = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                                   active_processes={jax.process_index()})
        with ocp.StandardCheckpointer(multiprocessing_options=alone) as checkpointer:
            checkpointer.save(os.path.join(staging, VARIABLES_DIR), variables)
        # What load_teacher verifies first: a flipped byte restores into finite nonsense.
        metadata["checksums"] = integrity.tree_checksums(os.path.join(staging, VARIABLES_DIR))
        files.write_text(os.path.join(staging, METADATA_FILE),
                         json.dumps(metadata, indent=2, sort_keys=True) + "\n")
        if files.exists(directory):
            files.rmtree(directory)
        files.move(staging, directory)
    except BaseException:
        files.rmtree(staging, missing_ok=True)
        raise
    return metadata


def read_teacher_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """teacher.json of a teacher checkpoint, with clear errors for a missing or bad one."""
    directory = files.absolute(directory)
    if not files.isdir(directory):
        raise FileNotFoundError(
            f"teacher checkpoint {directory} does not exist (or is not a directory); convert "
            "timm weights with `python -m dna_jax.porting.timm --model NAME --weights FILE "
            f"--out {directory}`")
    path = os.path.join(directory, METADATA_FILE)
    if not files.isfile(path):
        raise TeacherCheckpointError(f"teacher checkpoint {directory}: {METADATA_FILE} is "
                                     "missing; this is not a dna_jax teacher checkpoint")
    try:
        metadata = json.loads(files.read_text(path))
    except (OSError, ValueError) as e:
        raise TeacherCheckpointError(f"teacher checkpoint {directory}: cannot read {path}: "
                                     f"{e}") from e
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise TeacherCheckpointError(f"teacher checkpoint {directory}: {path} is not a "
                                     f"{FORMAT} metadata file")
    for key in ("model", "num_classes", "layer_config"):
        if key not in metadata:
            raise TeacherCheckpointError(f"teacher checkpoint {directory}: {path} lacks "
                                         f"'{key}'")
    return metadata


def _check_metadata(metadata: Mapping[str, Any], name: str, num_classes: int,
                    layer_config: LayerConfig) -> list[str]:
    problems = []
    if "network" in metadata:  # a stored architecture: it is what the name refers to
        if name and name != metadata["model"]:
            problems.append(f"it holds the network {metadata['model']!r}, {name!r} requested")
        if metadata["num_classes"] != num_classes:
            problems.append(f"it has {metadata['num_classes']} classes, {num_classes} "
                            "requested")
        return problems
    try:
        stored_spec = zoo.get_network_spec(str(metadata["model"]))
    except ValueError:
        return [f"it holds {metadata['model']!r}, which is not a known architecture"]
    if stored_spec != zoo.get_network_spec(name):
        problems.append(f"it holds {metadata['model']!r}, a different architecture from "
                        f"{name!r}")
    if metadata["num_classes"] != num_classes:
        problems.append(f"it has {metadata['num_classes']} classes, {num_classes} requested")
    wanted = layer_config_dict(layer_config)
    stored = dict(metadata["layer_config"])
    if stored != wanted:
        problems.append(f"it was made for layer options {stored} ({metadata['model']}), "
                        f"{name!r} runs with {wanted}")
    return problems


def load_teacher(name: str, checkpoint_dir: str | os.PathLike, num_classes: int | None = None,
                 sharding: jax.sharding.Sharding | None = None, dtype: Any = None,
                 ) -> tuple[nn.Module, dict[str, Any]]:
    """Loads a teacher checkpoint written by `save_teacher` (e.g. converted timm weights).

    Args:
      name: zoo name of the teacher (e.g. 'tf_efficientnet_b0'); it must be the architecture
        and layer options the checkpoint was made for. For a checkpoint that stores its
        architecture (`save_teacher(spec=...)`), the stored network's name, or '' for any.
      checkpoint_dir: the checkpoint directory.
      num_classes: classifier outputs expected (default: whatever the checkpoint holds).
      sharding: sharding of every restored array (e.g. replicated over the mesh); default:
        the first local device.
      dtype: compute dtype of the returned module (e.g. jnp.bfloat16); variables stay float32.

    Returns:
      (module, {'params': ..., 'batch_stats': ...}) ready for `module.apply(variables, x)`.

    Raises:
      FileNotFoundError: the directory does not exist.
      TeacherCheckpointError: the checkpoint is incomplete, corrupt, or made for another
        network; the message names the path and lists every problem.
    """
    directory = files.absolute(checkpoint_dir)
    metadata = read_teacher_metadata(directory)
    num_classes = metadata["num_classes"] if num_classes is None else num_classes
    stored_network = "network" in metadata
    layer_config = (_layer_config_from_dict(metadata["layer_config"]) if stored_network
                    else zoo.default_layer_config(name))
    problems = _check_metadata(metadata, name, num_classes, layer_config)
    if problems:
        raise TeacherCheckpointError(f"teacher checkpoint {directory} does not fit {name}:\n  "
                                     + "\n  ".join(problems))
    if dtype is not None:
        layer_config = dataclasses.replace(layer_config, dtype=dtype)
    if stored_network:
        model = EfficientNet(spec=network_spec_from_dict(metadata["network"]),
                             num_classes=num_classes, layer_config=layer_config)
        name = name or str(metadata["model"])
    else:
        model = zoo.get_model(name, num_classes=num_classes, layer_config=layer_config)
    expected = expected_variables(model)
    variables_dir = os.path.join(directory, VARIABLES_DIR)
    if not files.isdir(variables_dir):
        raise TeacherCheckpointError(f"teacher checkpoint {directory}: {VARIABLES_DIR}/ is "
                                     "missing")
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    with ocp.StandardCheckpointer() as checkpointer:
        try:
            item = checkpointer.metadata(variables_dir).item_metadata
        except Exception as e:  # pylint: disable=broad-except  # orbax raises many kinds
            raise TeacherCheckpointError(f"teacher checkpoint {directory}: cannot read the "
                                         f"Orbax metadata of {variables_dir}: {e}") from e
        stored = getattr(item, "tree", None)
        if not stored:
            raise TeacherCheckpointError(
                f"teacher checkpoint {directory}: the Orbax checkpoint {variables_dir} has no "
                "readable array metadata (files missing or corrupt); convert or save it again")
        problems = compare_shapes(flat_shapes(stored), flat_shapes(expected))
        if problems:
            raise TeacherCheckpointError(f"teacher checkpoint {directory} does not fit {name} "
                                         f"({num_classes} classes):\n  " + "\n  ".join(problems))
        try:  # the shapes fit: are the bytes the ones written?
            integrity.verify(variables_dir, metadata.get("checksums"), "teacher checkpoint")
        except integrity.IntegrityError as e:
            raise TeacherCheckpointError(str(e)) from e
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                              expected)
        try:
            variables = checkpointer.restore(variables_dir, target)
        except Exception as e:  # pylint: disable=broad-except
            raise TeacherCheckpointError(f"teacher checkpoint {directory}: restoring "
                                         f"{variables_dir} failed: {type(e).__name__}: {e}") from e
    # On the host, one local shard per array (all of it when replicated): no compilation.
    bad = [k for k, v in traverse_util.flatten_dict(variables, sep="/").items()
           if not np.isfinite(np.asarray(v.addressable_shards[0].data)).all()]
    if bad:
        raise TeacherCheckpointError(f"teacher checkpoint {directory}: non-finite values in "
                                     + ", ".join(bad))
    return model, variables


def teacher_preprocessing(checkpoint_dir: str | os.PathLike) -> dict[str, Any]:
    """The input expectations stored with a teacher (resolution, mean, std, ...), if any."""
    return dict(read_teacher_metadata(checkpoint_dir).get("preprocessing", {}))


__all__ = ["TeacherCheckpointError", "save_teacher", "load_teacher", "read_teacher_metadata",
           "teacher_preprocessing", "teacher_network_spec", "network_spec_to_dict",
           "network_spec_from_dict", "expected_variables", "IMAGENET_MEAN", "IMAGENET_STD"]
