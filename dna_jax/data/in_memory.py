"""Batches from arrays held in host memory (offline Fashion-MNIST, synthetic data).

Every training batch is a pure function of (seed, step): the epoch's permutation is seeded by
(seed, epoch) and the augmentation by (seed, step), both over the GLOBAL batch, and process p
of P keeps rows [p*L, (p+1)*L) of it (L = the local batch). Resuming at step s therefore
replays exactly the batches an uninterrupted run would have seen, with no iterator state to
checkpoint, and the global batch of a step is the same whatever the number of processes: a
2-process run trains on the batches a 1-process run does (tests/test_multihost.py compares
them). Every process holds the whole split and augments the whole global batch (these are
small in-memory sets); a 1-process run is unchanged by this rule.
"""

import re
from collections.abc import Iterator, Sequence

import numpy as np

_SLICE = re.compile(r"^(\w+)\[(-?\d*)(%?):(-?\d*)(%?)\]$")


def parse_split(split: str, sizes: dict[str, int]) -> tuple[str, int, int]:
    """Resolves 'train', 'train[:50000]' or 'train[90%:]' to (name, start, end)."""
    match = _SLICE.match(split)
    name = match.group(1) if match else split
    if name not in sizes:
        raise ValueError(f"Unknown split {split!r}; known: {sorted(sizes)}.")
    n = sizes[name]
    if not match:
        return name, 0, n

    def bound(text: str, percent: str, default: int) -> int:
        if not text:
            return default
        value = int(text) * n // 100 if percent else int(text)
        return min(max(value + n if value < 0 else value, 0), n)

    start = bound(match.group(2), match.group(3), 0)
    end = bound(match.group(4), match.group(5), n)
    if end <= start:
        raise ValueError(f"Split {split!r} is empty.")
    return name, start, end


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear (antialiased) resize of uint8 [N, H, W, C] images to size x size, once."""
    if images.shape[1] == size and images.shape[2] == size:
        return images
    from PIL import Image  # pylint: disable=import-outside-toplevel

    out = np.empty((len(images), size, size, images.shape[3]), np.uint8)
    for i, image in enumerate(images):
        for c in range(images.shape[3]):
            out[i, :, :, c] = np.asarray(
                Image.fromarray(image[:, :, c]).resize((size, size), Image.BILINEAR))
    return out


def normalize(images: np.ndarray, channels: int, mean: Sequence[float],
              std: Sequence[float]) -> np.ndarray:
    """uint8 [B, H, W, c] -> float32 [B, H, W, channels], grayscale tiled, (x - mean) / std."""
    if images.shape[-1] != channels:
        if images.shape[-1] != 1:
            raise ValueError(f"Cannot map {images.shape[-1]} channels to {channels}.")
        images = np.repeat(images, channels, axis=-1)
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    return (images.astype(np.float32) - mean) / std


def augment_batch(images: np.ndarray, rng: np.random.Generator, augment: str,
                  crop_padding: int) -> np.ndarray:
    """Random pad-and-crop and/or horizontal flip of a uint8 batch (CIFAR-style)."""
    if augment == "none":
        return images
    if augment not in ("flip", "crop_flip"):
        raise ValueError(
            f"augment={augment!r} is not available for in-memory sources "
            "(use 'crop_flip', 'flip' or 'none'; 'imagenet' is for tfds sources).")
    batch, height, width, _ = images.shape
    out = images.copy()
    if augment == "crop_flip" and crop_padding > 0:
        p = crop_padding
        padded = np.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))
        offsets = rng.integers(0, 2 * p + 1, size=(batch, 2))
        for i, (dy, dx) in enumerate(offsets):
            out[i] = padded[i, dy:dy + height, dx:dx + width]
    flips = rng.random(batch) < 0.5
    out[flips] = out[flips, :, ::-1]
    return out


def train_batches(images: np.ndarray, labels: np.ndarray, *, local_batch_size: int,
                  steps_per_epoch: int, seed: int, process_index: int, start_step: int,
                  augment: str, crop_padding: int, channels: int, mean: Sequence[float],
                  std: Sequence[float], process_count: int = 1
                  ) -> Iterator[dict[str, np.ndarray]]:
    """Endless shuffled, augmented batches from start_step on: this process's rows of each
    global batch of the whole split `images` (see the module docstring)."""
    global_batch = local_batch_size * process_count
    local = slice(process_index * local_batch_size, (process_index + 1) * local_batch_size)
    step = start_step
    epoch, permutation = -1, None
    while True:
        this_epoch, position = divmod(step, steps_per_epoch)
        if this_epoch != epoch:
            epoch = this_epoch
            permutation = np.random.default_rng([seed, epoch, 0]).permutation(len(images))
        index = np.sort(permutation[position * global_batch:(position + 1) * global_batch])
        rng = np.random.default_rng([seed, 1 << 20, step, 0])
        batch = augment_batch(images[index], rng, augment, crop_padding)[local]
        yield {"image": normalize(batch, channels, mean, std), "label": labels[index][local]}
        step += 1


def eval_batches(images: np.ndarray, labels: np.ndarray, *, local_batch_size: int,
                 num_batches: int, channels: int, mean: Sequence[float],
                 std: Sequence[float]) -> Iterator[dict[str, np.ndarray]]:
    """One pass in order; the tail is padded with zero images whose `mask` is 0."""
    for b in range(num_batches):
        chunk = images[b * local_batch_size:(b + 1) * local_batch_size]
        label = labels[b * local_batch_size:(b + 1) * local_batch_size]
        pad = local_batch_size - len(chunk)
        mask = np.concatenate([np.ones(len(chunk), np.float32), np.zeros(pad, np.float32)])
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad, *images.shape[1:]), images.dtype)])
            label = np.concatenate([label, np.zeros(pad, labels.dtype)])
        yield {"image": normalize(chunk, channels, mean, std), "label": label, "mask": mask}


def synthetic_arrays(num_examples: int, image_size: int, channels: int, num_classes: int,
                     seed: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Learnable random data: a fixed random pattern per class plus per-example noise.

    The class patterns depend only on `seed`, the noise and labels also on `split`, so train
    and test share the task but not the examples.
    """
    patterns = np.random.default_rng([seed, 0]).integers(
        0, 256, (num_classes, image_size, image_size, channels))
    rng = np.random.default_rng([seed, 1 + sum(map(ord, split))])
    labels = rng.integers(0, num_classes, num_examples).astype(np.int32)
    noise = rng.normal(0.0, 48.0, (num_examples, image_size, image_size, channels))
    images = np.clip(patterns[labels] * 0.5 + 64 + noise, 0, 255).astype(np.uint8)
    return images, labels
