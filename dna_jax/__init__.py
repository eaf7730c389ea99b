"""dna_jax: DNA, DNA+ and DNA++ block-wise neural architecture search in JAX/Flax."""

__version__ = "0.1.0"
