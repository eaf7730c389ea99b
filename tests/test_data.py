"""Input pipelines: offline Fashion-MNIST, TFDS (mocked and a tiny real one), synthetic.

Checks shapes, dtypes and value ranges after normalisation, eval padding masks, that the
parts of different processes are disjoint and cover the split, that a train stream resumed at
step s equals the tail of an uninterrupted one, and that missing data fails fast with a hint.
"""

import itertools
import os
import time

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from dna_jax import data as data_lib
from dna_jax import sharding
from dna_jax.data import fashion_mnist, in_memory, tfds_source

FMNIST_DIR = fashion_mnist.DEFAULT_DIR
needs_fmnist = pytest.mark.skipif(
    not os.path.exists(os.path.join(FMNIST_DIR, "train-images-idx3-ubyte.gz")),
    reason=f"Fashion-MNIST idx files not in {FMNIST_DIR} (make data installs them)")
IMAGENET_MEAN = np.asarray(tfds_source.IMAGENET_MEAN, np.float32)
IMAGENET_STD = np.asarray(tfds_source.IMAGENET_STD, np.float32)


def _config(**overrides):
    cfg = data_lib.get_default_config()
    cfg.update(dict(batch_size=8, shuffle_buffer=64, prefetch=1, num_parallel_calls=1))
    cfg.update(overrides)
    return cfg


def _take(iterator, n):
    return list(itertools.islice(iterator, n))


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


# ----------------------------------------------------------------------------------------------
# Offline Fashion-MNIST.


@pytest.fixture(scope="module")
def fmnist_test_raw():
    return fashion_mnist.load_fashion_mnist(FMNIST_DIR, "test")


@needs_fmnist
def test_fashion_mnist_eval_values_are_the_normalised_idx_pixels(fmnist_test_raw):
    images, labels = fmnist_test_raw
    assert images.shape == (10_000, 28, 28, 1) and images.dtype == np.uint8
    cfg = _config(eval_split="test[:20]")
    ds = data_lib.make_dataset(cfg, "test[:20]", training=False)
    assert ds.info.image_shape == (28, 28, 1) and ds.info.num_batches == 3
    batches = list(ds.host_batches())
    assert [b["image"].shape for b in batches] == [(8, 28, 28, 1)] * 3
    assert batches[0]["image"].dtype == np.float32 and batches[0]["label"].dtype == np.int32
    mask = np.concatenate([b["mask"] for b in batches])
    np.testing.assert_array_equal(mask, [1] * 20 + [0] * 4)
    got = np.concatenate([b["image"] for b in batches])[:20]
    expected = (images[:20].astype(np.float32) - fashion_mnist.MEAN) / fashion_mnist.STD
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches])[:20],
                                  labels[:20])
    assert np.all(np.concatenate([b["label"] for b in batches])[20:] == 0)


@needs_fmnist
def test_fashion_mnist_train_is_tiled_resized_and_in_range(fmnist_test_raw):
    cfg = _config(image_size=16, channels=3, train_split="train[:64]", augment="crop_flip")
    ds = data_lib.make_dataset(cfg, "train[:64]", training=True, seed=3)
    assert ds.info.image_shape == (16, 16, 3)
    assert ds.info.num_examples == 64 and ds.info.num_batches == 8
    batch = next(ds.host_batches())
    image = batch["image"]
    assert image.shape == (8, 16, 16, 3) and image.dtype == np.float32
    np.testing.assert_array_equal(image[..., 0], image[..., 1])  # Grayscale tiled.
    np.testing.assert_array_equal(image[..., 0], image[..., 2])
    low, high = -fashion_mnist.MEAN / fashion_mnist.STD, (255 - fashion_mnist.MEAN) / fashion_mnist.STD
    assert image.min() >= low - 1e-6 and image.max() <= high + 1e-6
    assert image.max() > 1.0  # Real garments, not an all-background batch.
    assert set(batch["label"].tolist()) <= set(range(10))
    # The resize keeps the picture: mean brightness of 28 px and 16 px versions agree.
    images, _ = fmnist_test_raw
    small = in_memory.resize_images(images[:50], 16)
    assert small.shape == (50, 16, 16, 1)
    np.testing.assert_allclose(small.mean(axis=(1, 2, 3)), images[:50].mean(axis=(1, 2, 3)),
                               atol=4.0)


def _example_ids(batches, images_by_bytes):
    ids = []
    for batch in batches:
        for image, mask in zip(batch["image"], batch.get("mask", np.ones(len(batch["image"])))):
            if mask:
                ids.append(images_by_bytes[image.tobytes()])
    return ids


@needs_fmnist
@pytest.mark.parametrize("training", [True, False])
def test_fashion_mnist_process_parts_are_disjoint_and_cover_the_split(training):
    split = "train[:96]" if training else "test[:45]"
    cfg = _config(batch_size=16, eval_batch_size=16, augment="none")
    reference = data_lib.make_dataset(cfg, split, training=False, process_count=1,
                                      process_index=0)
    whole = [b for b in reference.host_batches()]
    lookup = {}
    for i, image in enumerate(np.concatenate([b["image"] for b in whole])[:reference.info.num_examples]):
        lookup.setdefault(image.tobytes(), i)
    assert len(lookup) == reference.info.num_examples  # Examples are distinguishable.
    parts = []
    for index in range(2):
        ds = data_lib.make_dataset(cfg, split, training=training, process_index=index,
                                   process_count=2)
        assert ds.info.local_batch_size == 8
        n = ds.info.num_batches
        parts.append(_example_ids(_take(ds.host_batches(), n), lookup))
    for part in parts:
        assert len(part) == len(set(part))  # An epoch sees each example once.
    assert not set(parts[0]) & set(parts[1])
    assert set(parts[0]) | set(parts[1]) == set(range(reference.info.num_examples))


@pytest.mark.parametrize("source", ["synthetic", "views"])
def test_in_memory_global_batch_does_not_depend_on_the_process_count(source):
    """Process p of 2 gets rows [p*L, (p+1)*L) of the global batch 1 process gets, at every
    step (across an epoch boundary): a 2-process run trains on a 1-process run's batches."""
    from dna_jax.data import views  # pylint: disable=import-outside-toplevel
    cfg = _config(source="synthetic", num_examples=40, image_size=8, augment="crop_flip",
                  crop_padding=2)

    def batches(index, count):
        if source == "views":
            ds = views.make_view_dataset(cfg, "train", views.get_default_config(), 2, seed=3,
                                         process_index=index, process_count=count)
        else:
            ds = data_lib.make_dataset(cfg, "train", training=True, seed=3,
                                       process_index=index, process_count=count)
        assert ds.info.num_batches == 5 and ds.info.local_batch_size == 8 // count
        return _take(ds.host_batches(3), 4)

    whole, parts = batches(0, 1), [batches(i, 2) for i in range(2)]
    for step, batch in enumerate(whole):
        for key in batch:
            np.testing.assert_array_equal(
                np.concatenate([part[step][key] for part in parts]), batch[key], err_msg=key)


@needs_fmnist
def test_fashion_mnist_resume_replays_the_uninterrupted_stream():
    cfg = _config(train_split="train[:48]", augment="crop_flip", crop_padding=2)
    ds = data_lib.make_dataset(cfg, "train[:48]", training=True, seed=7)
    assert ds.info.num_batches == 6
    full = _take(ds.host_batches(0), 14)  # Crosses two epoch boundaries.
    _assert_batches_equal(full[5:], _take(ds.host_batches(5), 9))
    _assert_batches_equal(full[9:], _take(ds.host_batches(9), 5))
    # Epochs are reshuffled and steps augmented differently.
    assert not np.array_equal(full[0]["label"], full[6]["label"]) or not np.array_equal(
        full[0]["image"], full[6]["image"])
    other_seed = _take(data_lib.make_dataset(cfg, "train[:48]", training=True,
                                             seed=8).host_batches(0), 1)
    assert not np.array_equal(other_seed[0]["image"], full[0]["image"])


@needs_fmnist
def test_global_batches_are_sharded_over_the_mesh_and_match_host_batches():
    mesh = sharding.make_mesh()
    assert mesh.devices.size == 4
    cfg = _config(train_split="train[:48]")
    ds = data_lib.make_dataset(cfg, "train[:48]", training=True, mesh=mesh, seed=1)
    host = _take(ds.host_batches(2), 3)
    device = _take(ds.global_batches(2), 3)
    for h, d in zip(host, device):
        assert isinstance(d["image"], jax.Array)
        assert d["image"].sharding.is_equivalent_to(sharding.batch_sharding(mesh), 4)
        assert len(d["image"].addressable_shards) == 4
        assert d["image"].addressable_shards[0].data.shape == (2, 28, 28, 1)
        np.testing.assert_array_equal(np.asarray(d["image"]), h["image"])
        np.testing.assert_array_equal(np.asarray(d["label"]), h["label"])


def test_missing_fashion_mnist_dir_names_the_package(tmp_path):
    cfg = _config(data_dir=str(tmp_path))
    with pytest.raises(data_lib.DataNotFoundError, match="dataset-fashion-mnist"):
        data_lib.make_dataset(cfg, "train")


def test_bad_split_and_batch_size_are_named():
    cfg = _config(source="synthetic", batch_size=6, num_examples=32)
    with pytest.raises(ValueError, match="Unknown split"):
        data_lib.make_dataset(cfg, "validation")
    with pytest.raises(ValueError, match="does not split over 4 processes"):
        data_lib.make_dataset(cfg, "train", process_index=0, process_count=4)
    with pytest.raises(ValueError, match="data.source"):
        data_lib.make_dataset(_config(source="imagenet"), "train")


def test_synthetic_source_is_learnable_and_resumable():
    cfg = _config(source="synthetic", image_size=16, channels=3, num_examples=64)
    train = data_lib.make_dataset(cfg, "train", seed=0)
    test = data_lib.make_dataset(cfg, "test", training=False)
    assert train.info.image_shape == (16, 16, 3) and train.info.num_batches == 8
    full = _take(train.host_batches(0), 10)
    _assert_batches_equal(full[3:], _take(train.host_batches(3), 7))
    # Train and test share the class patterns, not the examples.
    test_images = np.concatenate([b["image"] for b in test.host_batches()])
    assert not np.array_equal(test_images[:8], full[0]["image"])


# ----------------------------------------------------------------------------------------------
# TFDS: missing data, mocked datasets.


@pytest.mark.parametrize("layout", ["empty_dir", "dataset_folder_without_data"])
def test_tfds_without_prepared_data_fails_fast_without_downloading(tmp_path, monkeypatch,
                                                                   layout):
    def no_download(*args, **kwargs):
        raise AssertionError("download_and_prepare must not be called")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_download)
    if layout == "dataset_folder_without_data":  # Gets past the quick check, into TFDS.
        (tmp_path / "cifar10").mkdir()
        tfds_source.import_tf()  # Time the check, not TensorFlow's (slow, shared) import.
    cfg = _config(source="tfds", name="cifar10", data_dir=str(tmp_path))
    start = time.perf_counter()
    with pytest.raises(data_lib.DataNotFoundError, match="tfds build cifar10") as error:
        data_lib.make_dataset(cfg, "train")
    assert time.perf_counter() - start < 20.0
    assert str(tmp_path) in str(error.value) and "download=True" in str(error.value)
    with pytest.raises(ValueError, match="data.name"):
        data_lib.make_dataset(_config(source="tfds"), "train")


def test_tfds_mock_cifar10_shapes_ranges_and_eval_padding():
    cfg = _config(source="tfds", name="cifar10", image_size=16, download=True,
                  augment="crop_flip")
    with tfds.testing.mock_data(num_examples=37):
        train = data_lib.make_dataset(cfg, "train", seed=0)
        assert train.info.image_shape == (16, 16, 3) and train.info.num_classes == 10
        assert train.info.num_examples == 37 and train.info.num_batches == 4
        batch = next(train.host_batches())
        evaluation = data_lib.make_dataset(cfg, "test", training=False)
        eval_batches = list(evaluation.host_batches())
    assert batch["image"].shape == (8, 16, 16, 3) and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32 and set(batch["label"].tolist()) <= set(range(10))
    pixels = batch["image"] * IMAGENET_STD + IMAGENET_MEAN  # Back on the 0..255 scale.
    assert pixels.min() >= -1e-3 and pixels.max() <= 255 + 1e-3
    assert pixels.std() > 20  # Random mock pixels, not a constant.
    assert len(eval_batches) == 5
    assert [b["image"].shape for b in eval_batches] == [(8, 16, 16, 3)] * 5
    np.testing.assert_array_equal(np.concatenate([b["mask"] for b in eval_batches]),
                                  [1] * 37 + [0] * 3)
    eval_pixels = np.concatenate([b["image"] for b in eval_batches])[:37] * IMAGENET_STD
    eval_pixels += IMAGENET_MEAN
    assert eval_pixels.min() >= -1e-3 and eval_pixels.max() <= 255 + 1e-3


def test_tfds_mock_fashion_mnist_tiles_grayscale_and_random_resized_crop():
    cfg = _config(source="tfds", name="fashion_mnist", image_size=24, channels=3,
                  download=True, augment="imagenet")
    with tfds.testing.mock_data(num_examples=16):
        train = data_lib.make_dataset(cfg, "train", seed=0)
        batch = next(train.host_batches())
    assert batch["image"].shape == (8, 24, 24, 3)
    pixels = batch["image"] * IMAGENET_STD + IMAGENET_MEAN
    np.testing.assert_allclose(pixels[..., 0], pixels[..., 1], atol=1e-3)
    np.testing.assert_allclose(pixels[..., 0], pixels[..., 2], atol=1e-3)
    assert pixels.min() >= -1e-3 and pixels.max() <= 255 + 1e-3


# ----------------------------------------------------------------------------------------------
# TFDS: a tiny dataset prepared for real, so splits and files behave as in a real run.


class DnaJaxTinyImages(tfds.core.GeneratorBasedBuilder):
    """48 train + 21 test 8x8 grayscale images; every pixel of example i equals 3 i + 1."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(8, 8, 1)),
            "label": tfds.features.ClassLabel(num_classes=10)}))

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples(0, 48),
                "test": self._generate_examples(48, 69)}

    def _generate_examples(self, start, end):
        for i in range(start, end):
            yield i, {"image": np.full((8, 8, 1), 3 * i + 1, np.uint8), "label": i % 10}


@pytest.fixture(scope="module")
def tiny_tfds_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("tfds"))
    DnaJaxTinyImages(data_dir=directory).download_and_prepare()
    return directory


def _tiny_ids(batches):
    """Example index of every unmasked image (from its constant pixel value)."""
    ids = []
    for batch in batches:
        pixels = batch["image"] * IMAGENET_STD.mean() + IMAGENET_MEAN.mean()
        values = pixels.reshape(len(pixels), -1).mean(axis=1)
        for value, mask in zip(values, batch.get("mask", np.ones(len(values)))):
            if mask:
                ids.append(int(round((value - 1) / 3)))
    return ids


@pytest.mark.parametrize("training", [True, False])
def test_tfds_process_parts_are_disjoint_and_cover_the_split(tiny_tfds_dir, training):
    cfg = _config(source="tfds", name="dna_jax_tiny_images", data_dir=tiny_tfds_dir,
                  augment="none", crop_pct=1.0)
    split = "train" if training else "test"
    parts = []
    for index in range(2):
        ds = data_lib.make_dataset(cfg, split, training=training, process_index=index,
                                   process_count=2)
        assert ds.info.image_shape == (8, 8, 1) and ds.info.local_batch_size == 4
        parts.append(_tiny_ids(_take(ds.host_batches(), ds.info.num_batches)))
    everything = set(range(48)) if training else set(range(48, 69))
    for part in parts:
        assert len(part) == len(set(part))
    assert not set(parts[0]) & set(parts[1])
    assert set(parts[0]) | set(parts[1]) == everything


def test_tfds_resume_replays_the_uninterrupted_stream(tiny_tfds_dir):
    cfg = _config(source="tfds", name="dna_jax_tiny_images", data_dir=tiny_tfds_dir,
                  augment="crop_flip", crop_padding=2, channels=3)
    ds = data_lib.make_dataset(cfg, "train", training=True, seed=5)
    assert ds.info.num_batches == 6 and ds.info.image_shape == (8, 8, 3)
    full = _take(ds.host_batches(0), 9)  # One epoch boundary.
    _assert_batches_equal(full[4:], _take(ds.host_batches(4), 5))
    _assert_batches_equal(full[7:], _take(ds.host_batches(7), 2))
    assert not np.array_equal(full[0]["image"], full[6]["image"])  # Epochs differ.
