"""`PreferenceBatcher`: layout and masks, buckets, determinism, resume, per-host slices, eval pass."""

import datasets
import numpy as np
import pytest

from dpok_jax.data import ByteTokenizer, PreferenceBatcher, synthetic_tasks, tokenize_pairs

TOK = ByteTokenizer()
KEYS = {"chosen_input_ids", "chosen_attention_mask", "chosen_response_mask", "rejected_input_ids",
        "rejected_attention_mask", "rejected_response_mask", "task_id", "example_index", "valid"}


@pytest.fixture(scope="module")
def pairs():
    ds = synthetic_tasks(0, n_train_per_task=20, n_eval_per_task=5)["train"]
    return tokenize_pairs(ds, TOK, max_prompt_length=64, max_length=128)[0]


def _varied_pairs(n=37):
    rng = np.random.default_rng(0)
    rows = [{"prompt": "p" * int(rng.integers(1, 60)), "chosen": " " + "c" * int(rng.integers(1, 60)),
             "rejected": " " + "r" * int(rng.integers(1, 60)), "embedding_prompt": [float(i), 0.0],
             "embedding_chosen": [0.0, 1.0], "embedding_rejected": [1.0, float(i)]} for i in range(n)]
    return tokenize_pairs(datasets.Dataset.from_list(rows), TOK, max_prompt_length=64, max_length=128)[0]


def _take(batcher, n):
    return [next(batcher) for _ in range(n)]


def _same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_layout_masks_and_contents(pairs):
    batcher = PreferenceBatcher(pairs, global_batch_size=8, seed=0, buckets=(32, 64, 128))
    batch = next(batcher)
    assert set(batch) == KEYS
    for k in KEYS - {"valid"}:
        assert batch[k].dtype == np.int32
    assert batch["valid"].dtype == bool and batch["valid"].all()
    length = batch["chosen_input_ids"].shape[1]
    assert batch["rejected_input_ids"].shape == (8, length)
    for i, row in enumerate(batch["example_index"]):
        j = int(np.flatnonzero(pairs.example_index == row)[0])
        for side, resp in (("chosen", pairs.chosen_ids[j]), ("rejected", pairs.rejected_ids[j])):
            ids, attn, mask = (batch[f"{side}_{k}"][i] for k in ("input_ids", "attention_mask", "response_mask"))
            seq = np.concatenate([pairs.prompt_ids[j], resp])
            assert ids[:len(seq)].tolist() == seq.tolist() and (ids[len(seq):] == TOK.pad_token_id).all()
            assert attn.tolist() == [1] * len(seq) + [0] * (length - len(seq))
            assert mask.tolist() == [0] * len(pairs.prompt_ids[j]) + [1] * len(resp) + [0] * (length - len(seq))
            assert ids[mask == 1][-1] == TOK.eos_token_id
        assert batch["task_id"][i] == pairs.task_id[j]


def test_bucket_is_smallest_holding_the_longest_of_both_sides():
    pairs = _varied_pairs()
    batcher = PreferenceBatcher(pairs, global_batch_size=4, seed=1, buckets=(128, 40, 80))
    seen = set()
    for batch in _take(batcher, 30):
        longest = max(batch[f"{s}_attention_mask"].sum(1).max() for s in ("chosen", "rejected"))
        length = batch["chosen_input_ids"].shape[1]
        assert length == min(b for b in (40, 80, 128) if b >= longest)
        seen.add(length)
        assert batch["embedding_prompt"].shape == (4, 2) and batch["embedding_prompt"].dtype == np.float32
        assert batch["embedding_prompt"][:, 0].tolist() == batch["example_index"].tolist()
    assert len(seen) >= 2  # buckets actually vary, so the test above means something


def test_deterministic_and_reshuffled_per_epoch(pairs):
    a = PreferenceBatcher(pairs, global_batch_size=10, seed=3)
    b = PreferenceBatcher(pairs, global_batch_size=10, seed=3)
    c = PreferenceBatcher(pairs, global_batch_size=10, seed=4)
    assert a.steps_per_epoch == 10
    batches = _take(a, 20)
    assert all(_same(x, y) for x, y in zip(batches, _take(b, 20)))
    assert not _same(batches[0], next(c))
    epoch0 = np.concatenate([x["example_index"] for x in batches[:10]])
    epoch1 = np.concatenate([x["example_index"] for x in batches[10:]])
    assert sorted(epoch0) == sorted(epoch1) == sorted(pairs.example_index)  # each pair once per epoch
    assert epoch0.tolist() != epoch1.tolist()
    assert a.state()["epoch"] == 1 and a.epoch == 2


def test_drop_last_and_no_shuffle():
    pairs = _varied_pairs(10)
    batcher = PreferenceBatcher(pairs, global_batch_size=4, seed=0, shuffle=False, drop_last=True)
    assert batcher.steps_per_epoch == 2
    assert [b["example_index"].tolist() for b in _take(batcher, 3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 2, 3]]
    batcher = PreferenceBatcher(pairs, global_batch_size=4, seed=0, shuffle=False, drop_last=False)
    last = _take(batcher, 3)[-1]
    assert last["valid"].tolist() == [True, True, False, False] and last["example_index"][:2].tolist() == [8, 9]


def test_resume_continues_with_the_same_batches(pairs):
    ref = PreferenceBatcher(pairs, global_batch_size=8, seed=5)
    expected = _take(ref, 40)
    first = PreferenceBatcher(pairs, global_batch_size=8, seed=5)
    _take(first, 17)  # past an epoch boundary (12 steps per epoch)
    state = dict(first.state())
    resumed = PreferenceBatcher(pairs, global_batch_size=8, seed=5)
    resumed.restore(state)
    assert all(_same(x, y) for x, y in zip(expected[17:], _take(resumed, 23)))
    end = PreferenceBatcher(pairs, global_batch_size=8, seed=5)
    end.restore({"epoch": 0, "position": 12})  # saved right at the end of an epoch
    assert _same(next(end), expected[12])


def test_restore_rejects_a_changed_setup(pairs):
    state = PreferenceBatcher(pairs, global_batch_size=8, seed=5).state()
    with pytest.raises(ValueError, match="saved global_batch_size=8, this run has 4"):
        PreferenceBatcher(pairs, global_batch_size=4, seed=5).restore(state)
    with pytest.raises(ValueError, match="invalid data state"):
        PreferenceBatcher(pairs, global_batch_size=8, seed=5).restore({"epoch": 0, "position": 99})


@pytest.mark.parametrize("count", [2, 4])
def test_hosts_get_contiguous_slices_of_one_global_batch(count):
    pairs = _varied_pairs()
    single = PreferenceBatcher(pairs, global_batch_size=8, seed=2, buckets=(40, 80, 128))
    hosts = [PreferenceBatcher(pairs, global_batch_size=8, seed=2, buckets=(40, 80, 128),
                               process_index=i, process_count=count) for i in range(count)]
    for _ in range(6):
        whole = next(single)
        parts = [next(h) for h in hosts]
        assert all(p["chosen_input_ids"].shape == (8 // count, whole["chosen_input_ids"].shape[1]) for p in parts)
        for k in whole:
            assert np.array_equal(np.concatenate([p[k] for p in parts]), whole[k])


def test_iterate_once_covers_everything_in_order_and_keeps_position():
    pairs = _varied_pairs(10)
    batcher = PreferenceBatcher(pairs, global_batch_size=4, seed=0)
    next(batcher)
    before = batcher.state()
    batches = list(batcher.iterate_once())
    assert batcher.state() == before
    assert [b["valid"].tolist() for b in batches] == [[True] * 4, [True] * 4, [True, True, False, False]]
    valid = np.concatenate([b["example_index"][b["valid"]] for b in batches])
    assert valid.tolist() == list(range(10))
    hosts = [list(PreferenceBatcher(pairs, global_batch_size=4, seed=0, process_index=i, process_count=2)
                  .iterate_once()) for i in range(2)]
    assert [len(h) for h in hosts] == [3, 3]  # same number of eval batches on every host
    assert hosts[1][2]["valid"].tolist() == [False, False]


def test_construction_errors(pairs):
    with pytest.raises(ValueError, match="largest bucket 64 is shorter than max_length 128"):
        PreferenceBatcher(pairs, global_batch_size=8, seed=0, buckets=(32, 64))
    with pytest.raises(ValueError, match="multiple of process_count=3"):
        PreferenceBatcher(pairs, global_batch_size=8, seed=0, process_count=3)
    with pytest.raises(ValueError, match=f"{len(pairs)} pairs are fewer than one global batch of 1000: "
                                         "training needs at least 1000 usable pairs"):
        next(PreferenceBatcher(pairs, global_batch_size=1000, seed=0))
    with pytest.raises(ValueError, match="no pairs"):
        PreferenceBatcher(pairs.select([]), global_batch_size=8, seed=0)


@pytest.mark.parametrize("n,batch,count", [(15, 16, 1), (5, 16, 2), (17, 16, 2), (3, 8, 4)])
def test_evaluation_pass_covers_fewer_pairs_than_a_batch(n, batch, count):
    """Issue 9 item 11: fewer held-out pairs than one global batch used to fail at construction."""
    pairs = _varied_pairs(n)
    hosts = [list(PreferenceBatcher(pairs, global_batch_size=batch, seed=0, process_index=i,
                                    process_count=count).iterate_once()) for i in range(count)]
    assert len({len(h) for h in hosts}) == 1 and len(hosts[0]) == -(-n // batch)  # same count on every host
    seen = np.concatenate([b["example_index"][b["valid"]] for i in range(len(hosts[0])) for h in hosts
                           for b in [h[i]]])
    assert sorted(seen.tolist()) == list(range(n))  # every pair exactly once
    for h in hosts:
        for b in h:
            assert b["chosen_input_ids"].shape[0] == batch // count


def test_pack_rows_auto_is_tight_on_cpu_and_bucket_on_accelerators(pairs):
    """``data.pack_rows: auto`` (the default): tight rows where the tiled attention skips other
    segments' keys (CPU), bucket rows where attention kernels cover the whole row (GPU, TPU)."""
    import jax

    from dpok_jax.config import DataSection
    from dpok_jax.data.batching import resolve_pack_rows

    assert DataSection().pack_rows == "auto"
    assert resolve_pack_rows("auto", "cpu") == "tight"
    assert resolve_pack_rows("auto", "gpu") == resolve_pack_rows("auto", "tpu") == "bucket"
    assert resolve_pack_rows("bucket", "cpu") == "bucket"
    with pytest.raises(ValueError, match="pack_rows"):
        resolve_pack_rows("tigth")
    batcher = PreferenceBatcher(pairs, global_batch_size=8, seed=0, packing=True)
    assert batcher.pack_rows == ("tight" if jax.default_backend() == "cpu" else "bucket")
    with pytest.raises(ValueError, match="pack_rows"):
        PreferenceBatcher(pairs, global_batch_size=8, seed=0, pack_rows="rows")
