"""`dpok export RUN_DIR OUT`: a run's trained policy as a Hugging Face Llama folder (weights,
config and tokenizer files), and `load_run_policy` for Python users (`dpok generate` uses it).

Only the policy's parameters are read from the newest readable checkpoint (orbax partial restore:
no optimizer state), onto this machine's first device, so a run trained on a pod exports on a laptop.
Weights that are not all finite are refused, naming the checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
from etils import epath
from flax import nnx

from dpok_jax import storage

from dpok_jax.config import Config, load_config
from dpok_jax.train.checkpoint import restore_policy


def _run_config(run_dir: epath.PathLike) -> Config:
    config_file = epath.Path(run_dir) / "config.yaml"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} not found: is {run_dir} a dpok run folder?")
    with storage.local_copy(config_file) as local:
        return load_config(local)


def load_run_policy(run_dir: epath.PathLike) -> tuple[Any, Any, Config]:
    """`(model, tokenizer, cfg)`: the run's trained policy as an NNX Llama on this machine."""
    from dpok_jax import data as data_lib
    from dpok_jax.models import build

    run_dir = epath.Path(run_dir)  # local or gs://...
    cfg = _run_config(run_dir)
    _, policy = restore_policy(run_dir / "checkpoints")
    tokenizer = data_lib.load_tokenizer(build.tokenizer_source(cfg.data.tokenizer, cfg.model.path))
    model = build.model_skeleton(cfg.model, tokenizer, seed=cfg.train.seed)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    nnx.replace_by_pure_dict(params, jax.tree.map(jax.numpy.asarray, policy))
    return nnx.merge(graphdef, params, rest), tokenizer, cfg


def export_run(run_dir: epath.PathLike, out: Path) -> Path:
    """Write the policy (safetensors + config.json) and its tokenizer files to `out`."""
    from dpok_jax.models import save_llama

    model, tokenizer, _ = load_run_policy(run_dir)
    save_llama(model, out)
    save_tokenizer(tokenizer, Path(out))
    return out


def save_tokenizer(tokenizer: Any, out: Path) -> None:
    """Tokenizer files `transformers.AutoTokenizer.from_pretrained(out)` loads: a Hugging Face
    tokenizer saves itself; the built-in byte tokenizer is written as an equivalent fast tokenizer."""
    from dpok_jax.data.tokenizer import ByteTokenizer

    if isinstance(tokenizer, ByteTokenizer):
        tokenizer = byte_tokenizer_as_hf()
    if not hasattr(tokenizer, "save_pretrained"):
        raise ValueError(f"cannot save tokenizer {tokenizer!r}: it has no save_pretrained")
    tokenizer.save_pretrained(str(out))


def byte_tokenizer_as_hf():
    """`ByteTokenizer` as a `transformers.PreTrainedTokenizerFast`: the same ids (byte b is id b;
    <pad> 256, <s> 257, </s> 258) and the same chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    from dpok_jax.data.tokenizer import ByteTokenizer

    byte = ByteTokenizer()
    alphabet = ByteLevel.alphabet()  # the 256 printable stand-ins of bytes, in no particular order
    stand_in = _bytes_to_unicode()
    assert sorted(stand_in.values()) == sorted(alphabet)
    vocab = {stand_in[b]: b for b in range(256)}
    vocab.update({byte.pad_token: byte.pad_token_id, byte.bos_token: byte.bos_token_id,
                  byte.eos_token: byte.eos_token_id})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant: {% endif %}")
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=byte.bos_token, eos_token=byte.eos_token,
        pad_token=byte.pad_token, chat_template=template, model_max_length=1 << 30)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what tokenizers' ByteLevel uses)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars
