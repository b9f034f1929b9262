"""dpok_jax.evaluation."""
