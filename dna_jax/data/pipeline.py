"""`make_dataset`: one entry point for every data source, yielding global batches on a mesh.

Each process builds batches of its own disjoint part of the data (numpy, per-process batch
size = global batch / process count); iterating the Dataset turns them into global arrays
sharded over the mesh with `jax.make_array_from_process_local_data`, one or two batches ahead.
"""

import dataclasses
import math
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from dna_jax import sharding
from dna_jax.data import fashion_mnist, in_memory, tfds_source

SOURCES = ("fashion_mnist", "tfds", "synthetic")


def get_default_config() -> ml_collections.ConfigDict:
    """Every data field with its default; experiment configs override what they need."""
    return ml_collections.ConfigDict(dict(
        source="fashion_mnist",  # fashion_mnist (offline idx files) | tfds | synthetic.
        name="",  # TFDS name for source=tfds, e.g. "imagenet2012", "cifar10".
        data_dir="",  # '' = source default ($TFDS_DATA_DIR, /usr/share/datasets/fashion-mnist).
        download=False,  # Let TFDS download and prepare a missing dataset.
        train_split="train",
        eval_split="test",
        image_size=0,  # 0 = native resolution.
        channels=0,  # 0 = native; 3 tiles grayscale to RGB.
        batch_size=256,  # Global (all processes).
        eval_batch_size=0,  # 0 = batch_size.
        augment="crop_flip",  # imagenet | crop_flip | flip | none.
        crop_padding=4,  # Pixels of zero padding before the random crop (crop_flip).
        min_area=0.08,  # Smallest crop area fraction (imagenet).
        crop_pct=0.875,  # Eval: resize to size / crop_pct, centre crop (tfds sources).
        mean=(),  # Per-channel mean on the 0..255 scale; () = source default.
        std=(),
        shuffle_buffer=16_384,
        num_parallel_calls=-1,  # tf.data AUTOTUNE.
        prefetch=2,  # Batches prepared ahead, on the host and on the devices.
        num_classes=10,  # Synthetic only; other sources know theirs.
        num_examples=512,  # Synthetic only: examples per split.
    ))


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Static facts about one split's pipeline."""

    num_examples: int  # In the split, over all processes.
    num_classes: int
    image_shape: tuple[int, int, int]  # (height, width, channels) as delivered.
    global_batch_size: int
    local_batch_size: int
    num_batches: int  # Train: batches per epoch; eval: batches in one (padded) pass.
    training: bool


class Dataset:
    """A split's batches: iterate for global arrays on the mesh, or `host_batches` for numpy.

    Train datasets are endless and start at any step (exact resume); eval datasets are one
    pass whose batches carry a `mask` (0 for padding).
    """

    def __init__(self, info: DatasetInfo, host_fn: Callable[[int], Iterator[dict]],
                 mesh: Mesh | None, prefetch: int) -> None:
        self.info = info
        self._host_fn = host_fn
        self.mesh = mesh
        self.prefetch = prefetch

    def host_batches(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """This process's numpy batches from `start_step` on (train) or from the start."""
        return self._host_fn(start_step)

    def global_batches(self, start_step: int = 0) -> Iterator[dict[str, jax.Array]]:
        """Global arrays sharded over the mesh, built `prefetch` batches ahead in a thread."""
        if self.mesh is None:
            raise ValueError("This Dataset has no mesh; pass mesh= to make_dataset.")
        batches = (sharding.host_to_global(b, self.mesh)
                   for b in self.host_batches(start_step))
        return _background(batches, self.prefetch)

    def __iter__(self) -> Iterator[dict[str, jax.Array]]:
        return self.global_batches(0)


def _background(iterator: Iterator[Any], size: int) -> Iterator[Any]:
    """Runs `iterator` in a daemon thread, `size` items ahead; re-raises its errors here."""
    if size <= 0:
        yield from iterator
        return
    items: queue.Queue = queue.Queue(maxsize=size)
    done = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in iterator:
                while not stop.is_set():
                    try:
                        items.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            items.put(done)
        except BaseException as error:  # pylint: disable=broad-except
            items.put(error)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


SYNTHETIC_STATISTICS = (127.5, 64.0)  # (mean, std) of the synthetic source's images


def input_normalisation(cfg: Any, channels: int) -> dict[str, Any]:
    """How the pipeline normalises a source's images: {'mean', 'std'} per channel on the
    0..255 scale (the config's, else the source's), for deployers of a trained network."""
    defaults = {"fashion_mnist": (fashion_mnist.MEAN, fashion_mnist.STD),
                "synthetic": SYNTHETIC_STATISTICS,
                "tfds": (tfds_source.IMAGENET_MEAN, tfds_source.IMAGENET_STD)}
    mean, std = _normalisation(cfg, channels, *defaults[cfg.source])
    clean = lambda values: [float(f"{v:.7g}") for v in values]  # noqa: E731 (float32 digits)
    return {"mean": clean(mean), "std": clean(std)}


def _normalisation(cfg: Any, channels: int, source_mean: float | tuple,
                   source_std: float | tuple) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std): the config's, else the source's (RGB ones averaged for gray)."""

    def per_channel(given: Any, default: Any, field: str) -> tuple[float, ...]:
        values = np.asarray(given if len(given) else default, np.float32).reshape(-1)
        if not len(given) and channels == 1 and values.size > 1:
            values = values.mean(keepdims=True)  # RGB statistics for a grayscale image.
        if values.size not in (1, channels):
            raise ValueError(f"data.{field} has {values.size} entries but the images have "
                             f"{channels} channels; give 1 or {channels} values.")
        return tuple(np.broadcast_to(values, (channels,)).tolist())

    return per_channel(cfg.mean, source_mean, "mean"), per_channel(cfg.std, source_std, "std")


def _in_memory_dataset(cfg: Any, split: str, training: bool, seed: int, images: np.ndarray,
                       labels: np.ndarray, num_classes: int, default_mean: Any,
                       default_std: Any, batch_sizes: tuple[int, int], process_index: int,
                       process_count: int, mesh: Mesh | None) -> Dataset:
    global_batch, local_batch = batch_sizes
    size = cfg.image_size or images.shape[1]
    channels = cfg.channels or images.shape[3]
    images = in_memory.resize_images(images, size)
    mean, std = _normalisation(cfg, channels, default_mean, default_std)
    total = len(images)
    if training:  # every process draws the global batch and keeps its rows (in_memory)
        num_batches = total // global_batch
        if num_batches == 0:
            raise ValueError(f"{total} examples give no full batch of {global_batch}.")

        def host_fn(start_step: int) -> Iterator[dict]:
            return in_memory.train_batches(
                images, labels, local_batch_size=local_batch, steps_per_epoch=num_batches,
                seed=seed, process_index=process_index, process_count=process_count,
                start_step=start_step, augment=cfg.augment, crop_padding=cfg.crop_padding,
                channels=channels, mean=mean, std=std)
    else:
        local = slice(process_index, None, process_count)  # Disjoint parts, one per process.
        images, labels = images[local], labels[local]
        num_batches = tfds_source.local_eval_batches(total, process_count, local_batch)

        def host_fn(start_step: int) -> Iterator[dict]:
            del start_step
            return in_memory.eval_batches(
                images, labels, local_batch_size=local_batch, num_batches=num_batches,
                channels=channels, mean=mean, std=std)

    info = DatasetInfo(total, num_classes, (size, size, channels), global_batch, local_batch,
                       num_batches, training)
    return Dataset(info, host_fn, mesh, cfg.prefetch)


def _tfds_dataset(cfg: Any, split: str, training: bool, seed: int,
                  batch_sizes: tuple[int, int], process_index: int, process_count: int,
                  mesh: Mesh | None) -> Dataset:
    global_batch, local_batch = batch_sizes
    if not cfg.name:
        raise ValueError("data.source='tfds' needs data.name (e.g. 'cifar10').")
    builder = tfds_source.get_builder(cfg.name, cfg.data_dir, cfg.download)
    height, width, native_channels, num_classes = tfds_source.image_spec(builder)
    size = cfg.image_size or height
    if not size or (not cfg.image_size and height != width):
        raise ValueError(f"{cfg.name} images are {height}x{width}; set data.image_size.")
    channels = cfg.channels or native_channels or 3
    mean, std = _normalisation(cfg, channels, tfds_source.IMAGENET_MEAN, tfds_source.IMAGENET_STD)
    total = tfds_source.num_examples(builder, split)
    local_split = tfds_source.process_split(split, process_index, process_count, training)
    common = dict(cfg=cfg, local_batch_size=local_batch, size=size, channels=channels,
                  mean=mean, std=std)
    if training:
        num_batches = (total // process_count) // local_batch
        if num_batches == 0:
            raise ValueError(f"{total} examples give no full batch of {global_batch}.")

        def host_fn(start_step: int) -> Iterator[dict]:
            return tfds_source.train_batches(
                builder, local_split, steps_per_epoch=num_batches, seed=seed,
                process_index=process_index, start_step=start_step, **common)
    else:
        num_batches = tfds_source.local_eval_batches(total, process_count, local_batch)

        def host_fn(start_step: int) -> Iterator[dict]:
            del start_step
            return tfds_source.eval_batches(builder, local_split, num_batches=num_batches,
                                            **common)

    info = DatasetInfo(total, num_classes, (size, size, channels), global_batch, local_batch,
                       num_batches, training)
    return Dataset(info, host_fn, mesh, cfg.prefetch)


def make_dataset(cfg: ml_collections.ConfigDict, split: str, *, training: bool | None = None,
                 mesh: Mesh | None = None, seed: int = 0, process_index: int | None = None,
                 process_count: int | None = None) -> Dataset:
    """Builds the pipeline of one split.

    Args:
        cfg: the `data` ConfigDict (see get_default_config).
        split: split name, slices allowed ("train", "test", "train[:50000]").
        training: shuffle + augment + repeat; default: split == cfg.train_split.
        mesh: mesh whose devices receive the batches when the Dataset is iterated.
        seed: seeds shuffling and augmentation (with the step, for exact resume).
        process_index, process_count: this process's part (default: from jax); tests pass
            them to check that parts are disjoint.

    Returns:
        A Dataset; its `info` has sizes, classes and the delivered image shape.

    Raises:
        DataNotFoundError: the data is not prepared (the message says how to prepare it).
    """
    training = split == cfg.train_split if training is None else training
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    global_batch = cfg.batch_size if training else (cfg.eval_batch_size or cfg.batch_size)
    if global_batch % process_count:
        raise ValueError(f"Batch size {global_batch} does not split over {process_count} "
                         "processes.")
    batch_sizes = (global_batch, global_batch // process_count)
    parts = dict(process_index=process_index, process_count=process_count, mesh=mesh)
    if cfg.source == "tfds":
        return _tfds_dataset(cfg, split, training, seed, batch_sizes, **parts)
    if cfg.source == "fashion_mnist":
        name, start, end = in_memory.parse_split(split, {"train": 60_000, "test": 10_000})
        images, labels = fashion_mnist.load_fashion_mnist(cfg.data_dir or None, name)
        return _in_memory_dataset(cfg, split, training, seed, images[start:end],
                                  labels[start:end], fashion_mnist.NUM_CLASSES,
                                  fashion_mnist.MEAN, fashion_mnist.STD, batch_sizes, **parts)
    if cfg.source == "synthetic":
        size = cfg.image_size or 32
        sizes = {cfg.train_split: cfg.num_examples, cfg.eval_split: cfg.num_examples}
        name, start, end = in_memory.parse_split(split, sizes)
        images, labels = in_memory.synthetic_arrays(
            cfg.num_examples, size, cfg.channels or 3, cfg.num_classes, 0, name)
        return _in_memory_dataset(cfg, split, training, seed, images[start:end],
                                  labels[start:end], cfg.num_classes, *SYNTHETIC_STATISTICS,
                                  batch_sizes, **parts)
    raise ValueError(f"Unknown data.source {cfg.source!r}; choose one of {SOURCES}.")


def steps_for_epochs(info: DatasetInfo, num_epochs: float) -> int:
    """Training steps covering num_epochs of the split (whole batches)."""
    return max(1, math.ceil(num_epochs * info.num_examples / info.global_batch_size))
