"""Input pipelines: TFDS datasets, offline Fashion-MNIST, synthetic data."""

from dna_jax.data.fashion_mnist import DataNotFoundError
from dna_jax.data.pipeline import (Dataset, DatasetInfo, get_default_config,
                                   input_normalisation, make_dataset, steps_for_epochs)

__all__ = ["DataNotFoundError", "Dataset", "DatasetInfo", "get_default_config",
           "input_normalisation", "make_dataset", "steps_for_epochs"]
