"""dpok_jax.models."""
