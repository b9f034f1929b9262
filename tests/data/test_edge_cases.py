"""Issue 9 data edge cases: texts read exactly as written, the majority shape decides the format, bad
rows named by file and line, CSV text stays text, folders follow the file rules, clear whole-file
errors (empty, UTF-16, a tokenizer folder that is not one)."""

import csv
import json

import pytest

from dpok_jax.data import ByteTokenizer, load_preference_dataset, load_tokenizer, tokenize_pairs
from dpok_jax.data.formats import BAD_ROW_COLUMN
from dpok_jax.data.loading import ORIGIN_COLUMN

from .conftest import write_jsonl

TOK = ByteTokenizer()


def _load(src, **kw):
    return load_preference_dataset(str(src), **kw)


def _tokenize(ds, **kw):
    return tokenize_pairs(ds, TOK, max_prompt_length=32, max_length=64, **kw)


def test_one_non_string_value_does_not_retype_the_column(tmp_path):
    """Item 2: one int in `chosen` made datasets type the column Json and decode every string."""
    rows = [{"prompt": "p1", "chosen": '"Hello"', "rejected": " no"},
            {"prompt": "p2", "chosen": " 4", "rejected": " 5"},
            {"prompt": "p3", "chosen": "null", "rejected": " none"},
            {"prompt": "p4", "chosen": 5, "rejected": " five"},
            {"prompt": "p5", "chosen": "[1, 2]", "rejected": " {}"}]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    ds = _load(path)
    assert ds["chosen"] == ['"Hello"', " 4", "null", None, "[1, 2]"]
    assert ds["rejected"] == [" no", " 5", " none", None, " {}"]
    pairs, report = _tokenize(ds)
    assert pairs.example_index.tolist() == [0, 1, 2, 4]
    assert report.counts == {"not_a_string": 1}
    assert report.examples == {"not_a_string": [f"{path}:4"]}
    assert TOK.decode(pairs.chosen_ids[0].tolist()) == '"Hello"'


def _msg(role, content, **extra):
    return {"role": role, "content": content, **extra}


def test_conversational_detection_follows_the_majority_shape(tmp_path):
    """Item 3: one message with an extra key, or one without content, made every row not_a_string."""
    u = _msg("user", "2+2?")
    rows = [{"chosen": [u, _msg("assistant", "4")], "rejected": [u, _msg("assistant", "5")]},
            {"chosen": [_msg("user", "hi", name="ann"), _msg("assistant", "hello")],
             "rejected": [_msg("user", "hi", name="ann"), _msg("assistant", "go")]},
            {"chosen": [u, {"role": "assistant"}], "rejected": [u, _msg("assistant", "5")]},
            {"chosen": "a plain string", "rejected": "another"},
            {"chosen": [u, _msg("assistant", "four")], "rejected": [u, _msg("assistant", "five")]}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    ds = _load(path, tokenizer=TOK)
    assert ds[0]["chosen"] == "4\n" and ds[1]["prompt"] == "user: hi\nassistant: "
    assert ds[1]["chosen"] == "hello\n" and ds[4]["rejected"] == "five\n"
    pairs, report = _tokenize(ds)
    assert pairs.example_index.tolist() == [0, 1, 4]
    assert report.counts == {"bad_conversation": 2}
    assert report.examples == {"bad_conversation": [f"{path}:3", f"{path}:4"]}
    assert "chosen[1] is not a {role, content} message (has ['role'])" in report.details["bad_conversation"]


def test_extra_message_keys_reach_the_chat_template(tmp_path, hf_tokenizer_dir):
    tok = load_tokenizer(hf_tokenizer_dir)
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m.get('name', '') }}:{{ m['content'] }}"
                         "<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    rows = [{"chosen": [_msg("user", "hello", name="ann"), _msg("assistant", "hello world")],
             "rejected": [_msg("user", "hello", name="ann"), _msg("assistant", "the cat")]}]
    ds = _load(write_jsonl(tmp_path / "chat.jsonl", rows), tokenizer=tok)
    assert ds[0]["prompt"] == "<|user|>ann:hello<|end|><|assistant|>"


def test_bad_rows_are_named_by_file_and_line_in_reports_and_strict_mode(tmp_path):
    """Item 12 (loader side): lines count blank lines; strict mode names the same place."""
    path = tmp_path / "pairs.jsonl"
    good = json.dumps({"prompt": "p", "chosen": " a", "rejected": " b"})
    path.write_text("\n".join([good, "", good, json.dumps({"prompt": "p", "chosen": " a", "rejected": " a"}),
                               good]) + "\n")
    ds = _load(path)
    assert ds[ORIGIN_COLUMN] == [f"{path}:{i}" for i in (1, 3, 4, 5)]
    _, report = _tokenize(ds)
    assert report.examples == {"identical_responses": [f"{path}:4"]}
    with pytest.raises(ValueError, match=rf"^{path}:4: bad row \(identical_responses\)"):
        _tokenize(ds, strict=True)


def test_csv_text_columns_stay_text(tmp_path):
    """Item 13: all-digit texts were read as int64, "NA" / "None" as missing."""
    path = tmp_path / "pairs.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "chosen", "rejected"])
        w.writerows([["12", "007", "42"], ["Say NA", "NA", "None"], ["multi\nline", " yes", " no"],
                     ["p", " a"], ["", " x", " y"], ["p", "null", "nan"]])
    ds = _load(path)
    assert ds["prompt"] == ["12", "Say NA", "multi\nline", None, "", "p"]
    assert ds["chosen"] == ["007", "NA", " yes", None, " x", "null"]
    assert ds["rejected"] == ["42", "None", " no", None, " y", "nan"]
    assert ds[ORIGIN_COLUMN] == [f"{path}:{i}" for i in (2, 3, 4, 6, 7, 8)]
    pairs, report = _tokenize(ds)
    assert len(pairs) == 5 and report.examples == {"invalid_csv": [f"{path}:6"]}
    assert "2 fields, the header has 3" in report.details["invalid_csv"]


def test_csv_all_digit_columns_are_text(tmp_path):
    path = tmp_path / "digits.csv"
    path.write_text("prompt,chosen,rejected\n1,2,3\n10,20,30\n1,007,7\n")
    ds = _load(path)
    assert ds["prompt"] == ["1", "10", "1"] and ds["chosen"] == ["2", "20", "007"]
    pairs, report = _tokenize(ds)
    assert len(pairs) == 3 and report.total_skipped == 0
    assert TOK.decode(pairs.chosen_ids[2].tolist()) == "007"


def test_folder_reads_every_file_of_a_split_with_the_file_rules(tmp_path):
    """Item 14: train.jsonl + train.csv ignored the CSV; one bad JSONL line failed the whole folder."""
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"prompt": "j", "chosen": " 1", "rejected": " 2"}])
    with open(folder / "train.jsonl", "a") as f:
        f.write('{"prompt": "cut off\n')
    with open(folder / "train.csv", "w", newline="") as f:
        csv.writer(f).writerows([["prompt", "chosen", "rejected"], ["c", "007", "008"]])
    write_jsonl(folder / "test.jsonl", [{"prompt": "t", "chosen": " x", "rejected": " y"}])
    (folder / "README.md").write_text("not data")
    ds = _load(folder, split="train")
    assert ds["prompt"] == ["c", "j", None] and ds["chosen"] == ["007", " 1", None]
    assert ds[ORIGIN_COLUMN] == [f"{folder / 'train.csv'}:2", f"{folder / 'train.jsonl'}:1",
                                 f"{folder / 'train.jsonl'}:2"]
    assert ds[BAD_ROW_COLUMN][2].startswith("invalid_json")
    assert _load(folder, split="test")["prompt"] == ["t"]
    with pytest.raises(ValueError, match=r"no split 'validation'.*\['test', 'train'\]"):
        _load(folder, split="validation")


def test_folder_with_an_unreadable_file_names_that_file(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"prompt": "j", "chosen": " 1", "rejected": " 2"}])
    (folder / "train-2.jsonl").write_bytes("".encode("utf-16"))
    with pytest.raises(ValueError, match=r"train-2\.jsonl is UTF-16 encoded"):
        _load(folder)


@pytest.mark.parametrize("name, content, message", [
    ("empty.jsonl", b"", r"empty\.jsonl is empty: it holds no rows"),
    ("blank.jsonl", b"\n\n  \n", r"blank\.jsonl is empty: it holds no rows"),
    ("header.csv", b"prompt,chosen,rejected\n", r"header\.csv is empty: it holds no rows after the header"),
    ("empty.json", b"[]", r"empty\.json is empty"),
    ("utf16.jsonl", json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}).encode("utf-16"),
     r"utf16\.jsonl is UTF-16 encoded \(byte-order mark FF FE\); save it as UTF-8"),
    ("utf16.csv", "prompt,chosen,rejected\np,a,b\n".encode("utf-16-be"), r"utf16\.csv holds NUL bytes.*UTF-16"),
])
def test_whole_file_problems_are_one_clear_error(tmp_path, name, content, message):
    """Item 15: an empty file gave internal column names; a UTF-16 file gave undecodable rows."""
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        _load(path)


def test_utf8_byte_order_mark_is_not_part_of_the_first_row(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "p", "chosen": " a", "rejected": " b"}).encode())
    assert _load(path)[0]["prompt"] == "p"
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbfprompt,chosen,rejected\np,a,b\n")
    assert _load(path)["prompt"] == ["p"]


def test_a_model_folder_without_a_tokenizer_is_a_clear_error(tmp_path):
    """Item 15: a GPT-2 config folder gave an empty tokenizer, then every row identical_after_truncation."""
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                                                    "n_embd": 64, "n_layer": 2, "vocab_size": 50257}))
    with pytest.raises(ValueError, match=rf"{folder}.*no tokenizer files.*model_type 'gpt2'.*GPT2LMHeadModel"):
        load_tokenizer(folder)


def test_a_model_folder_that_is_not_a_llama_names_its_model_type(tmp_path):
    from dpok_jax.models.hf import read_config

    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match=rf"model_type is 'gpt2' \(architectures \['GPT2LMHeadModel'\]\).*"
                                         rf"{folder} is not a Llama checkpoint"):
        read_config(folder)
