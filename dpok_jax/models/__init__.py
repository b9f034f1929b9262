"""Llama 3 in Flax NNX and Hugging Face checkpoint import / export."""

from dpok_jax.models.hf import load_llama, load_tokenizer, read_config, save_llama
from dpok_jax.models.llama import Llama, ModelConfig, RopeScaling, init_llama

__all__ = ["Llama", "ModelConfig", "RopeScaling", "init_llama", "load_llama", "load_tokenizer", "read_config", "save_llama"]
