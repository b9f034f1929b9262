"""`load_pairs`: the held-out split of a single file, every held-out pair evaluated, too-small files
refused in one line, bad rows named by file line (issue 9 items 11 and 12)."""

import json
from pathlib import Path

import numpy as np
import pytest

from dpok_jax.config import load_config
from dpok_jax.data import ByteTokenizer, PreferenceBatcher, held_out_count, load_pairs

from .conftest import write_jsonl

TOK = ByteTokenizer()


def _rows(n, bad=()):
    rows = [{"prompt": f"Q{i}:", "chosen": f" good {i}", "rejected": f" bad {i}"} for i in range(n)]
    for i in bad:
        rows[i]["rejected"] = rows[i]["chosen"]  # identical_responses
    return rows


def _data_cfg(source, *overrides):
    cfg = load_config(None, [f"data.source={source}", "data.max_prompt_length=16", "data.max_length=32",
                             "data.buckets=[32]", *overrides])
    return cfg.data


def test_300_rows_batch_16_train_and_evaluate_every_held_out_pair(tmp_path):
    """Item 11: 15 held-out pairs with batch 16 failed ("fewer than one global batch")."""
    path = write_jsonl(tmp_path / "pairs.jsonl", _rows(300))
    train, held = load_pairs(_data_cfg(path), TOK, run_dir=tmp_path / "run", min_train_pairs=16)
    assert (len(train), len(held)) == (285, 15)
    assert set(train.example_index.tolist()) | set(held.example_index.tolist()) == set(range(300))
    assert not set(train.example_index.tolist()) & set(held.example_index.tolist())
    batcher = PreferenceBatcher(train, global_batch_size=16, seed=0, buckets=(32,))
    assert batcher.steps_per_epoch == 17 and next(batcher)["valid"].all()
    for count in (1, 2, 4):  # hosts
        batches = [list(PreferenceBatcher(held, global_batch_size=16, seed=0, buckets=(32,), process_index=i,
                                          process_count=count).iterate_once()) for i in range(count)]
        assert all(len(b) == 1 for b in batches)
        seen = np.concatenate([b[0]["example_index"][b[0]["valid"]] for b in batches])
        assert sorted(seen.tolist()) == sorted(held.example_index.tolist())
    saved = json.loads((tmp_path / "run" / "bad_rows_train.json").read_text())
    assert saved["total_rows"] == 300 and saved["kept"] == 300
    # Deterministic from data.seed, and a new seed holds out other pairs.
    again = load_pairs(_data_cfg(path), TOK, min_train_pairs=16)[1]
    other = load_pairs(_data_cfg(path, "data.seed=1"), TOK, min_train_pairs=16)[1]
    assert again.example_index.tolist() == held.example_index.tolist() != other.example_index.tolist()


@pytest.mark.parametrize("fraction, rows, expected", [("0.2", 300, 60), ("0.5", 11, 6), ("0.001", 300, 1)])
def test_eval_fraction_sets_the_held_out_share(tmp_path, fraction, rows, expected):
    path = write_jsonl(tmp_path / "pairs.jsonl", _rows(rows))
    train, held = load_pairs(_data_cfg(path, f"data.eval_fraction={fraction}"), TOK)
    assert (len(train), len(held)) == (rows - expected, expected)
    assert held_out_count(rows, float(fraction)) == expected


def test_max_eval_examples_caps_the_held_out_slice(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", _rows(300))
    train, held = load_pairs(_data_cfg(path, "data.eval_fraction=0.5", "data.max_eval_examples=7"), TOK)
    assert (len(train), len(held)) == (293, 7)


def test_a_file_too_small_for_one_batch_says_how_many_rows_it_needs(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", _rows(16, bad=[3]))
    with pytest.raises(ValueError) as err:
        load_pairs(_data_cfg(path), TOK, min_train_pairs=16)
    message = str(err.value)
    assert "\n" not in message
    assert message == (
        f"data.source '{path}' is too small: 15 usable pairs (1 row skipped, see bad_rows_train.json), "
        "1 held out for evaluation (data.eval_fraction=0.05) leave 14 for training, fewer than one global batch "
        "of 16; it needs at least 17 usable rows (or a smaller batch size, or a separate data.eval_source)")
    train, held = load_pairs(_data_cfg(path), TOK, min_train_pairs=14)
    assert (len(train), len(held)) == (14, 1)


def test_separate_eval_source_smaller_than_a_batch_is_evaluated_whole(tmp_path):
    train_path = write_jsonl(tmp_path / "train.jsonl", _rows(20))
    eval_path = write_jsonl(tmp_path / "eval.jsonl", _rows(3))
    train, held = load_pairs(_data_cfg(train_path, f"data.eval_source={eval_path}"), TOK, min_train_pairs=16)
    assert (len(train), len(held)) == (20, 3)
    with pytest.raises(ValueError, match=r"20 usable train pairs are fewer than one global batch of 32; "
                                         r"training needs at least 32"):
        load_pairs(_data_cfg(train_path, f"data.eval_source={eval_path}"), TOK, min_train_pairs=32)


def test_a_folder_without_an_eval_split_holds_out_like_a_file(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", _rows(100))
    train, held = load_pairs(_data_cfg(folder), TOK)
    assert (len(train), len(held)) == (95, 5)
    write_jsonl(folder / "test.jsonl", _rows(4))
    train, held = load_pairs(_data_cfg(folder), TOK)
    assert (len(train), len(held)) == (100, 4)


def test_bad_rows_of_a_held_out_file_name_the_file_line(tmp_path):
    """Item 12: bad-row numbers were positions in the shuffled split, also in strict mode."""
    path = write_jsonl(tmp_path / "pairs.jsonl", _rows(40, bad=[6, 29]))
    load_pairs(_data_cfg(path), TOK, run_dir=tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "bad_rows_train.json").read_text())
    assert saved["example_rows"] == {"identical_responses": [f"{path}:7", f"{path}:30"]}
    assert saved["details"]["identical_responses"].startswith(f"{path}:7: both are")
    with pytest.raises(ValueError, match=rf"^{path}:7: bad row \(identical_responses\)"):
        load_pairs(_data_cfg(path, "data.strict=true"), TOK)


def test_synthetic_source_unchanged(tmp_path):
    d = _data_cfg("synthetic", "data.synthetic_train_per_task=4", "data.synthetic_eval_per_task=2",
                  "data.max_prompt_length=56", "data.max_length=64", "data.buckets=[64]")
    train, held = load_pairs(d, TOK, run_dir=tmp_path)
    assert (len(train), len(held)) == (20, 10) and train.task_names == held.task_names
    assert (tmp_path / "bad_rows_eval.json").is_file()


def test_config_rejects_empty_buckets_and_bad_fractions():
    with pytest.raises(ValueError, match=r"config data\.buckets=\[\]: needs at least one positive length"):
        load_config(None, ["data.buckets=[]"])
    for value in ("0", "1", "-0.1"):
        with pytest.raises(ValueError, match=rf"config data\.eval_fraction={float(value)}: must be in \(0, 1\)"):
            load_config(None, [f"data.eval_fraction={value}"])
    with pytest.raises(ValueError, match=r"config data\.max_eval_examples=0"):
        load_config(None, ["data.max_eval_examples=0"])


def test_hh_rlhf_held_out_split(hh_path):
    d = _data_cfg(hh_path, "data.max_prompt_length=256", "data.max_length=512", "data.buckets=[512]")
    train, held = load_pairs(d, TOK, min_train_pairs=64)
    n = len(train) + len(held)
    assert len(held) == held_out_count(n, 0.05) and n > 2250


@pytest.mark.slow
def test_trainer_runs_and_evaluates_every_held_out_pair_of_a_300_row_file(tmp_path):
    """Item 11 end to end: `dpok train` on a 300-row file with batch 16 (failed before)."""
    import jax

    from dpok_jax.train import run as run_lib

    path = write_jsonl(tmp_path / "pairs.jsonl", _rows(300))
    cfg = load_config(None, [
        f"run_dir={tmp_path / 'run'}", f"data.source={path}", "train.batch_size=16", "train.steps=2",
        "train.eval_every=0", "train.progress=false", "sft.steps=0", "model.num_layers=1",
        "model.hidden_size=32", "model.intermediate_size=64", "model.num_heads=2", "model.num_kv_heads=1",
        "model.head_dim=16", "loss.chunk_size=32", "data.max_length=32", "data.max_prompt_length=16",
        "data.buckets=[32]"])
    prepared = run_lib.prepare(cfg, devices=jax.devices()[:1])
    assert (len(prepared.train_pairs), len(prepared.eval_pairs)) == (285, 15)
    summary = run_lib.run(cfg, devices=jax.devices()[:1])
    assert summary["eval/count"] == 15 and 0.0 <= summary["eval/accuracy"] <= 1.0
    assert json.loads(Path(cfg.run_dir, "summary.json").read_text())["eval/count"] == 15
