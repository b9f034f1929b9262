"""dpok_jax.train."""
