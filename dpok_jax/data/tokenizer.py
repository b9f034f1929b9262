"""The built-in byte-level tokenizer, and `load_tokenizer` for it or a local Hugging Face tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


class ByteTokenizer:
    """UTF-8 bytes as tokens: bytes 0-255 are ids 0-255, then ``<pad>`` 256, ``<s>`` 257, ``</s>`` 258.

    Needs no file and no network, and never fails on any text (every string has a UTF-8 encoding,
    except strings with lone surrogates, which raise `UnicodeEncodeError`). The method names and
    keywords follow `transformers` tokenizers, so the rest of the code treats both alike.

    Chat template (`apply_chat_template`): each message becomes ``"{role}: {content}\\n"``; the
    generation prompt is ``"assistant: "``. So an assistant reply renders as ``"{content}\\n"`` after
    the prompt.

    >>> tok = ByteTokenizer()
    >>> tok.encode("hé")
    [104, 195, 169]
    >>> tok.decode([257, 104, 195, 169, 258]), tok.decode([104, 258], skip_special_tokens=False)
    ('hé', 'h</s>')
    >>> tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    'user: hi\\nassistant: '
    """

    pad_token_id = 256
    bos_token_id = 257
    eos_token_id = 258
    vocab_size = 259
    pad_token, bos_token, eos_token = "<pad>", "<s>", "</s>"
    name_or_path = "byte"
    _special = {256: "<pad>", 257: "<s>", 258: "</s>"}

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=259, pad=256, bos=257, eos=258)"

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text` (its UTF-8 bytes); `add_special_tokens` prepends BOS (no EOS, as Llama)."""
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id] + ids if add_special_tokens else ids

    def __call__(self, texts: str | Sequence[str], add_special_tokens: bool = False) -> dict[str, Any]:
        """``{"input_ids": ...}`` for one text or a list of texts, as a `transformers` tokenizer."""
        if isinstance(texts, str):
            return {"input_ids": self.encode(texts, add_special_tokens)}
        return {"input_ids": [self.encode(t, add_special_tokens) for t in texts]}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; invalid UTF-8 becomes U+FFFD; special ids are dropped or shown by name."""
        out: list[str] = []
        run = bytearray()
        for i in (int(t) for t in ids):
            if 0 <= i < 256:
                run.append(i)
                continue
            if i not in self._special:
                raise ValueError(f"ByteTokenizer.decode: id {i} is outside the vocabulary [0, 259)")
            if not skip_special_tokens:
                out.append(run.decode("utf-8", errors="replace"))
                run = bytearray()
                out.append(self._special[i])
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def apply_chat_template(self, messages: Sequence[dict], tokenize: bool = False,
                            add_generation_prompt: bool = False, **_: Any) -> str | list[int]:
        """Render ``[{"role", "content"}, ...]`` as ``"role: content\\n"`` lines (+ ``"assistant: "``)."""
        parts = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                    or not isinstance(m.get("content"), str):
                raise ValueError(f"chat message {i} must be a dict with string 'role' and 'content', "
                                 f"got {m!r}")
            parts.append(f"{m['role']}: {m['content']}\n")
        if add_generation_prompt:
            parts.append("assistant: ")
        text = "".join(parts)
        return self.encode(text) if tokenize else text


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")


def _model_kind(folder: Path) -> str:
    """``"; its config.json says model_type 'gpt2' (architectures [...])"`` when there is one, else ""."""
    import json

    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return ""
    if not isinstance(config, dict):
        return ""
    return (f"; its config.json says model_type {config.get('model_type')!r} (architectures "
            f"{config.get('architectures')})")


def load_tokenizer(name_or_path: str | Path) -> Any:
    """``"byte"`` gives `ByteTokenizer`; a ``.gguf`` file the tokenizer in its metadata
    (`dpok_jax.models.gguf.load_gguf_tokenizer`); anything else a `transformers.AutoTokenizer`.

    A name that is not a local path and does not look like one (``org/name``) is tried as a hub name
    (works only online); any failure raises `ValueError` naming it, as does a local folder without
    tokenizer files (e.g. a model folder holding only ``config.json``; the error quotes its
    ``model_type``) or a tokenizer that turns text into no tokens. A Hugging Face tokenizer without a
    pad token gets its EOS token as pad (padding is always masked out, so the choice only needs to be
    a valid id).

    >>> load_tokenizer("byte").eos_token_id
    258
    """
    if str(name_or_path) == "byte":
        return ByteTokenizer()
    path = Path(name_or_path).expanduser()
    text = str(name_or_path)
    if text.endswith(".gguf"):
        from dpok_jax.models.gguf import load_gguf_tokenizer

        tok = load_gguf_tokenizer(path)  # errors name the file
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        return tok
    if not path.exists() and (text.startswith(("/", ".", "~")) or text.count("/") > 1):
        raise ValueError(f"cannot load a tokenizer: no such local path {text!r} (and it is not a hub name). "
                         "Use 'byte' for the built-in byte tokenizer, or a folder with tokenizer files.")
    if path.is_dir() and not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ValueError(f"cannot load a tokenizer from folder {str(path)!r}: no tokenizer files in it (expected "
                         f"one of {', '.join(TOKENIZER_FILES)}){_model_kind(path)}. Use 'byte' for the built-in "
                         "byte tokenizer, or a folder with tokenizer files (data.tokenizer / model.path).")
    import transformers

    where = f"local path {str(path)!r}" if path.exists() else \
        f"{str(name_or_path)!r} (no such local path, so it was tried as a hub name)"
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(path) if path.exists() else str(name_or_path))
    except Exception as e:  # transformers raises OSError, ValueError or HF hub errors
        raise ValueError(f"cannot load a tokenizer from {where}: {type(e).__name__}: {e}. "
                         "Use 'byte' for the built-in byte tokenizer, or a folder with tokenizer files.") from e
    probe = tok("Hello, world.", add_special_tokens=False)["input_ids"]
    if not probe:
        raise ValueError(f"tokenizer from {where} turns text into no tokens (vocabulary of {len(tok)})"
                         f"{_model_kind(path) if path.is_dir() else ''}; it cannot tokenize the data")
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer from {where} has no EOS token; responses must end with one")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok
