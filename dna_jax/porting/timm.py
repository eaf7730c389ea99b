"""timm (PyTorch) EfficientNet B0..B7 weights -> Flax variables, saved as a teacher checkpoint.

    python -m dna_jax.porting.timm --model tf_efficientnet_b7.ns_jft_in1k \
        --weights model.safetensors --out teachers/tf_efficientnet_b7 [--verify]

Supports `tf_efficientnet_b0..b7` (TF 'same' padding, BatchNorm eps 1e-3) and
`efficientnet_b0..b7` (symmetric padding, eps 1e-5), with or without a timm pretrained tag.
The conversion is an explicit name table built from our NetworkSpec: every Flax leaf must be
filled, every timm tensor (but `num_batches_tracked`) used, every shape must agree, and the
timm block layout must be the spec's; otherwise one `ConversionError` lists all problems.

torch is imported lazily and only to read `.pth`-style files or live modules; `.safetensors`
files are read with numpy, and the result loads with `dna_jax.teacher.load_teacher`, no torch.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import re
import sys
import time
from typing import Any, Callable, Mapping

import numpy as np

from dna_jax import files
from dna_jax import teacher
from dna_jax.models import zoo
from dna_jax.models.efficientnet import EFFICIENTNET_PARAMS
from dna_jax.netspec import NetworkSpec

SUPPORTED_MODELS = tuple(f"{prefix}{arch}" for prefix in ("tf_", "")
                         for arch in EFFICIENTNET_PARAMS)
# Top-level keys of training checkpoints that wrap the state dict, in the order tried.
WRAPPER_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema")
# Prefixes added by DataParallel / torch.compile.
STRIPPED_PREFIXES = ("module.", "_orig_mod.")
IGNORED_SUFFIX = "num_batches_tracked"


class ConversionError(ValueError):
    """timm weights that do not fit the requested Flax network (the message lists why)."""


@dataclasses.dataclass(frozen=True)
class TensorMapping:
    """One row of the name table: a timm tensor and the Flax leaf it becomes.

    Attributes:
      timm_key: state-dict key, e.g. 'blocks.1.0.conv_dw.weight'.
      flax_path: '/'-joined variable path, e.g. 'params/blocks_1/conv_dw/conv/kernel'.
      layout: 'conv' (OIHW -> HWIO; depthwise [C,1,k,k] -> [k,k,1,C]), 'dense' ([out,in] ->
        [in,out]) or 'vector' (as is).
    """

    timm_key: str
    flax_path: str
    layout: str


_LAYOUTS: dict[str, tuple[int, Callable[[np.ndarray], np.ndarray]]] = {
    "conv": (4, lambda x: np.transpose(x, (2, 3, 1, 0))),
    "dense": (2, lambda x: np.transpose(x, (1, 0))),
    "vector": (1, lambda x: x),
}


def split_model_name(name: str) -> tuple[str, str]:
    """'tf_efficientnet_b7.ns_jft_in1k' -> ('tf_efficientnet_b7', 'ns_jft_in1k').

    Raises:
      ValueError: for an architecture this converter does not handle.
    """
    arch, _, tag = name.partition(".")
    if arch not in SUPPORTED_MODELS:
        raise ValueError(f"cannot convert {name!r}: supported timm models are "
                         f"{', '.join(SUPPORTED_MODELS)} (optionally with a '.tag')")
    return arch, tag


def _conv_bn(rows: list[TensorMapping], timm_conv: str, timm_bn: str, flax: str) -> None:
    rows.append(TensorMapping(f"{timm_conv}.weight", f"params/{flax}/conv/kernel", "conv"))
    for timm_leaf, collection, flax_leaf in (("weight", "params", "scale"),
                                             ("bias", "params", "bias"),
                                             ("running_mean", "batch_stats", "mean"),
                                             ("running_var", "batch_stats", "var")):
        rows.append(TensorMapping(f"{timm_bn}.{timm_leaf}", f"{collection}/{flax}/bn/{flax_leaf}",
                                  "vector"))


def _squeeze_excite(rows: list[TensorMapping], timm: str, flax: str) -> None:
    for conv in ("conv_reduce", "conv_expand"):
        rows.append(TensorMapping(f"{timm}.se.{conv}.weight", f"params/{flax}/se/{conv}/kernel",
                                  "conv"))
        rows.append(TensorMapping(f"{timm}.se.{conv}.bias", f"params/{flax}/se/{conv}/bias",
                                  "vector"))


def timm_name_table(spec: NetworkSpec, num_classes: int) -> list[TensorMapping]:
    """Every timm EfficientNet tensor of `spec` and the Flax leaf it fills, in network order.

    timm -> Flax: conv_stem/bn1 -> stem; blocks.{stage}.{index} -> blocks_{k} (k = the flat
    layer index); 'ir' blocks: conv_pw/bn1, conv_dw/bn2, se, conv_pwl/bn3; 'ds' blocks:
    conv_dw/bn1, se, conv_pw/bn2; conv_head/bn2 -> head; classifier -> classifier.
    """
    rows: list[TensorMapping] = []
    _conv_bn(rows, "conv_stem", "bn1", "stem")
    for k, (stage, index, _, layer) in enumerate(spec.layers_with_inputs()):
        timm, flax = f"blocks.{stage}.{index}", f"blocks_{k}"
        if layer.kind == "ir":
            _conv_bn(rows, f"{timm}.conv_pw", f"{timm}.bn1", f"{flax}/conv_pw")
            _conv_bn(rows, f"{timm}.conv_dw", f"{timm}.bn2", f"{flax}/conv_dw")
            if layer.se_ratio:
                _squeeze_excite(rows, timm, flax)
            _conv_bn(rows, f"{timm}.conv_pwl", f"{timm}.bn3", f"{flax}/conv_pwl")
        else:
            _conv_bn(rows, f"{timm}.conv_dw", f"{timm}.bn1", f"{flax}/conv_dw")
            if layer.se_ratio:
                _squeeze_excite(rows, timm, flax)
            _conv_bn(rows, f"{timm}.conv_pw", f"{timm}.bn2", f"{flax}/conv_pw")
    _conv_bn(rows, "conv_head", "bn2", "head")
    if num_classes:
        rows.append(TensorMapping("classifier.weight", "params/classifier/kernel", "dense"))
        rows.append(TensorMapping("classifier.bias", "params/classifier/bias", "vector"))
    return rows


def block_layout_problems(spec: NetworkSpec, shapes: Mapping[str, tuple[int, ...]],
                          label: str | None = None) -> list[str]:
    """Differences between timm's block layout (read off the tensor names/shapes) and `spec`.

    Checks the number of stages, blocks per stage, and per block its kind ('ir' has conv_pwl),
    depthwise kernel and output channels; plus stem and head widths. `label` names the
    network in messages (default: the spec's name).
    """
    label = label or spec.name
    problems = []
    depths: dict[int, set[int]] = collections.defaultdict(set)
    for key in shapes:
        match = re.match(r"^blocks\.(\d+)\.(\d+)\.", key)
        if match:
            depths[int(match.group(1))].add(int(match.group(2)))
    timm_depths = [len(depths.get(s, ())) for s in range(max(depths, default=-1) + 1)]
    if tuple(timm_depths) != spec.stage_depths:
        problems.append(f"blocks per stage: timm {timm_depths}, {label} "
                        f"{list(spec.stage_depths)}")
    for name, key, wanted in (("stem", "conv_stem.weight", spec.stem_channels),
                              ("head", "conv_head.weight", spec.head_channels)):
        if key in shapes and shapes[key][0] != wanted:
            problems.append(f"{name} channels: timm {shapes[key][0]}, {label} {wanted}")
    for stage, index, _, layer in spec.layers_with_inputs():
        timm = f"blocks.{stage}.{index}"
        if index not in depths.get(stage, ()):
            continue  # already reported through the depths
        kind = "ir" if f"{timm}.conv_pwl.weight" in shapes else "ds"
        if kind != layer.kind:
            problems.append(f"{timm}: timm block is '{kind}', {label} has '{layer.kind}'")
            continue
        dw = shapes.get(f"{timm}.conv_dw.weight")
        if dw is not None and len(dw) == 4 and dw[-1] != layer.kernel:
            problems.append(f"{timm}: timm kernel {dw[-1]}, {label} k{layer.kernel}")
        out = shapes.get(f"{timm}.{'conv_pwl' if kind == 'ir' else 'conv_pw'}.weight")
        if out is not None and out[0] != layer.out_channels:
            problems.append(f"{timm}: timm outputs {out[0]} channels, {label} "
                            f"c{layer.out_channels}")
    return problems


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; bfloat16/half have no numpy twin
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def _unwrap(obj: Mapping[str, Any], key: str | None) -> tuple[Mapping[str, Any], str]:
    if key:
        if key not in obj:
            raise ConversionError(f"the checkpoint has no '{key}' entry; its top-level keys: "
                                  f"{sorted(obj)[:20]}")
        return obj[key], key
    if any(k.endswith(".weight") for k in obj):
        return obj, ""
    for candidate in WRAPPER_KEYS:
        if isinstance(obj.get(candidate), Mapping):
            return obj[candidate], candidate
    raise ConversionError(f"cannot find a state dict: no '*.weight' keys and none of "
                          f"{WRAPPER_KEYS}; top-level keys: {sorted(obj)[:20]}")


def _read_safetensors(path: str) -> Mapping[str, Any]:
    """numpy first (no torch); torch for dtypes numpy lacks (bfloat16)."""
    from safetensors import numpy as st_numpy  # pylint: disable=import-outside-toplevel
    try:
        return st_numpy.load_file(path)
    except Exception as numpy_error:  # pylint: disable=broad-except
        try:
            from safetensors import torch as st_torch  # pylint: disable=import-outside-toplevel
            return st_torch.load_file(path)
        except Exception:  # pylint: disable=broad-except
            raise ConversionError(f"cannot read safetensors file {path}: "
                                  f"{numpy_error}") from numpy_error


def read_state_dict(source: Any, key: str | None = None, allow_pickle: bool = False,
                    ) -> tuple[dict[str, np.ndarray], str]:
    """Reads timm weights as {name: float32 numpy array}.

    Args:
      source: a `.safetensors` file (read without torch), a torch file (`.pth`, `.pth.tar`,
        `.pt`, `.bin`, ...; the state dict may be wrapped in 'state_dict' / 'model'), a live
        `torch.nn.Module`, or a mapping of tensors/arrays.
      key: the wrapper entry to use (default: the tensors themselves, else the first of
        WRAPPER_KEYS present).
      allow_pickle: let `torch.load` run arbitrary pickled code (only for trusted training
        checkpoints that store more than tensors, e.g. timm's `args`).

    Returns:
      (state dict, description of where it came from).
    """
    if hasattr(source, "state_dict") and callable(source.state_dict):
        obj, origin = source.state_dict(), f"live module {type(source).__name__}"
    elif isinstance(source, Mapping):
        obj, origin = source, "in-memory state dict"
    else:
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"timm weights file {path} does not exist")
        origin = os.path.abspath(path)
        if path.endswith(".safetensors"):
            obj = _read_safetensors(path)
        else:
            import torch  # pylint: disable=import-outside-toplevel
            try:
                obj = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
            except Exception as e:  # pylint: disable=broad-except
                hint = "" if allow_pickle else (" (a training checkpoint that pickles more than "
                                                "tensors needs --allow-pickle, if you trust it)")
                raise ConversionError(f"cannot read torch file {path}: {e}{hint}") from e
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{origin} holds a {type(obj).__name__}, not a state dict")
    obj, used_key = _unwrap(obj, key)
    if used_key:
        origin += f" ['{used_key}']"
    state = {}
    for name, value in obj.items():
        for prefix in STRIPPED_PREFIXES:
            name = name.removeprefix(prefix)
        array = _to_numpy(value)
        if np.issubdtype(array.dtype, np.floating):
            array = array.astype(np.float32)
        state[name] = array
    return state, origin


def convert_state_dict(name: str, state_dict: Mapping[str, Any],
                       num_classes: int | None = None) -> dict[str, Any]:
    """timm EfficientNet weights -> our `{'params', 'batch_stats'}` (nested dicts of numpy).

    Args:
      name: timm model name (e.g. 'tf_efficientnet_b0', tags allowed); picks the NetworkSpec
        and layer options (`zoo.get_model`).
      state_dict: timm tensors or arrays by name (see `read_state_dict`).
      num_classes: classifier outputs (default: read off 'classifier.weight'; 0 if absent).

    Raises:
      ConversionError: listing every layout problem, missing/unused tensor and shape mismatch.
    """
    arch, _ = split_model_name(name)
    state = {k: _to_numpy(v) for k, v in state_dict.items()}
    if num_classes is None:
        num_classes = int(state["classifier.weight"].shape[0]) if "classifier.weight" in state \
            else 0
    model = zoo.get_model(arch, num_classes=num_classes)
    expected = teacher.flat_shapes(teacher.expected_variables(model))
    shapes = {k: tuple(v.shape) for k, v in state.items()}

    problems = [f"layout: {p}" for p in block_layout_problems(model.spec, shapes, arch)]
    flat: dict[str, np.ndarray] = {}
    table = timm_name_table(model.spec, num_classes)
    for row in table:
        if row.timm_key not in state:
            problems.append(f"missing timm tensor: {row.timm_key} (for {row.flax_path})")
            continue
        ndim, transform = _LAYOUTS[row.layout]
        value = state[row.timm_key]
        if value.ndim != ndim:
            problems.append(f"shape: {row.timm_key} {shapes[row.timm_key]} is not a "
                            f"{row.layout} tensor ({ndim}-d) for {row.flax_path}")
            continue
        value = np.ascontiguousarray(transform(value), dtype=np.float32)
        if row.flax_path not in expected:
            problems.append(f"no such Flax leaf: {row.flax_path} (for {row.timm_key})")
            continue
        wanted = expected[row.flax_path][0]
        if value.shape != wanted:
            problems.append(f"shape: {row.timm_key} {shapes[row.timm_key]} -> {row.flax_path} "
                            f"{value.shape}, the network expects {wanted}")
            continue
        flat[row.flax_path] = value
    used = {row.timm_key for row in table}
    for key in sorted(state):
        if key not in used and not key.endswith(IGNORED_SUFFIX):
            problems.append(f"unused timm tensor: {key} {shapes[key]}")
    for path in sorted(expected.keys() - {row.flax_path for row in table}):
        problems.append(f"no timm source for Flax leaf: {path}")
    if problems:
        counts = collections.Counter(p.split(":")[0] for p in problems)
        raise ConversionError(
            f"timm weights do not fit {arch} ({num_classes} classes): {len(problems)} "
            f"problem(s) ({', '.join(f'{n} {kind}' for kind, n in counts.items())}):\n  "
            + "\n  ".join(problems))
    variables: dict[str, Any] = {c: {} for c in teacher.COLLECTIONS}
    for path, value in flat.items():
        node = variables
        *parents, leaf = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return variables


def timm_preprocessing(name: str) -> dict[str, Any]:
    """Input expectations of a timm model: from timm's pretrained config when timm is installed,
    else EfficientNet's published resolution with ImageNet mean/std."""
    arch, _ = split_model_name(name)
    try:
        from timm.models import get_pretrained_cfg  # pylint: disable=import-outside-toplevel
        cfg = get_pretrained_cfg(name)
    except Exception:  # pylint: disable=broad-except  # timm absent or unusable
        cfg = None
    if cfg is None:
        size = EFFICIENTNET_PARAMS[arch.removeprefix("tf_")][2]
        return {"input_size": [3, size, size], "mean": list(teacher.IMAGENET_MEAN),
                "std": list(teacher.IMAGENET_STD), "from": "defaults (timm not installed)"}
    return {"input_size": list(cfg.input_size), "mean": list(cfg.mean), "std": list(cfg.std),
            "interpolation": cfg.interpolation, "crop_pct": cfg.crop_pct,
            "from": f"timm pretrained_cfg of {name}"}


def compare_with_timm(torch_model: Any, model: Any, variables: Mapping[str, Any],
                      images: np.ndarray) -> tuple[dict[str, float], dict[str, float]]:
    """Runs timm and Flax on the same images; max abs difference of every output.

    Stage outputs are taken with forward hooks on timm's `bn1` (stem) and `blocks[i]`.

    Args:
      torch_model: the timm EfficientNet (switched to eval mode here).
      model: our EfficientNet module; `variables` its converted weights.
      images: float32 NCHW (PyTorch's layout); Flax gets them as NHWC.

    Returns:
      ({'logits': err, 'stem': err, 'stage0': err, ...}, the same keys -> max |timm output|),
      computed in float32 with the highest matmul precision.
    """
    import jax  # pylint: disable=import-outside-toplevel
    import torch  # pylint: disable=import-outside-toplevel

    torch_model.eval()
    taps: dict[str, np.ndarray] = {}

    def tap(name):
        return lambda _module, _inputs, output: taps.__setitem__(name, output.detach().numpy())

    hooks = [torch_model.bn1.register_forward_hook(tap("stem"))]
    hooks += [block.register_forward_hook(tap(f"stage{i}"))
              for i, block in enumerate(torch_model.blocks)]
    try:
        with torch.no_grad():
            taps["logits"] = torch_model(torch.from_numpy(images)).numpy()
    finally:
        for hook in hooks:
            hook.remove()
    with jax.default_matmul_precision("highest"):
        logits, features = jax.jit(model.apply)(variables, np.transpose(images, (0, 2, 3, 1)))
    ours = {"logits": np.asarray(logits)}
    ours.update({k: np.transpose(np.asarray(v), (0, 3, 1, 2)) for k, v in features.items()
                 if k == "stem" or k.startswith("stage")})
    if ours.keys() != taps.keys():
        raise ValueError(f"outputs differ: timm {sorted(taps)}, flax {sorted(ours)}")
    errors, scales = {}, {}
    for key in ours:
        if ours[key].shape != taps[key].shape:
            raise ValueError(f"{key}: timm shape {taps[key].shape}, flax {ours[key].shape}")
        errors[key] = float(np.max(np.abs(ours[key] - taps[key])))
        scales[key] = float(np.max(np.abs(taps[key])))
    return errors, scales


def verify_against_timm(name: str, state_dict: Mapping[str, np.ndarray],
                        variables: Mapping[str, Any], image_size: int = 128, batch: int = 2,
                        seed: int = 0) -> dict[str, Any]:
    """Loads the same weights into timm (random init, no download) and compares outputs.

    Returns:
      {'max_abs_error': {output: err}, 'max_abs_timm': {output: max |timm output|},
       'image_size': ...}.
    """
    import timm  # pylint: disable=import-outside-toplevel
    import torch  # pylint: disable=import-outside-toplevel

    arch, _ = split_model_name(name)
    num_classes = int(state_dict["classifier.weight"].shape[0]) \
        if "classifier.weight" in state_dict else 0
    torch_model = timm.create_model(arch, pretrained=False, num_classes=num_classes)
    torch_model.load_state_dict({k: torch.from_numpy(np.asarray(v))
                                 for k, v in state_dict.items()}, strict=True)
    images = np.random.default_rng(seed).standard_normal(
        (batch, 3, image_size, image_size)).astype(np.float32)
    model = zoo.get_model(arch, num_classes=num_classes)
    errors, scales = compare_with_timm(torch_model, model, variables, images)
    return {"max_abs_error": errors, "max_abs_timm": scales, "image_size": image_size}


def convert_checkpoint(name: str, weights: Any, out: str | os.PathLike,
                       num_classes: int | None = None, key: str | None = None,
                       allow_pickle: bool = False, overwrite: bool = False,
                       verify_size: int = 0, log: Callable[[str], None] = print,
                       ) -> dict[str, Any]:
    """Reads timm weights, converts them, saves a teacher checkpoint; returns a summary.

    Args:
      name: timm model name (tags allowed, e.g. 'tf_efficientnet_b7.ns_jft_in1k').
      weights: file path, live module or state dict (see `read_state_dict`).
      out: teacher checkpoint directory to write.
      num_classes: classifier outputs (default: from the weights).
      key: wrapper entry of a training checkpoint (default: auto).
      allow_pickle: see `read_state_dict`.
      overwrite: replace an existing `out`.
      verify_size: if > 0, also run timm (needs timm) and Flax on random images of this size
        and report the max abs differences.
      log: where the human-readable lines go.

    Returns:
      The summary (also the teacher.json 'source' entry, in part).
    """
    start = time.time()
    arch, tag = split_model_name(name)
    state, origin = read_state_dict(weights, key=key, allow_pickle=allow_pickle)
    log(f"read {len(state)} tensors from {origin}")
    variables = convert_state_dict(name, state, num_classes)
    num_classes = int(variables["params"]["classifier"]["kernel"].shape[1]) \
        if "classifier" in variables["params"] else 0
    ignored = sum(k.endswith(IGNORED_SUFFIX) for k in state)
    leaves = teacher.flat_shapes(variables)
    used = len(state) - ignored
    log(f"converted {used} tensors to {len(leaves)} Flax leaves ({ignored} '{IGNORED_SUFFIX}' "
        f"ignored); {arch}: {zoo.default_layer_config(arch)}")
    preprocessing = timm_preprocessing(name)
    source = {"timm_model": name, "weights": origin, "num_tensors": len(state),
              "num_tensors_used": used}
    summary: dict[str, Any] = {"model": name, "arch": arch, "tag": tag or None,
                               "num_classes": num_classes, "weights": origin,
                               "num_tensors": len(state), "num_tensors_used": used,
                               "num_flax_leaves": len(leaves)}
    if verify_size:
        parity = verify_against_timm(name, state, variables, image_size=verify_size)
        log("parity with timm (max abs error): " + ", ".join(
            f"{k} {v:.2e}" for k, v in parity["max_abs_error"].items()))
        summary["parity"] = parity
        source["parity"] = parity
    metadata = teacher.save_teacher(out, arch, variables, num_classes, source=source,
                                    preprocessing=preprocessing, overwrite=overwrite)
    summary.update(params=metadata["param_count"], out=files.absolute(out),
                   preprocessing=preprocessing, seconds=round(time.time() - start, 2))
    log(f"saved {metadata['param_count']:,} parameters to {summary['out']} "
        f"(input {preprocessing['input_size']}, mean {preprocessing['mean']}, "
        f"std {preprocessing['std']})")
    return summary


def main(argv: list[str] | None = None) -> int:
    """Command line: convert, print a summary; the last line is one JSON object."""
    parser = argparse.ArgumentParser(
        prog="python -m dna_jax.porting.timm",
        description="Convert timm EfficientNet weights into a dna_jax teacher checkpoint.")
    parser.add_argument("--model", required=True,
                        help="timm name, e.g. tf_efficientnet_b0 or efficientnet_b3.ra2_in1k")
    parser.add_argument("--weights", required=True,
                        help=".safetensors, .pth, .pth.tar (state_dict/model inside), .bin")
    parser.add_argument("--out", required=True, help="teacher checkpoint directory to write")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="classifier outputs (default: read off the weights)")
    parser.add_argument("--key", default=None, help="wrapper entry of a training checkpoint")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="torch.load with weights_only=False (trusted files only)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--verify", type=int, nargs="?", const=128, default=0,
                        metavar="SIZE", help="compare with timm on random SIZE px images "
                        "(default 128; needs timm)")
    args = parser.parse_args(argv)
    summary = convert_checkpoint(args.model, args.weights, args.out, args.num_classes,
                                 key=args.key, allow_pickle=args.allow_pickle,
                                 overwrite=args.overwrite, verify_size=args.verify)
    files.write_text(os.path.join(summary["out"], "conversion.json"),
                     json.dumps(summary, indent=2, sort_keys=True) + "\n")
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
