"""dpok_jax.data."""
