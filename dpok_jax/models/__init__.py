"""Llama 3 in Flax NNX, Hugging Face and GGUF checkpoint import / export, a KV-cache sampler, and a
BERT sentence encoder."""

from dpok_jax.models.encoder import SentenceEncoder
from dpok_jax.models.generate import generate, generate_ids
from dpok_jax.models.gguf import load_gguf_llama, load_gguf_tokenizer, read_gguf_config
from dpok_jax.models.hf import load_llama, load_tokenizer, read_config, save_llama
from dpok_jax.models.llama import Llama, ModelConfig, RopeScaling, init_llama

__all__ = ["Llama", "ModelConfig", "RopeScaling", "SentenceEncoder", "generate", "generate_ids", "init_llama",
           "load_gguf_llama", "load_gguf_tokenizer", "load_llama", "load_tokenizer", "read_config",
           "read_gguf_config", "save_llama"]
