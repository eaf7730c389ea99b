"""Two-view (BYOL-style) augmentations for self-supervised training (DNA++, `dna_jax.ssl`).

Every image of a batch is augmented `num_views` times; view v uses the probabilities of view
type `v % 2` (BYOL's asymmetric pair: blur always on the first view and rarely on the second,
solarisation only on the second). Per view, in this order: random resized crop (area in
[crop_min_area, 1], aspect ratio log-uniform in [3/4, 4/3], bilinear resize), horizontal
flip, colour jitter with probability `jitter_prob` (brightness, contrast, saturation, hue),
grayscale, Gaussian blur, solarisation.

Grayscale sources (Fashion-MNIST tiled to 3 channels): R = G = B, so saturation, hue and
grayscale change nothing and colour jitter reduces to brightness and contrast.

Two implementations with the same recipe: numpy for the in-memory sources (offline
Fashion-MNIST, synthetic; every batch a pure function of (seed, step, process), so resumed
runs replay it) and TensorFlow stateless ops for TFDS sources. Batches are
{'views': float32 [B, V, H, W, C] normalised, 'label': int32 [B]}; the batch axis comes
first so batches shard over the mesh like any other.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from typing import Any

import ml_collections
import numpy as np

from dna_jax.data import fashion_mnist, in_memory, tfds_source
from dna_jax.data.pipeline import Dataset, DatasetInfo, _normalisation


def get_default_config() -> ml_collections.ConfigDict:
    """The augmentation recipe (BYOL's); pairs are (first view type, second view type).

    Fields:
      crop_min_area: smallest crop area fraction of the random resized crop.
      flip_prob: horizontal flip probability.
      jitter_prob: probability of colour jitter; its strengths `brightness`, `contrast`,
        `saturation` (factors drawn in [1 - s, 1 + s]) and `hue` (rotation in [-h, h] turns).
      grayscale_prob: probability of converting to grayscale.
      blur_prob: per view type; `blur_sigma`: (min, max) in pixels of the output image
        (BYOL: 0.1-2.0 at 224 px).
      solarize_prob: per view type (pixels >= 128 inverted).
    """
    return ml_collections.ConfigDict(dict(
        crop_min_area=0.08,
        flip_prob=0.5,
        jitter_prob=0.8,
        brightness=0.4,
        contrast=0.4,
        saturation=0.2,
        hue=0.1,
        grayscale_prob=0.2,
        blur_prob=(1.0, 0.1),
        blur_sigma=(0.1, 2.0),
        solarize_prob=(0.0, 0.2),
    ))


# ---- numpy (in-memory sources) -----------------------------------------------------------------


def _crop_boxes(rng: np.random.Generator, n: int, height: int, width: int,
                min_area: float) -> np.ndarray:
    """[n, 4] (top, left, h, w) float boxes; 10 tries per image, else the whole image."""
    boxes = np.tile(np.asarray([0.0, 0.0, height, width]), (n, 1))
    done = np.zeros(n, bool)
    for _ in range(10):
        area = rng.uniform(min_area, 1.0, n) * height * width
        ratio = np.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3), n))
        w, h = np.sqrt(area * ratio), np.sqrt(area / ratio)
        fits = ~done & (w <= width) & (h <= height)
        top = rng.uniform(0, 1, n) * (height - h)
        left = rng.uniform(0, 1, n) * (width - w)
        boxes[fits] = np.stack([top, left, h, w], 1)[fits]
        done |= fits
    return boxes


def _resized_crops(images: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resampling of each box of float [n, H, W, C] images to size x size."""
    n, height, width, _ = images.shape
    grid = (np.arange(size) + 0.5) / size
    ys = boxes[:, :1] + grid[None] * boxes[:, 2:3] - 0.5  # [n, S]
    xs = boxes[:, 1:2] + grid[None] * boxes[:, 3:4] - 0.5
    ys, xs = np.clip(ys, 0, height - 1), np.clip(xs, 0, width - 1)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, height - 1), np.minimum(x0 + 1, width - 1)
    wy, wx = (ys - y0)[:, :, None, None], (xs - x0)[:, None, :, None]
    index = np.arange(n)[:, None, None]

    def at(y, x):
        return images[index, y[:, :, None], x[:, None, :]]

    top = at(y0, x0) * (1 - wx) + at(y0, x1) * wx
    bottom = at(y1, x0) * (1 - wx) + at(y1, x1) * wx
    return top * (1 - wy) + bottom * wy


_GRAY = np.asarray([0.299, 0.587, 0.114], np.float32)


def _gray(x: np.ndarray) -> np.ndarray:
    """[..., H, W, C] -> [..., H, W, 1] luma (the image itself when single-channel)."""
    return x if x.shape[-1] == 1 else (x @ _GRAY)[..., None]


def _rotate_hue(x: np.ndarray, turns: float) -> np.ndarray:
    """Hue rotation of an RGB image in YIQ space by `turns` of a full turn."""
    to_yiq = np.asarray([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322],
                         [0.211, -0.523, 0.312]], np.float32)
    angle = 2 * math.pi * turns
    rotate = np.asarray([[1, 0, 0], [0, math.cos(angle), -math.sin(angle)],
                         [0, math.sin(angle), math.cos(angle)]], np.float32)
    matrix = np.linalg.inv(to_yiq) @ rotate @ to_yiq
    return x @ matrix.T.astype(np.float32)


def _jitter(x: np.ndarray, rng: np.random.Generator, cfg: Any) -> np.ndarray:
    """Brightness, contrast, saturation, hue of one float [H, W, C] image in 0..255."""
    x = x * rng.uniform(1 - cfg.brightness, 1 + cfg.brightness)
    mean = _gray(x).mean()
    x = (x - mean) * rng.uniform(1 - cfg.contrast, 1 + cfg.contrast) + mean
    if x.shape[-1] == 3:
        gray = _gray(x)
        x = gray + (x - gray) * rng.uniform(1 - cfg.saturation, 1 + cfg.saturation)
        x = _rotate_hue(x, rng.uniform(-cfg.hue, cfg.hue))
    return np.clip(x, 0, 255)


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of one float [H, W, C] image (reflect padding)."""
    radius = max(1, int(math.ceil(3 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps = (taps / taps.sum()).astype(np.float32)
    height, width = x.shape[:2]
    padded = np.pad(x, ((radius, radius), (0, 0), (0, 0)), mode="reflect" if height > radius
                    else "edge")
    x = sum(t * padded[i:i + height] for i, t in enumerate(taps))
    padded = np.pad(x, ((0, 0), (radius, radius), (0, 0)), mode="reflect" if width > radius
                    else "edge")
    return sum(t * padded[:, i:i + width] for i, t in enumerate(taps))


def augment_views(images: np.ndarray, rng: np.random.Generator, num_views: int, size: int,
                  cfg: Any) -> np.ndarray:
    """`num_views` augmented views of uint8 [B, H, W, C] images: float32 [B, V, S, S, C]
    on the 0..255 scale (see the module docstring for the recipe)."""
    batch = len(images)
    source = images.astype(np.float32)
    out = np.empty((batch, num_views, size, size, images.shape[-1]), np.float32)
    for v in range(num_views):
        kind = v % 2
        boxes = _crop_boxes(rng, batch, images.shape[1], images.shape[2], cfg.crop_min_area)
        views = _resized_crops(source, boxes, size)
        flips = rng.random(batch) < cfg.flip_prob
        views[flips] = views[flips, :, ::-1]
        jitter = rng.random(batch) < cfg.jitter_prob
        gray = rng.random(batch) < cfg.grayscale_prob
        blur = rng.random(batch) < cfg.blur_prob[kind]
        sigma = rng.uniform(*cfg.blur_sigma, batch)
        solarize = rng.random(batch) < cfg.solarize_prob[kind]
        for i in range(batch):
            x = views[i]
            if jitter[i]:
                x = _jitter(x, rng, cfg)
            if gray[i]:
                x = np.broadcast_to(_gray(x), x.shape)
            if blur[i]:
                x = _blur(x, sigma[i])
            if solarize[i]:
                x = np.where(x >= 128, 255 - x, x)
            out[i, v] = x
    return out


def _normalise(views: np.ndarray, channels: int, mean: Sequence[float],
               std: Sequence[float]) -> np.ndarray:
    if views.shape[-1] != channels:
        views = np.repeat(views, channels, axis=-1)
    return ((views - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).astype(
        np.float32)


def view_batches(images: np.ndarray, labels: np.ndarray, *, local_batch_size: int,
                 steps_per_epoch: int, seed: int, process_index: int, start_step: int,
                 num_views: int, size: int, channels: int, mean: Sequence[float],
                 std: Sequence[float], cfg: Any, shuffle: bool = True, process_count: int = 1
                 ) -> Iterator[dict[str, np.ndarray]]:
    """Endless batches of `num_views` views from `start_step` on, a pure function of
    (seed, step): this process's rows of the global batch drawn (and augmented) from the
    whole split, as `in_memory.train_batches` does, so the global batch does not depend on
    the number of processes. Without `shuffle`, batches follow the data order (rating)."""
    global_batch = local_batch_size * process_count
    local = slice(process_index * local_batch_size, (process_index + 1) * local_batch_size)
    step = start_step
    epoch, permutation = -1, np.arange(len(images))
    while True:
        this_epoch, position = divmod(step, steps_per_epoch)
        if shuffle and this_epoch != epoch:
            epoch = this_epoch
            permutation = np.random.default_rng([seed, epoch, 0]).permutation(len(images))
        index = permutation[position * global_batch:(position + 1) * global_batch]
        if shuffle:
            index = np.sort(index)
        rng = np.random.default_rng([seed, 1 << 21, step, 0])
        views = augment_views(images[index], rng, num_views, size, cfg)[local]
        yield {"views": _normalise(views, channels, mean, std), "label": labels[index][local]}
        step += 1


# ---- TensorFlow (TFDS sources) -----------------------------------------------------------------


def _tf_view(image: Any, seed: Any, kind: int, size: int, channels: int, cfg: Any) -> Any:
    """One view of a float 0..255 [H, W, C] image with stateless TF ops."""
    tf = tfds_source.import_tf()
    seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 12))
    image = tfds_source._random_resized_crop(image, seeds[0], size, cfg.crop_min_area)  # pylint: disable=protected-access
    image = tf.ensure_shape(image, (size, size, channels))
    flip = tf.random.stateless_uniform([], seeds[1]) < cfg.flip_prob
    image = tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image)

    def chance(s, p):
        return tf.random.stateless_uniform([], s) < p

    def jitter(x):
        x = x / 255.0
        x = x * tf.random.stateless_uniform([], seeds[3], 1 - cfg.brightness,
                                            1 + cfg.brightness)
        x = tf.image.stateless_random_contrast(x, 1 - cfg.contrast, 1 + cfg.contrast, seeds[4])
        if x.shape[-1] == 3:
            x = tf.image.stateless_random_saturation(x, 1 - cfg.saturation,
                                                     1 + cfg.saturation, seeds[5])
            x = tf.image.stateless_random_hue(x, cfg.hue, seeds[6])
        return tf.clip_by_value(x, 0.0, 1.0) * 255.0

    def grayscale(x):
        if x.shape[-1] != 3:
            return x
        return tf.tile(tf.image.rgb_to_grayscale(x), [1, 1, 3])

    def blur(x):
        sigma = tf.random.stateless_uniform([], seeds[8], *cfg.blur_sigma)
        radius = int(math.ceil(3 * cfg.blur_sigma[1]))
        taps = tf.exp(-0.5 * tf.square(tf.range(-radius, radius + 1, dtype=tf.float32) / sigma))
        taps = taps / tf.reduce_sum(taps)
        channels = x.shape[-1]
        vertical = tf.tile(tf.reshape(taps, [-1, 1, 1, 1]), [1, 1, channels, 1])
        horizontal = tf.tile(tf.reshape(taps, [1, -1, 1, 1]), [1, 1, channels, 1])
        y = tf.pad(x[None], [[0, 0], [radius, radius], [radius, radius], [0, 0]], "SYMMETRIC")
        y = tf.nn.depthwise_conv2d(y, vertical, [1, 1, 1, 1], "VALID")
        y = tf.nn.depthwise_conv2d(y, horizontal, [1, 1, 1, 1], "VALID")
        return y[0]

    image = tf.cond(chance(seeds[2], cfg.jitter_prob), lambda: jitter(image), lambda: image)
    image = tf.cond(chance(seeds[7], cfg.grayscale_prob), lambda: grayscale(image),
                    lambda: image)
    image = tf.cond(chance(seeds[9], cfg.blur_prob[kind]), lambda: blur(image), lambda: image)
    image = tf.cond(chance(seeds[10], cfg.solarize_prob[kind]),
                    lambda: tf.where(image >= 128.0, 255.0 - image, image), lambda: image)
    return tf.ensure_shape(image, (size, size, channels))


def tfds_view_batches(builder: Any, split: Any, *, data_cfg: Any, local_batch_size: int,
                      steps_per_epoch: int, seed: int, process_index: int, start_step: int,
                      num_views: int, size: int, channels: int, mean: Sequence[float],
                      std: Sequence[float], cfg: Any, shuffle: bool = True
                      ) -> Iterator[dict[str, np.ndarray]]:
    """Endless multi-view batches of a TFDS split (stateless: resumable like train batches)."""
    tf = tfds_source.import_tf()
    epoch, position = divmod(start_step, steps_per_epoch)
    while True:
        epoch_seed = (seed * 1_000_003 + epoch * 7919 + process_index) % (2**31 - 1)
        ds = tfds_source._as_dataset(builder, split, shuffle_seed=epoch_seed if shuffle else None)  # pylint: disable=protected-access
        if shuffle:
            ds = ds.shuffle(data_cfg.shuffle_buffer, seed=epoch_seed,
                            reshuffle_each_iteration=False)
        ds = ds.take(steps_per_epoch * local_batch_size).enumerate()
        ds = ds.skip(position * local_batch_size)
        base = tf.constant([seed, epoch * 65_537 + process_index + (1 << 22)], tf.int64)

        def map_fn(index, example, base=base):
            image = tfds_source._decode(example["image"], channels)  # pylint: disable=protected-access
            image = tf.cast(tfds_source._to_channels(image, channels), tf.float32)  # pylint: disable=protected-access
            example_seed = tf.random.experimental.stateless_fold_in(base, index)
            views = [_tf_view(image, tf.random.experimental.stateless_fold_in(example_seed, v),
                              v % 2, size, channels, cfg) for v in range(num_views)]
            views = (tf.stack(views) - tf.constant(mean, tf.float32)) / tf.constant(
                std, tf.float32)
            return {"views": views, "label": tf.cast(example["label"], tf.int32)}

        ds = ds.map(map_fn, num_parallel_calls=data_cfg.num_parallel_calls)
        ds = ds.batch(local_batch_size, drop_remainder=True).prefetch(data_cfg.prefetch)
        yield from ds.as_numpy_iterator()
        epoch, position = epoch + 1, 0


# ---- the dataset -------------------------------------------------------------------------------


def make_view_dataset(data_cfg: Any, split: str, augment_cfg: Any, num_views: int, *,
                      mesh: Any = None, seed: int = 0, shuffle: bool = True,
                      batch_size: int = 0, process_index: int | None = None,
                      process_count: int | None = None) -> Dataset:
    """An endless Dataset of multi-view batches {'views': [B, V, H, W, C], 'label'}.

    Args:
      data_cfg: the `data` section (source, name, image_size, channels, mean, std, ...).
      split: split name, slices allowed.
      augment_cfg: the recipe (`get_default_config`).
      num_views: views per image (2 per sampled path in DNA++).
      mesh, seed: as in `dna_jax.data.make_dataset`.
      shuffle: False keeps the data order (fixed rating views).
      batch_size: global batch size (0 = data_cfg.batch_size).
    """
    import jax  # pylint: disable=import-outside-toplevel

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    global_batch = batch_size or data_cfg.batch_size
    if global_batch % process_count:
        raise ValueError(f"Batch size {global_batch} does not split over {process_count} "
                         "processes.")
    local_batch = global_batch // process_count
    common = dict(local_batch_size=local_batch, seed=seed, process_index=process_index,
                  num_views=num_views, cfg=augment_cfg, shuffle=shuffle)
    if data_cfg.source == "tfds":
        builder = tfds_source.get_builder(data_cfg.name, data_cfg.data_dir, data_cfg.download)
        height, _, native_channels, num_classes = tfds_source.image_spec(builder)
        size = data_cfg.image_size or height
        channels = data_cfg.channels or native_channels or 3
        mean, std = _normalisation(data_cfg, channels, tfds_source.IMAGENET_MEAN,
                                   tfds_source.IMAGENET_STD)
        total = tfds_source.num_examples(builder, split)
        local_split = tfds_source.process_split(split, process_index, process_count, True)
        num_batches = (total // process_count) // local_batch
        host_fn = functools.partial(tfds_view_batches, builder, local_split, data_cfg=data_cfg,
                                    steps_per_epoch=max(1, num_batches), size=size,
                                    channels=channels, mean=mean, std=std, **common)
    else:
        images, labels, num_classes, default_mean, default_std = _in_memory_arrays(
            data_cfg, split)
        size = data_cfg.image_size or images.shape[1]
        channels = data_cfg.channels or images.shape[3]
        mean, std = _normalisation(data_cfg, channels, default_mean, default_std)
        total = len(images)  # every process draws the global batch (view_batches)
        num_batches = total // global_batch
        host_fn = functools.partial(view_batches, images, labels,
                                    steps_per_epoch=max(1, num_batches), size=size,
                                    channels=channels, mean=mean, std=std,
                                    process_count=process_count, **common)
    if num_batches == 0:
        raise ValueError(f"{split}: {total} examples give no full batch of {global_batch}.")
    info = DatasetInfo(total, num_classes, (size, size, channels), global_batch, local_batch,
                       num_batches, True)
    return Dataset(info, lambda start_step: host_fn(start_step=start_step), mesh,
                   data_cfg.prefetch)


def _in_memory_arrays(cfg: Any, split: str) -> tuple[np.ndarray, np.ndarray, int, Any, Any]:
    """(uint8 images at native resolution, labels, classes, mean, std) of an in-memory split."""
    if cfg.source == "fashion_mnist":
        name, start, end = in_memory.parse_split(split, {"train": 60_000, "test": 10_000})
        images, labels = fashion_mnist.load_fashion_mnist(cfg.data_dir or None, name)
        return (images[start:end], labels[start:end], fashion_mnist.NUM_CLASSES,
                fashion_mnist.MEAN, fashion_mnist.STD)
    if cfg.source == "synthetic":
        size = cfg.image_size or 32
        sizes = {cfg.train_split: cfg.num_examples, cfg.eval_split: cfg.num_examples}
        name, start, end = in_memory.parse_split(split, sizes)
        images, labels = in_memory.synthetic_arrays(cfg.num_examples, size, cfg.channels or 3,
                                                    cfg.num_classes, 0, name)
        return images[start:end], labels[start:end], cfg.num_classes, 127.5, 64.0
    raise ValueError(f"Unknown data.source {cfg.source!r} for multi-view batches; choose "
                     "fashion_mnist, synthetic or tfds.")


def fixed_views(data_cfg: Any, split: str, augment_cfg: Any, num_batches: int,
                batch_size: int, seed: int) -> np.ndarray:
    """The first `num_batches` batches of `split` in data order, two views each, on this
    host: float32 [2, R, B, H, W, C] (the same on every call: rating views)."""
    dataset = make_view_dataset(data_cfg, split, augment_cfg, 2, seed=seed, shuffle=False,
                                batch_size=batch_size, process_index=0, process_count=1)
    if dataset.info.num_batches < num_batches:
        raise ValueError(f"{split}: {dataset.info.num_examples} examples give "
                         f"{dataset.info.num_batches} batches of {batch_size}, "
                         f"{num_batches} asked for")
    batches = [b["views"] for _, b in zip(range(num_batches), dataset.host_batches(0))]
    return np.moveaxis(np.stack(batches), 2, 0)
