"""dpok_jax: DPO-Kernels preference optimization in JAX/Flax."""

__version__ = "0.1.0"
