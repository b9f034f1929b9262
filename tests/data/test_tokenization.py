"""`tokenize_pairs`: the length rule, the bad-row report (each reason), strict mode, tasks, embeddings."""

import json

import datasets
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpok_jax.data import REASONS, TASKS, BadRowReport, ByteTokenizer, load_tokenizer, tokenize_pairs
from dpok_jax.data.formats import BAD_ROW_COLUMN

from .conftest import make_hf_tokenizer

TOK = ByteTokenizer()
BOS, EOS = TOK.bos_token_id, TOK.eos_token_id


def _ds(rows, features=None):
    return datasets.Dataset.from_list(rows, features=features)


def test_length_rule_left_truncates_prompt_and_cuts_long_responses():
    ds = _ds([{"prompt": "abcdefghij", "chosen": " xy", "rejected": " 0123456789"}])
    pairs, report = tokenize_pairs(ds, TOK, max_prompt_length=5, max_length=10)
    assert pairs.prompt_ids[0].tolist() == [BOS] + list(b"ghij")  # BOS kept, the end of the prompt kept
    assert pairs.chosen_ids[0].tolist() == list(b" xy") + [EOS]  # fits: ends with EOS
    assert pairs.rejected_ids[0].tolist() == list(b" 0123")  # cut to the 5 tokens left: no EOS
    assert report.truncated == {"prompt": 1, "rejected": 1} and report.total_skipped == 0
    assert pairs.lengths.tolist() == [10]


def test_responses_identical_after_truncation_are_skipped_and_counted():
    ds = _ds([{"prompt": "p", "chosen": " same start, then A", "rejected": " same start, then B"}])
    pairs, report = tokenize_pairs(ds, TOK, max_prompt_length=4, max_length=8)
    assert len(pairs) == 0 and report.counts == {"identical_after_truncation": 1}
    pairs, report = tokenize_pairs(ds, TOK, max_prompt_length=4, max_length=32)
    assert len(pairs) == 1 and report.total_skipped == 0


def _bad_rows():
    """One row per reason that raw explicit rows can have, plus good rows around them."""
    good = {"prompt": "p", "chosen": " a", "rejected": " b", BAD_ROW_COLUMN: None}
    return [
        good,                                                              # 0
        dict(good, chosen=None),                                           # 1 missing_field
        dict(good, rejected="   "),                                        # 2 empty_response
        dict(good, rejected=" a"),                                         # 3 identical_responses
        dict(good, chosen=" " + "long " * 10, rejected=" " + "long " * 10 + "!"),  # 4 identical_after_truncation
        dict(good, prompt=None, chosen=None, rejected=None, **{BAD_ROW_COLUMN: "no_shared_prompt: no marker"}),  # 5
        dict(good, prompt="q" * 100),                                      # 6 kept, prompt truncated
        dict(good, chosen=b"\xff\xfe"),                                    # 7 undecodable
        dict(good, rejected=7),                                            # 8 not_a_string
    ]


def _bad_dataset():
    feats = datasets.Features({"prompt": datasets.Value("string"), "chosen": datasets.Json(),
                               "rejected": datasets.Json(), BAD_ROW_COLUMN: datasets.Value("string")})
    rows = _bad_rows()
    rows[7]["chosen"] = None  # bytes do not fit a JSON column; test them apart below
    rows[7][BAD_ROW_COLUMN] = "undecodable: line 8 is not UTF-8"
    return _ds(rows, feats)


def test_bad_row_report_counts_every_reason(tmp_path):
    pairs, report = tokenize_pairs(_bad_dataset(), TOK, max_prompt_length=16, max_length=24)
    assert pairs.example_index.tolist() == [0, 6]
    assert report.counts == {"missing_field": 1, "empty_response": 1, "identical_responses": 1,
                             "identical_after_truncation": 1, "no_shared_prompt": 1, "undecodable": 1,
                             "not_a_string": 1}
    assert report.examples["not_a_string"] == ["row 8"] and report.examples["missing_field"] == ["row 1"]
    assert report.kept == 2 and report.total_skipped == 7 and report.total_rows == 9
    assert report.truncated == {"prompt": 1}
    text = report.summary()
    for reason in report.counts:
        assert reason in text
    assert "kept 2 of 9 rows, skipped 7" in text and "row 8: 'rejected' is a int" in text
    saved = json.loads(report.save(tmp_path / "run" / "bad_rows.json").read_text())
    assert saved["skipped"] == report.counts and saved["total_skipped"] == 7
    assert saved["reasons"]["no_shared_prompt"] == REASONS["no_shared_prompt"]


def test_bytes_fields_are_decoded_or_reported():
    feats = datasets.Features({k: datasets.Value("binary") for k in ("prompt", "chosen", "rejected")})
    ds = _ds([{"prompt": b"p", "chosen": "é".encode(), "rejected": b" b"},
              {"prompt": b"p", "chosen": b"\xff", "rejected": b" b"}], feats)
    pairs, report = tokenize_pairs(ds, TOK, max_prompt_length=8, max_length=16)
    assert pairs.chosen_ids[0].tolist() == list("é".encode()) + [EOS]
    assert report.counts == {"undecodable": 1} and "'chosen' is not valid UTF-8" in report.details["undecodable"]


@pytest.mark.parametrize("row, reason", [(1, "missing_field"), (2, "empty_response"), (5, "no_shared_prompt"),
                                         (8, "not_a_string")])
def test_strict_raises_naming_the_row(row, reason):
    ds = _bad_dataset().select([0, row])
    with pytest.raises(ValueError, match=rf"^row 1: bad row \({reason}\)"):
        tokenize_pairs(ds, TOK, max_prompt_length=16, max_length=24, strict=True)


def test_report_accumulates_across_calls_and_rejects_unknown_reasons():
    report = BadRowReport(source="two files")
    tokenize_pairs(_bad_dataset(), TOK, max_prompt_length=16, max_length=24, report=report)
    tokenize_pairs(_bad_dataset(), TOK, max_prompt_length=16, max_length=24, report=report)
    assert report.total_skipped == 14 and report.kept == 4 and report.summary().startswith("two files:")
    with pytest.raises(ValueError, match="unknown bad-row reason"):
        report.add("bogus", 0)


def test_task_ids():
    rows = [{"prompt": "p", "chosen": " a", "rejected": " b", "task": t} for t in ("safety", "reasoning", "safety")]
    pairs, _ = tokenize_pairs(_ds(rows), TOK, max_prompt_length=8, max_length=16)
    assert pairs.task_names == TASKS  # the fixed synthetic order, whatever subset is present
    assert pairs.task_id.tolist() == [TASKS.index("safety"), TASKS.index("reasoning"), TASKS.index("safety")]
    rows = [dict(r, task=t) for r, t in zip(rows, ("b", "a", None))]
    pairs, _ = tokenize_pairs(_ds(rows), TOK, max_prompt_length=8, max_length=16)
    assert pairs.task_names == ("a", "b", "default") and pairs.task_id.tolist() == [1, 0, 2]
    pairs, report = tokenize_pairs(_ds(rows), TOK, max_prompt_length=8, max_length=16, task_names=("b", "default"))
    assert pairs.task_id.tolist() == [0, 1] and report.counts == {"unknown_task": 1}
    pairs, _ = tokenize_pairs(_ds([{"prompt": "p", "chosen": " a", "rejected": " b"}]), TOK,
                              max_prompt_length=8, max_length=16)
    assert pairs.task_names == ("default",) and pairs.task_id.tolist() == [0]


def test_embeddings():
    rows = [{"prompt": "p", "chosen": " a", "rejected": r, "embedding_prompt": [1.0, 2.0],
             "embedding_chosen": [3.0, 4.0], "embedding_rejected": [5.0, 6.0]} for r in (" b", " a")]
    rows.append(dict(rows[0], embedding_chosen=None))
    pairs, report = tokenize_pairs(_ds(rows), TOK, max_prompt_length=8, max_length=16)
    assert report.counts == {"identical_responses": 1, "missing_field": 1}
    assert pairs.embeddings["embedding_rejected"].tolist() == [[5.0, 6.0]]
    assert pairs.embeddings["embedding_prompt"].dtype == np.float32
    with pytest.raises(ValueError, match="need all three columns"):
        tokenize_pairs(_ds(rows).remove_columns("embedding_chosen"), TOK, max_prompt_length=8, max_length=16)
    rows[1] = dict(rows[0], embedding_prompt=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="vectors of different sizes"):
        tokenize_pairs(_ds(rows[:2]), TOK, max_prompt_length=8, max_length=16)


def test_invalid_limits_and_missing_columns():
    ds = _ds([{"prompt": "p", "chosen": " a", "rejected": " b"}])
    with pytest.raises(ValueError, match="max_prompt_length < max_length"):
        tokenize_pairs(ds, TOK, max_prompt_length=16, max_length=16)
    with pytest.raises(ValueError, match=r"no column\(s\) \['prompt'\]"):
        tokenize_pairs(ds.remove_columns("prompt"), TOK, max_prompt_length=8, max_length=16)


def test_hf_tokenizer_without_bos_or_pad(tmp_path):
    tok = load_tokenizer(make_hf_tokenizer(tmp_path / "nobos", bos=False, chat_template=False))
    assert tok.bos_token_id is None and tok.pad_token_id == tok.eos_token_id
    ds = _ds([{"prompt": "hello", "chosen": " world", "rejected": " cat"},
              {"prompt": "", "chosen": " world", "rejected": " cat"}])
    pairs, report = tokenize_pairs(ds, tok, max_prompt_length=8, max_length=16)
    assert report.counts == {"empty_prompt": 1}
    assert pairs.prompt_ids[0].tolist() == tok("hello", add_special_tokens=False)["input_ids"]
    assert pairs.pad_token_id == tok.eos_token_id


def test_bos_already_in_rendered_text_is_not_doubled(hf_tokenizer_dir):
    tok = load_tokenizer(hf_tokenizer_dir)
    ds = _ds([{"prompt": "<bos>hello", "chosen": " world", "rejected": " cat"}])
    pairs, _ = tokenize_pairs(ds, tok, max_prompt_length=8, max_length=16)
    assert pairs.prompt_ids[0].tolist().count(tok.bos_token_id) == 1


texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


@settings(max_examples=60, deadline=None)
@given(prompt=texts, chosen=texts, rejected=texts, mpl=st.integers(1, 20), extra=st.integers(1, 30))
def test_kept_pairs_always_respect_the_limits(prompt, chosen, rejected, mpl, extra):
    ml = mpl + extra
    pairs, report = tokenize_pairs(_ds([{"prompt": prompt, "chosen": chosen, "rejected": rejected}]), TOK,
                                   max_prompt_length=mpl, max_length=ml)
    assert len(pairs) + report.total_skipped == 1
    if not len(pairs):
        return
    p, c, r = pairs.prompt_ids[0], pairs.chosen_ids[0], pairs.rejected_ids[0]
    assert p[0] == BOS and len(p) <= mpl and pairs.lengths[0] <= ml
    assert bytes(prompt.encode()).endswith(bytes(p[1:].tolist()))
    for ids, text in ((c, chosen), (r, rejected)):
        full = list(text.encode()) + [EOS]
        assert ids.tolist() == full[:len(ids)] and len(ids) >= 1
        assert (ids[-1] == EOS) == (len(ids) == len(full))
    assert c.tolist() != r.tolist()
