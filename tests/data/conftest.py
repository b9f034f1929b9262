"""Fixtures for the data tests: small local files and a tiny local Hugging Face tokenizer."""

import json
from pathlib import Path

import pytest

HH_RLHF = Path(__file__).resolve().parents[3] / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_hf_tokenizer(folder: Path, *, bos: bool = True, pad: bool = False, chat_template: bool = True):
    """A byte-level BPE tokenizer trained on a few strings, saved as a `transformers` tokenizer folder."""
    import transformers
    from tokenizers import ByteLevelBPETokenizer

    specials = ["<eos>", "<bos>", "<pad>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["the cat sat on the mat", "hello world", "what is two plus two"] * 5,
                            vocab_size=300, min_frequency=1, special_tokens=specials, show_progress=False)
    kwargs = dict(tokenizer_object=bpe._tokenizer, eos_token="<eos>")
    if bos:
        kwargs["bos_token"] = "<bos>"
    if pad:
        kwargs["pad_token"] = "<pad>"
    tok = transformers.PreTrainedTokenizerFast(**kwargs)
    if chat_template:
        tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(folder))
    return folder


@pytest.fixture
def hh_path() -> Path:
    if not HH_RLHF.exists():
        pytest.skip(f"HH-RLHF test file absent: {HH_RLHF} (read-only shared data, not part of the package)")
    return HH_RLHF


@pytest.fixture(scope="session")
def hf_tokenizer_dir(tmp_path_factory) -> Path:
    """A local tokenizer folder with BOS and EOS but no pad token, and a chat template."""
    return make_hf_tokenizer(tmp_path_factory.mktemp("hf_tok"), bos=True)
