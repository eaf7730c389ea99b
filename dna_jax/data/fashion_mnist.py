"""Offline Fashion-MNIST: reads the original idx files, no network and no TensorFlow.

The Debian package `dataset-fashion-mnist` installs the four files under
/usr/share/datasets/fashion-mnist; any directory holding them (gzipped or not) works.
"""

import gzip
import os

import numpy as np

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
NUM_CLASSES = 10
# Per-pixel statistics of the training images on the 0..255 scale.
MEAN = 72.94
STD = 90.02

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IMAGE_MAGIC = 2051
_LABEL_MAGIC = 2049


class DataNotFoundError(FileNotFoundError):
    """Raised when a data source has no prepared data; the message says how to get it."""


def _find(directory: str, stem: str) -> str:
    for name in (stem + ".gz", stem):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            return path
    raise DataNotFoundError(
        f"Fashion-MNIST file {stem}[.gz] not found in {directory!r}. Install the Debian "
        "package `dataset-fashion-mnist` (files land in /usr/share/datasets/fashion-mnist), "
        "or download the four idx files from "
        "https://github.com/zalandoresearch/fashion-mnist (data/fashion) into that directory "
        "and set data.data_dir to it."
    )


def _read_idx(path: str, magic: int) -> np.ndarray:
    """Parses one idx file (big-endian header: magic, dims; then uint8 data)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    header = np.frombuffer(raw, dtype=">i4", count=1)[0]
    if header != magic:
        raise ValueError(f"{path}: bad idx magic {header}, expected {magic}.")
    ndim = magic & 0xFF
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: truncated ({data.size} bytes for dims {dims.tolist()}).")
    return data.reshape(dims)


def load_fashion_mnist(directory: str | None, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Loads one split of Fashion-MNIST.

    Args:
        directory: folder with the idx files; None means DEFAULT_DIR.
        split: "train" (60k) or "test" (10k).

    Returns:
        images uint8 [N, 28, 28, 1] and labels int32 [N].

    Raises:
        DataNotFoundError: the files are not there (the message says how to get them).
    """
    if split not in _FILES:
        raise ValueError(f"Fashion-MNIST split must be one of {sorted(_FILES)}, got {split!r}.")
    directory = directory or DEFAULT_DIR
    image_stem, label_stem = _FILES[split]
    images = _read_idx(_find(directory, image_stem), _IMAGE_MAGIC)
    labels = _read_idx(_find(directory, label_stem), _LABEL_MAGIC)
    if len(images) != len(labels):
        raise ValueError(f"{directory}: {len(images)} images but {len(labels)} labels.")
    return images[..., None], labels.astype(np.int32)
