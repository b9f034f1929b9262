"""The byte tokenizer and `load_tokenizer`."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dpok_jax.data import ByteTokenizer, load_tokenizer

TOK = ByteTokenizer()


def test_special_ids_and_vocab():
    assert (TOK.pad_token_id, TOK.bos_token_id, TOK.eos_token_id, TOK.vocab_size, len(TOK)) == (256, 257, 258, 259, 259)
    assert TOK.encode("A", add_special_tokens=True) == [257, 65]
    assert TOK(["ab", "c"])["input_ids"] == [[97, 98], [99]]


@given(st.text(st.characters(blacklist_categories=("Cs",))))
def test_round_trip(text):
    ids = TOK.encode(text)
    assert all(0 <= i < 256 for i in ids) and len(ids) == len(text.encode("utf-8"))
    assert TOK.decode([TOK.bos_token_id] + ids + [TOK.eos_token_id, TOK.pad_token_id]) == text


def test_decode_specials_and_invalid_bytes():
    assert TOK.decode([257, 104, 105, 258, 256], skip_special_tokens=False) == "<s>hi</s><pad>"
    assert TOK.decode([0xC3]) == "\ufffd"  # a cut UTF-8 sequence decodes with a replacement character
    with pytest.raises(ValueError, match="id 300 is outside"):
        TOK.decode([300])


def test_chat_template():
    msgs = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}]
    assert TOK.apply_chat_template(msgs) == "system: be kind\nuser: hi\nassistant: hello\n"
    assert TOK.apply_chat_template(msgs[:2], add_generation_prompt=True).endswith("user: hi\nassistant: ")
    assert TOK.apply_chat_template(msgs[1:2], tokenize=True) == list(b"user: hi\n")
    with pytest.raises(ValueError, match="chat message 0 must be a dict"):
        TOK.apply_chat_template([{"role": "user"}])


def test_load_tokenizer(hf_tokenizer_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network retries here
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    tok = load_tokenizer(hf_tokenizer_dir)
    assert tok.pad_token == tok.eos_token == "<eos>"  # no pad token in the files: EOS stands in
    assert tok.bos_token_id is not None
    with pytest.raises(ValueError, match="no such local path .*missing"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(ValueError, match="cannot load a tokenizer from 'no-such-org/no-such-tok'"):
        load_tokenizer("no-such-org/no-such-tok")  # a hub name: tried, and fails offline
