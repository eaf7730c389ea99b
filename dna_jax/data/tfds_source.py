"""tf.data pipelines over any TFDS dataset (imagenet2012, cifar10, fashion_mnist, ...).

Train: per-process split -> file shuffle and shuffle buffer seeded per epoch -> repeat ->
decode + augment (stateless, seeded by (seed, epoch, index)) -> batch -> prefetch. Because
every random choice is seeded, step s of a resumed run sees the same batch as step s of an
uninterrupted one; resuming skips the undecoded records of the current epoch.
Eval: one ordered pass, resized and centre-cropped, padded to whole batches with `mask` 0.
"""

import functools
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from dna_jax.data.fashion_mnist import DataNotFoundError

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


@functools.cache
def import_tf() -> Any:
    """Imports TensorFlow for tf.data only, hiding every accelerator from it."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    tf.config.set_visible_devices([], "GPU")
    return tf


def _hint(name: str, data_dir: str) -> str:
    manual = ""
    if name.startswith("imagenet"):
        manual = (f" (ImageNet needs ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in "
                  f"{data_dir}/downloads/manual first)")
    return (
        f"TFDS dataset {name!r} is not prepared in {data_dir!r}. Prepare it once with "
        f"`tfds build {name} --data_dir={data_dir}`{manual}, point data.data_dir or "
        "$TFDS_DATA_DIR at a prepared copy (local or gs://), or set data.download=True to let "
        "TFDS download it. Without a network, use data.source='fashion_mnist' (offline idx "
        "files) or 'synthetic'."
    )


def get_builder(name: str, data_dir: str, download: bool) -> Any:
    """Returns a prepared TFDS builder, failing fast with a preparation hint.

    Args:
        name: TFDS name, optionally with config/version ("cifar10", "imagenet2012:5.1.0").
        data_dir: TFDS data dir; '' means $TFDS_DATA_DIR or TFDS's default.
        download: whether a missing dataset may be downloaded and prepared now.

    Raises:
        DataNotFoundError: not prepared and download is False.
    """
    data_dir = data_dir or os.environ.get("TFDS_DATA_DIR") or None
    local_dir = data_dir or os.path.expanduser("~/tensorflow_datasets")
    base_name = name.split(":")[0].split("/")[0]
    if not download and "://" not in local_dir and not os.path.isdir(
            os.path.join(local_dir, base_name)):
        raise DataNotFoundError(_hint(name, local_dir))  # Before the slow TensorFlow import.
    import_tf()
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
    if not builder.is_prepared():
        if not download:
            raise DataNotFoundError(_hint(name, str(builder.data_dir_root)))
        builder.download_and_prepare()
    return builder


def num_examples(builder: Any, split: str) -> int:
    """Examples in a split (slices allowed); falls back to the dataset's cardinality."""
    try:
        return int(builder.info.splits[split].num_examples)
    except (KeyError, ValueError, TypeError):
        cardinality = int(builder.as_dataset(split=split).cardinality())
        if cardinality < 0:
            raise ValueError(f"Cannot count the examples of {builder.name} {split!r}.") from None
        return cardinality


def process_split(split: str, process_index: int, process_count: int,
                  drop_remainder: bool) -> Any:
    """This process's disjoint part of `split` (an even split over processes)."""
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    return tfds.even_splits(split, n=process_count, drop_remainder=drop_remainder)[process_index]


def _decode(image: Any, channels: int) -> Any:
    tf = import_tf()
    if image.dtype == tf.string:
        image = tf.io.decode_image(image, channels=channels, expand_animations=False)
    return image


def _to_channels(image: Any, channels: int) -> Any:
    tf = import_tf()
    if channels == 3 and image.shape[-1] == 1:
        image = tf.image.grayscale_to_rgb(image)
    return image


def _random_resized_crop(image: Any, seed: Any, size: int, min_area: float) -> Any:
    """Inception-style crop: random area in [min_area, 1], aspect in [3/4, 4/3], then resize."""
    tf = import_tf()
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), bounding_boxes=tf.zeros([1, 0, 4]), seed=seed,
        area_range=(min_area, 1.0), aspect_ratio_range=(3 / 4, 4 / 3),
        max_attempts=10, use_image_if_no_bounding_boxes=True)
    image = tf.slice(image, begin, crop_size)
    image = tf.image.resize(image, (size, size), method="bicubic", antialias=True)
    return tf.clip_by_value(image, 0.0, 255.0)  # Bicubic overshoots; keep the uint8 range.


def _pad_crop(image: Any, seed: Any, size: int, padding: int) -> Any:
    """CIFAR-style: resize to size, zero-pad by `padding`, random crop back to size."""
    tf = import_tf()
    image = tf.cast(image, tf.float32)
    if image.shape[0] != size or image.shape[1] != size:
        image = tf.image.resize(image, (size, size), antialias=True)
    image = tf.pad(image, [[padding, padding], [padding, padding], [0, 0]])
    return tf.image.stateless_random_crop(image, (size, size, tf.shape(image)[-1]), seed=seed)


def _centre_crop(image: Any, size: int, crop_pct: float) -> Any:
    """Resize the shorter side to size / crop_pct, then take the central size x size."""
    tf = import_tf()
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = (size / crop_pct) / tf.reduce_min(shape)
    resized = tf.cast(tf.math.ceil(shape * scale), tf.int32)
    image = tf.image.resize(image, resized, method="bicubic", antialias=True)
    top = (resized[0] - size) // 2
    left = (resized[1] - size) // 2
    image = tf.clip_by_value(image, 0.0, 255.0)  # Bicubic overshoots; keep the uint8 range.
    return tf.image.crop_to_bounding_box(image, top, left, size, size)


def _preprocess(example: dict[str, Any], seed: Any, *, training: bool, cfg: Any,
                size: int, channels: int, mean: Sequence[float], std: Sequence[float]) -> dict:
    tf = import_tf()
    image = _decode(example["image"], channels)
    image = _to_channels(image, channels)
    if training and cfg.augment == "imagenet":
        crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        image = _random_resized_crop(image, crop_seed, size, cfg.min_area)
        image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    elif training and cfg.augment in ("crop_flip", "flip"):
        crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        padding = cfg.crop_padding if cfg.augment == "crop_flip" else 0
        image = _pad_crop(image, crop_seed, size, padding)
        image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    elif training and cfg.augment != "none":
        raise ValueError(f"Unknown augment {cfg.augment!r}.")
    elif image.shape[0] == size and image.shape[1] == size and cfg.crop_pct == 1.0:
        image = tf.cast(image, tf.float32)
    else:
        image = _centre_crop(image, size, cfg.crop_pct)
    image = (tf.cast(image, tf.float32) - tf.constant(mean, tf.float32)) / tf.constant(
        std, tf.float32)
    image = tf.ensure_shape(image, (size, size, channels))
    return {"image": image, "label": tf.cast(example["label"], tf.int32)}


def _as_dataset(builder: Any, split: Any, shuffle_seed: int | None) -> Any:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed, try_autocache=False)
    image_feature = builder.info.features["image"]
    decoders = None
    if getattr(image_feature, "encoding_format", None) in ("jpeg", "png") or (
            type(image_feature).__name__ == "Image"):
        decoders = {"image": tfds.decode.SkipDecoding()}
    return builder.as_dataset(split=split, shuffle_files=shuffle_seed is not None,
                              read_config=read_config, decoders=decoders)


def train_batches(builder: Any, split: Any, *, cfg: Any, local_batch_size: int,
                  steps_per_epoch: int, seed: int, process_index: int, start_step: int,
                  size: int, channels: int, mean: Sequence[float],
                  std: Sequence[float]) -> Iterator[dict[str, np.ndarray]]:
    """Endless training batches of this process from start_step on (one tf.data per epoch)."""
    tf = import_tf()
    epoch, position = divmod(start_step, steps_per_epoch)
    while True:
        epoch_seed = (seed * 1_000_003 + epoch * 7919 + process_index) % (2**31 - 1)
        ds = _as_dataset(builder, split, shuffle_seed=epoch_seed)
        ds = ds.shuffle(cfg.shuffle_buffer, seed=epoch_seed, reshuffle_each_iteration=False)
        ds = ds.take(steps_per_epoch * local_batch_size).enumerate()
        ds = ds.skip(position * local_batch_size)  # Before decoding: resume is cheap.
        base = tf.constant([seed, epoch * 65_537 + process_index], tf.int64)

        def map_fn(index, example, base=base):
            example_seed = tf.random.experimental.stateless_fold_in(base, index)
            return _preprocess(example, example_seed, training=True, cfg=cfg, size=size,
                               channels=channels, mean=mean, std=std)

        ds = ds.map(map_fn, num_parallel_calls=cfg.num_parallel_calls)
        ds = ds.batch(local_batch_size, drop_remainder=True).prefetch(cfg.prefetch)
        yield from ds.as_numpy_iterator()
        epoch, position = epoch + 1, 0


def eval_batches(builder: Any, split: Any, *, cfg: Any, local_batch_size: int,
                 num_batches: int, size: int, channels: int, mean: Sequence[float],
                 std: Sequence[float]) -> Iterator[dict[str, np.ndarray]]:
    """One ordered pass over this process's part, padded to num_batches whole batches."""
    tf = import_tf()
    preprocess = functools.partial(_preprocess, seed=None, training=False, cfg=cfg, size=size,
                                   channels=channels, mean=mean, std=std)
    ds = _as_dataset(builder, split, shuffle_seed=None)
    ds = ds.map(lambda ex: {**preprocess(ex), "mask": tf.constant(1.0)},
                num_parallel_calls=cfg.num_parallel_calls)
    padding = tf.data.Dataset.from_tensors({
        "image": tf.zeros((size, size, channels), tf.float32),
        "label": tf.constant(0, tf.int32),
        "mask": tf.constant(0.0),
    }).repeat()
    ds = ds.concatenate(padding).take(num_batches * local_batch_size)
    ds = ds.batch(local_batch_size, drop_remainder=True).prefetch(cfg.prefetch)
    yield from ds.as_numpy_iterator()


def image_spec(builder: Any) -> tuple[int, int, int, int]:
    """(height, width, channels, num_classes) from the builder's features (0 if variable)."""
    features = builder.info.features
    shape = features["image"].shape
    height, width, channels = (int(d) if d is not None else 0 for d in shape)
    return height, width, channels, int(features["label"].num_classes)


def local_eval_batches(num_examples_total: int, process_count: int, local_batch_size: int
                       ) -> int:
    """Eval batches per process: the same on every process, enough for the largest part."""
    largest_part = math.ceil(num_examples_total / process_count)
    return max(1, math.ceil(largest_part / local_batch_size))
