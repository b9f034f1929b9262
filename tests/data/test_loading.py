"""Each data format, from local files, through `load_preference_dataset` and `tokenize_pairs`."""

import gzip
import json
import os

import datasets
import pytest

from dpok_jax.data import ByteTokenizer, load_preference_dataset, load_tokenizer, tokenize_pairs
from dpok_jax.data.formats import ASSISTANT_MARKER, BAD_ROW_COLUMN
from dpok_jax.data.loading import ORIGIN_COLUMN

from .conftest import write_jsonl

EXPLICIT = [
    {"prompt": "What is 2+2?", "chosen": " 4", "rejected": " 5", "task": "math"},
    {"prompt": "Capital of France?", "chosen": " Paris", "rejected": " Rome", "task": "facts"},
    {"prompt": "Say hi", "chosen": " hi", "rejected": " bye", "task": "math"},
]


def _load(src, tmp_path, **kw):
    return load_preference_dataset(str(src), cache_dir=str(tmp_path / "cache"), **kw)


@pytest.mark.parametrize("kind", ["jsonl", "json", "jsonl.gz", "parquet"])
def test_explicit_from_each_file_type(tmp_path, kind):
    path = tmp_path / f"pairs.{kind}"
    if kind == "jsonl":
        write_jsonl(path, EXPLICIT)
    elif kind == "json":
        path.write_text(json.dumps(EXPLICIT))
    elif kind == "jsonl.gz":
        with gzip.open(path, "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in EXPLICIT)
    else:
        datasets.Dataset.from_list(EXPLICIT).to_parquet(str(path))
    ds = _load(path, tmp_path)
    assert ds.column_names == ["prompt", "chosen", "rejected", "task", BAD_ROW_COLUMN, ORIGIN_COLUMN]
    cols = ["prompt", "chosen", "rejected", "task"]
    assert [dict(zip(cols, v)) for v in zip(*(ds[c] for c in cols))] == EXPLICIT
    assert ds[BAD_ROW_COLUMN] == [None] * 3
    where = {"jsonl": ":{}", "jsonl.gz": ":{}", "json": ":1", "parquet": " record {}"}[kind]
    assert ds[ORIGIN_COLUMN] == [f"{path}{where.format(i)}" for i in (1, 2, 3)]
    pairs, report = tokenize_pairs(ds, ByteTokenizer(), max_prompt_length=32, max_length=64)
    assert len(pairs) == 3 and report.total_skipped == 0
    assert pairs.task_names == ("facts", "math") and pairs.task_id.tolist() == [1, 0, 1]


def test_folder_splits(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", EXPLICIT)
    write_jsonl(folder / "test.jsonl", EXPLICIT[:1])
    assert _load(folder, tmp_path, split="test").num_rows == 1
    assert _load(folder, tmp_path, split="train").num_rows == 3
    with pytest.raises(ValueError, match=r"no split 'validation'.*\['test', 'train'\]"):
        _load(folder, tmp_path, split="validation")


def test_implicit_prompt_is_shared_prefix_to_last_assistant_turn(tmp_path):
    rows = [
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Joke?\n\nAssistant: Why did the chicken...",
         "rejected": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Joke?\n\nAssistant: No."},
        # Shared text after the marker stays in the responses, so the prompt ends at the marker.
        {"chosen": "\n\nHuman: Help?\n\nAssistant: I can do that.", "rejected": "\n\nHuman: Help?\n\nAssistant: I won't."},
        {"chosen": "Human: no marker here", "rejected": "Human: nor here"},
        {"chosen": "\n\nHuman: Hi\n\nAssistant: same", "rejected": "\n\nHuman: Hi\n\nAssistant: same"},
    ]
    ds = _load(write_jsonl(tmp_path / "hh.jsonl", rows), tmp_path)
    assert ds[0]["prompt"] == "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Joke?\n\nAssistant:"
    assert (ds[0]["chosen"], ds[0]["rejected"]) == (" Why did the chicken...", " No.")
    assert (ds[1]["prompt"], ds[1]["chosen"], ds[1]["rejected"]) == (
        "\n\nHuman: Help?\n\nAssistant:", " I can do that.", " I won't.")
    assert ds[2][BAD_ROW_COLUMN].startswith("no_shared_prompt")
    pairs, report = tokenize_pairs(ds, ByteTokenizer(), max_prompt_length=64, max_length=128)
    assert pairs.example_index.tolist() == [0, 1]
    assert report.counts == {"no_shared_prompt": 1, "identical_responses": 1}
    path = tmp_path / "hh.jsonl"
    assert report.examples == {"no_shared_prompt": [f"{path}:3"], "identical_responses": [f"{path}:4"]}


def test_hh_rlhf_harmless_base(hh_path, tmp_path):
    ds = _load(hh_path, tmp_path)
    raw = datasets.load_dataset("json", data_files=str(hh_path), split="train", cache_dir=str(tmp_path / "cache"))
    assert ds.num_rows == raw.num_rows == 2312
    cols, raw_cols = ds[:], raw[:]
    last_turn = 0
    for i in range(ds.num_rows):
        if cols[BAD_ROW_COLUMN][i]:
            continue
        prompt = cols["prompt"][i]
        assert prompt.endswith(ASSISTANT_MARKER) and prompt.startswith("\n\nHuman:")
        assert prompt + cols["chosen"][i] == raw_cols["chosen"][i]
        assert prompt + cols["rejected"][i] == raw_cols["rejected"][i]
        # The prompt is the longest shared prefix ending at the marker: the responses share no marker.
        assert ASSISTANT_MARKER not in os.path.commonprefix([cols["chosen"][i], cols["rejected"][i]])
        last_turn += ASSISTANT_MARKER not in cols["chosen"][i] + cols["rejected"][i]
    assert last_turn >= 0.99 * ds.num_rows  # a few dialogues diverge before the last turn
    pairs, report = tokenize_pairs(ds, ByteTokenizer(), max_prompt_length=256, max_length=512)
    assert report.total_rows == 2312 and len(pairs) == report.kept > 2250
    assert len(pairs) + report.total_skipped == 2312
    assert set(report.counts) <= {"empty_response", "identical_responses", "no_shared_prompt"}
    assert pairs.lengths.max() <= 512 and max(len(p) for p in pairs.prompt_ids) <= 256
    tok = ByteTokenizer()
    # A prompt cut from the left keeps BOS and the text nearest the response.
    i = next(j for j, p in enumerate(pairs.prompt_ids) if len(p) == 256)
    row = int(pairs.example_index[i])
    assert pairs.prompt_ids[i][0] == tok.bos_token_id
    assert cols["prompt"][row].encode().endswith(bytes(pairs.prompt_ids[i][1:].tolist()))


def _conversations():
    user = {"role": "user", "content": "What is two plus two?"}
    return [
        {"chosen": [user, {"role": "assistant", "content": "4"}], "rejected": [user, {"role": "assistant", "content": "5"}]},
        {"chosen": [user, {"role": "assistant", "content": "4"}], "rejected": [{"role": "user", "content": "other"}]},
        {"chosen": [user, {"role": "assistant", "content": "x"}], "rejected": [user, {"role": "assistant", "content": "x"}]},
    ]


def test_conversational_shared_prefix_with_byte_template(tmp_path):
    ds = _load(write_jsonl(tmp_path / "conv.jsonl", _conversations()), tmp_path, tokenizer=ByteTokenizer())
    assert (ds[0]["prompt"], ds[0]["chosen"], ds[0]["rejected"]) == (
        "user: What is two plus two?\nassistant: ", "4\n", "5\n")
    assert ds[1][BAD_ROW_COLUMN].startswith("bad_conversation")
    pairs, report = tokenize_pairs(ds, ByteTokenizer(), max_prompt_length=64, max_length=96)
    assert len(pairs) == 1 and report.counts == {"bad_conversation": 1, "identical_responses": 1}


def test_conversational_prompt_column_with_hf_template(tmp_path, hf_tokenizer_dir):
    tok = load_tokenizer(hf_tokenizer_dir)
    rows = [{"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}],
             "chosen": [{"role": "assistant", "content": "hello world"}],
             "rejected": [{"role": "assistant", "content": "the cat"}]}]
    ds = _load(write_jsonl(tmp_path / "conv.jsonl", rows), tmp_path, tokenizer=tok)
    assert ds[0]["prompt"] == "<|system|>be brief<|end|><|user|>hello<|end|><|assistant|>"
    assert (ds[0]["chosen"], ds[0]["rejected"]) == ("hello world<|end|>", "the cat<|end|>")
    pairs, _ = tokenize_pairs(ds, tok, max_prompt_length=32, max_length=64)
    assert pairs.prompt_ids[0][0] == tok.bos_token_id
    assert tok.decode(pairs.chosen_ids[0].tolist()) == "hello world<|end|><eos>"
    assert pairs.chosen_ids[0][-1] == tok.eos_token_id


def test_conversational_needs_a_tokenizer(tmp_path):
    with pytest.raises(ValueError, match="conversational format needs tokenizer="):
        _load(write_jsonl(tmp_path / "conv.jsonl", _conversations()), tmp_path)


def test_format_detection_and_override(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "p", "chosen": "\n\nAssistant: a", "rejected": "\n\nAssistant: b"}])
    assert _load(path, tmp_path)[0]["prompt"] == "p"  # auto: a prompt column means explicit
    forced = _load(path, tmp_path, format="implicit")
    assert (forced[0]["prompt"], forced[0]["chosen"]) == ("\n\nAssistant:", " a")
    with pytest.raises(ValueError, match="format 'weird'"):
        _load(path, tmp_path, format="weird")


def test_errors_name_the_file_or_column(tmp_path):
    path = write_jsonl(tmp_path / "nochosen.jsonl", [{"prompt": "p", "answer": "a"}])
    with pytest.raises(ValueError, match=r"nochosen\.jsonl.*no column\(s\) \['chosen', 'rejected'\]"):
        _load(path, tmp_path)
    path = write_jsonl(tmp_path / "noprompt.jsonl", [{"chosen": "a", "rejected": "b"}])
    with pytest.raises(ValueError, match=r"noprompt\.jsonl.*explicit format needs a 'prompt' column"):
        _load(path, tmp_path, format="explicit")
    (tmp_path / "pairs.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"pairs\.txt: unsupported type"):
        _load(tmp_path / "pairs.txt", tmp_path)
    (tmp_path / "broken.json").write_text('[{"prompt": "p", "chosen": "a", "rejected": "b"},\n {not json}]')
    with pytest.raises(ValueError, match=r"broken\.json: invalid JSON at line 2 column 3"):
        _load(tmp_path / "broken.json", tmp_path)


def test_missing_source_is_tried_as_hub_name_and_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=r"'no/such-dataset' is not a local file or folder"):
        _load("no/such-dataset", tmp_path)


def test_unreadable_json_lines_become_counted_bad_rows(tmp_path):
    path = tmp_path / "mixed.jsonl"
    good = json.dumps({"prompt": "p", "chosen": " a", "rejected": " b"}).encode()
    path.write_bytes(b"\n".join([
        good,
        b'{"prompt": "p\xff", "chosen": " a", "rejected": " b"}',  # invalid UTF-8
        b'{"prompt": "p", "chosen": "\\ud800", "rejected": " b"}',  # lone surrogate
        b'{"prompt": "p", "chosen": ',  # cut off
        good,
    ]) + b"\n")
    ds = _load(path, tmp_path)
    assert ds.num_rows == 5
    pairs, report = tokenize_pairs(ds, ByteTokenizer(), max_prompt_length=8, max_length=16)
    assert pairs.example_index.tolist() == [0, 4]
    assert report.counts == {"undecodable": 2, "invalid_json": 1}
    assert report.examples == {"undecodable": [f"{path}:2", f"{path}:3"], "invalid_json": [f"{path}:4"]}
    with pytest.raises(ValueError, match=rf"{path}:2: bad row \(undecodable\)"):
        tokenize_pairs(ds, ByteTokenizer(), max_prompt_length=8, max_length=16, strict=True)


def test_extra_columns_task_and_embeddings_pass_through(tmp_path):
    rows = [dict(r, embedding_prompt=[1.0, 0.0], embedding_chosen=[0.0, 1.0], embedding_rejected=[1.0, 1.0],
                 source_url="dropped") for r in EXPLICIT]
    ds = _load(write_jsonl(tmp_path / "e.jsonl", rows), tmp_path)
    assert ds.column_names == ["prompt", "chosen", "rejected", "task", "embedding_prompt",
                               "embedding_chosen", "embedding_rejected", BAD_ROW_COLUMN, ORIGIN_COLUMN]
    ds = _load(write_jsonl(tmp_path / "h.jsonl", [{"chosen": "\n\nAssistant: a", "rejected": "\n\nAssistant: b",
                                                    "task": "t", "embedding_prompt": [1.0]}]), tmp_path)
    assert ds.column_names == ["prompt", "chosen", "rejected", "task", "embedding_prompt", BAD_ROW_COLUMN,
                               ORIGIN_COLUMN]


def test_in_memory_dataset_and_dict(tmp_path):
    d = datasets.DatasetDict({"train": datasets.Dataset.from_list(EXPLICIT)})
    assert load_preference_dataset(d, split="train").num_rows == 3
    assert load_preference_dataset(d["train"]).num_rows == 3
    with pytest.raises(ValueError, match="no split 'test'"):
        load_preference_dataset(d, split="test")
