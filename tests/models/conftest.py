"""Tiny random `transformers` Llama checkpoints written to tmp folders, and padded batches."""

import numpy as np
import pytest
import torch
import transformers


def tiny_hf_config(**overrides) -> transformers.LlamaConfig:
    base = dict(
        vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=12, max_position_embeddings=256, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=False, attn_implementation="eager",
    )
    base.update(overrides)
    return transformers.LlamaConfig(**base)


def random_torch_llama(config: transformers.LlamaConfig, seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        # Norm weights init to ones; randomize them so a mixed-up norm mapping cannot pass.
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return model


@pytest.fixture
def hf_checkpoint(tmp_path):
    """Factory: ``hf_checkpoint(**config_overrides) -> (folder, torch_model)``."""
    count = [0]

    def make(seed=0, **overrides):
        model = random_torch_llama(tiny_hf_config(**overrides), seed)
        folder = tmp_path / f"ckpt{count[0]}"
        count[0] += 1
        model.save_pretrained(folder)
        return folder, model

    return make


def padded_batch(vocab: int, lengths, seq_len: int, *, left: bool, seed: int = 0):
    """``(input_ids, attention_mask)`` int32 ``[B, T]`` with ``lengths`` real tokens per row."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=(len(lengths), seq_len)).astype(np.int32)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        if left:
            mask[row, seq_len - n:] = 1
        else:
            mask[row, :n] = 1
    ids = np.where(mask == 1, ids, 0).astype(np.int32)
    return ids, mask


def torch_logits(model, ids, mask) -> np.ndarray:
    """HF logits with position ids computed as ours (cumsum(mask) - 1, clipped at 0)."""
    positions = np.maximum(np.cumsum(mask, axis=-1) - 1, 0)
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(ids.astype(np.int64)),
            attention_mask=torch.from_numpy(mask.astype(np.int64)),
            position_ids=torch.from_numpy(positions.astype(np.int64)),
        )
    return out.logits.float().numpy()


@pytest.fixture
def helpers():
    """The module-level helpers, for test files (importlib mode cannot import conftest directly)."""
    class H:
        pass

    H.tiny_hf_config = staticmethod(tiny_hf_config)
    H.random_torch_llama = staticmethod(random_torch_llama)
    H.padded_batch = staticmethod(padded_batch)
    H.torch_logits = staticmethod(torch_logits)
    return H
