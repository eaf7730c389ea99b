"""The built-in supervision kinds (see dna_jax.supervision): `dna` (teacher) and `dna_pp` (ssl)."""
