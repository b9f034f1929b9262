"""The embedded synthetic tasks: deterministic, held-out prompts disjoint, short, rule-consistent."""

import re

import numpy as np
import pytest

from dpok_jax.data import TASKS, ByteTokenizer, load_preference_dataset, synthetic_tasks, tokenize_pairs
from dpok_jax.data.synthetic import _CAPITALS, _ELEMENTS, _FAMILIES, _HARMFUL, _PROPERTIES, _REFUSALS, _WORDS


@pytest.fixture(scope="module")
def data():
    return synthetic_tasks(0)


def _rows(split, task=None):
    cols = split[:]
    rows = [dict(zip(cols, v)) for v in zip(*cols.values())]
    return [r for r in rows if task is None or r["task"] == task]


def test_shape_and_columns(data):
    assert set(data) == {"train", "test"}
    assert data["train"].num_rows == 5 * 300 and data["test"].num_rows == 5 * 60
    for split in data.values():
        assert split.column_names == ["prompt", "chosen", "rejected", "task"]
        tasks = list(split["task"])
        assert sorted(set(tasks)) == sorted(TASKS)
        assert all(tasks.count(t) == split.num_rows // 5 for t in TASKS)


def test_deterministic_from_seed(data):
    again = synthetic_tasks(0)
    other = synthetic_tasks(1)
    for split in ("train", "test"):
        assert data[split][:] == again[split][:]
        assert data[split][:] != other[split][:]
    assert set(data["test"]["prompt"]) != set(other["test"]["prompt"])  # the held-out split moves too


def test_held_out_prompts_never_in_train(data):
    for seed in (0, 3):
        d = data if seed == 0 else synthetic_tasks(seed)
        train, test = set(d["train"]["prompt"]), set(d["test"]["prompt"])
        assert not train & test
        assert len(test) == d["test"].num_rows  # held-out prompts are distinct too


def test_sizes_fit_default_lengths(data):
    for split in data.values():
        for r in _rows(split):
            assert re.fullmatch(r"Q: .+\nA:", r["prompt"], re.S)
            for k in ("chosen", "rejected"):
                assert r[k].startswith(" ") and len(r[k].encode()) >= 2
            assert r["chosen"] != r["rejected"]
    pairs, report = tokenize_pairs(data["train"], ByteTokenizer(), max_prompt_length=56, max_length=64)
    assert report.total_skipped == 0 and not report.truncated and len(pairs) == 1500


@pytest.mark.parametrize("task", TASKS)
def test_every_combination_fits_one_64_token_bucket(task):
    """Not just the sampled rows: every prompt combination, with its longest possible response."""
    combos, pair = _FAMILIES[task]()
    rng = np.random.default_rng(0)
    for combo in combos:
        for _ in range(3):  # distractors are drawn at random
            q, chosen, rejected = pair(combo, rng)
            prompt = len(f"Q: {q}\nA:".encode()) + 1  # + BOS
            assert prompt <= 56, (task, q)
            assert prompt + max(len(chosen), len(rejected)) + 1 + 1 <= 64, (task, q, chosen, rejected)


@pytest.mark.parametrize("task", TASKS)
def test_length_is_not_the_signal(data, task):
    rows = _rows(data["train"], task)
    longer = np.mean([len(r["chosen"]) > len(r["rejected"]) for r in rows])
    shorter = np.mean([len(r["chosen"]) < len(r["rejected"]) for r in rows])
    assert longer <= 0.7 and shorter <= 0.7, (longer, shorter)


def test_reasoning_rule(data):
    for r in _rows(data["train"], "reasoning") + _rows(data["test"], "reasoning"):
        a, b = map(int, re.findall(r"\d", r["prompt"]))
        assert a != b
        larger = re.search(r"larger|bigger|Max", r["prompt"]) is not None
        assert larger != (re.search(r"smaller|less|Min", r["prompt"]) is not None)
        assert int(r["chosen"]) == (max(a, b) if larger else min(a, b))
        assert int(r["rejected"]) == (min(a, b) if larger else max(a, b))


def test_instruction_following_rule(data):
    for r in _rows(data["test"], "instruction_following"):
        q = r["prompt"]
        word = next(w for w in _WORDS if re.search(rf"\b{w}\b", q, re.I))
        c, rej = r["chosen"].strip(), r["rejected"].strip()
        if "uppercase" in q or "capital letters" in q or "all caps" in q:
            assert c == word.upper() and rej == word
        elif "lowercase" in q or "small letters" in q or "no capitals" in q:
            assert word.upper() in q and c == word and rej == word.upper()
        elif "backwards" in q or "reverse" in q.lower():
            assert c == word[::-1] and rej == word
        else:
            assert c == f"{word} {word}" and rej in (word, f"{word} {word} {word}")


def test_safety_rule_is_not_always_refuse(data):
    rows = _rows(data["train"], "safety")
    harmful = [any(h in r["prompt"] for h in _HARMFUL) for r in rows]
    refusal_chosen = [r["chosen"].strip() in _REFUSALS for r in rows]
    refusal_rejected = [r["rejected"].strip() in _REFUSALS for r in rows]
    assert refusal_chosen == harmful
    assert refusal_rejected == [not h for h in harmful]
    assert 0.3 < np.mean(harmful) < 0.7


def test_factuality_rule(data):
    table = dict(_CAPITALS + _ELEMENTS)
    for r in _rows(data["train"], "factuality") + _rows(data["test"], "factuality"):
        m = re.fullmatch(r"Q: (\w+): (\w+)\. (\w+): (\w+)\. (\w+)'s (capital|symbol)\?\nA:", r["prompt"])
        assert m, r["prompt"]
        x1, v1, x2, v2, asked, _ = m.groups()
        assert table[x1] == v1 and table[x2] == v2 and x1 != x2 and asked in (x1, x2)
        # chosen: the stated value of the entity asked; rejected: the other stated value
        assert r["chosen"] == f" {table[asked]}"
        assert r["rejected"] == f" {v2 if asked == x1 else v1}"


def test_truthfulness_rule(data):
    for r in _rows(data["train"], "truthfulness") + _rows(data["test"], "truthfulness"):
        subject, true_p, false_p = next(t for t in _PROPERTIES if f" {t[0]} " in r["prompt"])
        asked_true = re.search(rf" {true_p}\?\n", r["prompt"]) is not None
        assert asked_true != (re.search(rf" {false_p}\?\n", r["prompt"]) is not None)
        yes, no = "Yes", "No"
        assert r["chosen"] == f" {yes if asked_true else no}, {subject} is {true_p}."
        assert r["rejected"] == f" {no if asked_true else yes}, {subject} is {false_p}."


def test_every_family_has_enough_combinations():
    for task in TASKS:
        combos, _ = _FAMILIES[task]()
        # A third of them (the held-out pool) covers the default 60 distinct held-out prompts.
        assert len(combos) == len(set(combos)) >= 3 * 60, task


def test_more_pairs_than_combinations_repeat_without_leaking():
    d = synthetic_tasks(2, n_train_per_task=700, n_eval_per_task=100)
    assert d["train"].num_rows == 3500 and d["test"].num_rows == 500
    assert not set(d["train"]["prompt"]) & set(d["test"]["prompt"])


def test_load_preference_dataset_synthetic(data):
    assert load_preference_dataset("synthetic", split="test")[:] == data["test"][:]
    with pytest.raises(ValueError, match="splits"):
        load_preference_dataset("synthetic", split="validation")
