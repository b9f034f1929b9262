"""Bad checkpoint folders and tokenizers fail with errors that name the file, tensor or field."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from dpok_jax.models import load_llama, load_tokenizer


def _edit_config(folder, **changes):
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_llama(tmp_path / "nope")


def test_missing_config(hf_checkpoint):
    folder, _ = hf_checkpoint()
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_llama(folder)


def test_missing_weights(hf_checkpoint):
    folder, _ = hf_checkpoint()
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_llama(folder)


def test_index_pointing_to_missing_shard(hf_checkpoint):
    folder, _ = hf_checkpoint()
    names = list(load_file(folder / "model.safetensors"))
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    weight_map = {n: ("model-00001-of-00002.safetensors" if i % 2 else "model-00002-of-00002.safetensors")
                  for i, n in enumerate(names)}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        load_llama(folder)


def test_not_a_llama(hf_checkpoint):
    folder, _ = hf_checkpoint()
    _edit_config(folder, model_type="gpt2")
    with pytest.raises(ValueError, match=r"config.json: model_type is 'gpt2'"):
        load_llama(folder)


def test_unsupported_rope_type(hf_checkpoint):
    folder, _ = hf_checkpoint()
    _edit_config(folder, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0})
    with pytest.raises(ValueError, match="rope_type 'yarn'"):
        load_llama(folder)


def test_shape_disagrees_with_config(hf_checkpoint):
    folder, _ = hf_checkpoint()
    _edit_config(folder, intermediate_size=80)
    with pytest.raises(ValueError, match=r"model.safetensors: tensor 'model.layers.0.mlp.gate_proj.weight' has shape"):
        load_llama(folder)


def test_missing_tensor(hf_checkpoint):
    folder, _ = hf_checkpoint()
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="'model.layers.1.self_attn.k_proj.weight' is missing"):
        load_llama(folder)


def test_unexpected_tensor(hf_checkpoint):
    folder, _ = hf_checkpoint()
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(48, np.float32)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="unexpected tensor 'model.layers.0.self_attn.q_proj.bias'"):
        load_llama(folder)


def test_tokenizer_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        load_tokenizer(tmp_path)


def test_tokenizer_loads_from_local_folder(tmp_path):
    import tokenizers
    import transformers

    vocab = {"[PAD]": 0, "[UNK]": 1, "hello": 2, "world": 3}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    fast.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded("hello world")["input_ids"] == [2, 3]
    assert loaded.pad_token_id == 0
