"""Padding-free packed pairs: the layout, and the packed step equal to the padded one (loss,
gradients, metrics, the reference cache, a whole sharded run)."""

from pathlib import Path

import jax
import numpy as np
import pytest

from dpok_jax import losses
from dpok_jax.config import load_config
from dpok_jax.data import packing
from dpok_jax.data.batching import resolve_pack_rows
from dpok_jax.train import run as run_lib
from dpok_jax.train.loop import to_global
from dpok_jax.train.metrics_log import read_metrics
from dpok_jax.train.step import make_loss_fn

SMALL = [
    "data.synthetic_train_per_task=16", "data.synthetic_eval_per_task=4",
    "train.batch_size=8", "train.progress=false", "train.log_every=1",
    "model.num_layers=2", "model.hidden_size=32", "model.intermediate_size=64",
    "model.num_heads=2", "model.num_kv_heads=2", "model.head_dim=16",
    "loss.chunk_size=32", "data.max_length=96", "data.max_prompt_length=48",
    "data.buckets=[96]", "sft.steps=0",
]


def _cfg(path, *extra):
    return load_config(None, [f"run_dir={path}", *SMALL, *extra])


def _sequences(batch, side, i):
    n = int(batch[f"{side}_attention_mask"][i].sum())
    return (batch[f"{side}_input_ids"][i, :n].tolist(), batch[f"{side}_response_mask"][i, :n].tolist())


@pytest.mark.parametrize("accum,offset,total", [(1, 0, 8), (2, 0, 8), (2, 8, 16)])
def test_packed_rows_hold_every_sequence_once_and_unpack_back(tmp_path, accum, offset, total):
    cfg = _cfg(tmp_path)
    p = run_lib.prepare(cfg, devices=jax.devices()[:1])
    batch = next(run_lib._batcher(p.train_pairs, cfg, 8, 0))
    b = 8
    lengths = np.stack([batch["chosen_attention_mask"].sum(1), batch["rejected_attention_mask"].sum(1)], 1)
    rows = packing.rows_needed([lengths], 96, accum=accum, row_multiple=accum)
    assert rows % accum == 0 and rows < 2 * b  # fewer rows than the padded batch's 2b
    rng = np.random.default_rng(0)
    k = 3
    batch["ref_topk_indices"] = rng.integers(0, 50, (b, 2, 95, k)).astype(np.int32)
    batch["ref_topk_logps"] = rng.normal(size=(b, 2, 95, k)).astype(np.float32)
    pk = packing.pack_batch(batch, rows=rows, capacity=96, pad_token_id=p.train_pairs.pad_token_id,
                            accum=accum, pair_offset=offset, global_pairs=total)
    assert pk["packed_input_ids"].shape == (rows, 96)
    assert int((pk["packed_segment_ids"] > 0).sum()) == int(lengths.sum())  # no token lost or added
    gm = total // accum
    for r in range(rows):
        seg, seq = pk["packed_segment_ids"][r], pk["packed_sequence"][r]
        for s in range(1, seg.max() + 1):
            at = np.nonzero(seg == s)[0]
            assert np.all(np.diff(at) == 1) and np.all(seq[at] == seq[at[0]])
            assert pk["packed_positions"][r, at].tolist() == list(range(len(at)))
            # Which pair: micro-batch m = r % accum, global micro index -> host-local pair.
            g = int(seq[at[0]])
            side = "rejected" if g >= gm else "chosen"
            pair = r % accum + (g - (gm if side == "rejected" else 0) - offset // accum) * accum
            ids, resp = _sequences(batch, side, pair)
            assert pk["packed_input_ids"][r, at].tolist() == ids
            assert pk["packed_response_mask"][r, at].tolist() == resp
    assert set(pk) >= {"task_id", "valid", "example_index"} and "chosen_input_ids" not in pk
    if offset == 0 and total == b:
        back = packing.unpack_topk(pk, pk["packed_ref_topk_logps"], pairs=b, width=95, accum=accum)
        for side in range(2):
            for i in range(b):
                n = int(lengths[i, side]) - 1
                np.testing.assert_array_equal(back[i, side, :n], batch["ref_topk_logps"][i, side, :n])
                assert not back[i, side, n:].any()


@pytest.mark.parametrize("accum,offset,total", [(1, 0, 8), (2, 0, 8), (2, 8, 16)])
def test_shared_prompt_rows_hold_each_pair_once_and_unpack_back(tmp_path, accum, offset, total):
    """Prefix sharing: one segment per pair, the prompt (but its last token) once in branch 0, then
    each sequence's rest in branches 1 and 2, at the positions the unpacked rows give them."""
    cfg = _cfg(tmp_path)
    p = run_lib.prepare(cfg, devices=jax.devices()[:1])
    batch = next(run_lib._batcher(p.train_pairs, cfg, 8, 0))
    b = 8
    attn = {s: batch[f"{s}_attention_mask"].sum(1) for s in ("chosen", "rejected")}
    prompt = attn["chosen"] - batch["chosen_response_mask"].sum(1)
    shared = packing.shared_prefix(prompt)
    assert (shared > 0).all()
    units = packing.shared_pair_lengths(prompt, attn["chosen"] - prompt, attn["rejected"] - prompt)
    np.testing.assert_array_equal(units, attn["chosen"] + attn["rejected"] - shared)
    rows = packing.rows_needed([units], 192, accum=accum, row_multiple=accum)
    rng = np.random.default_rng(0)
    k = 3
    batch["ref_topk_indices"] = rng.integers(0, 50, (b, 2, 95, k)).astype(np.int32)
    batch["ref_topk_logps"] = rng.normal(size=(b, 2, 95, k)).astype(np.float32)
    for key in ("ref_topk_indices", "ref_topk_logps"):  # the same context gives the same values
        for i in range(b):
            batch[key][i, 1, :shared[i]] = batch[key][i, 0, :shared[i]]
    pk = packing.pack_batch(batch, rows=rows, capacity=192, pad_token_id=p.train_pairs.pad_token_id,
                            accum=accum, pair_offset=offset, global_pairs=total, share_prompt=True)
    assert int((pk["packed_segment_ids"] > 0).sum()) == int(units.sum())
    gm = total // accum
    seen = set()
    for r in range(rows):
        seg, seq, br = pk["packed_segment_ids"][r], pk["packed_sequence"][r], pk["packed_branch"][r]
        for s in range(1, seg.max() + 1):
            at = np.nonzero(seg == s)[0]
            assert np.all(np.diff(at) == 1)
            g = int(seq[at[0]])  # a pair's segment starts with its chosen sequence's number
            pair = r % accum + (g - offset // accum) * accum
            seen.add(pair)
            for branch, side, number in ((1, "chosen", g), (2, "rejected", g + gm)):
                mine = at[(br[at] == 0) | (br[at] == branch)]
                ids, resp = _sequences(batch, side, pair)
                assert pk["packed_input_ids"][r, mine].tolist() == ids
                assert pk["packed_response_mask"][r, mine].tolist() == resp
                assert pk["packed_positions"][r, mine].tolist() == list(range(len(ids)))
                assert np.all(seq[at[br[at] == branch]] == number)
            assert int((br[at] == 0).sum()) == shared[pair] and np.all(seq[at[br[at] == 0]] == g)
    assert seen == set(range(b))
    if offset == 0 and total == b:
        back = packing.unpack_topk(pk, pk["packed_ref_topk_logps"], pairs=b, width=95, accum=accum)
        for side in range(2):
            for i in range(b):
                n = int(attn[("chosen", "rejected")[side]][i]) - 1
                np.testing.assert_array_equal(back[i, side, :n], batch["ref_topk_logps"][i, side, :n])
                assert not back[i, side, n:].any()


def test_shared_prompt_attention_sees_what_the_unpacked_sequence_sees(tmp_path):
    """The model on prefix-shared rows gives every token the hidden state it has in its own padded
    row (the mask and positions together), with several pairs to a row."""
    cfg = _cfg(tmp_path)
    p = run_lib.prepare(cfg, devices=jax.devices()[:1])
    batch = next(run_lib._batcher(p.train_pairs, cfg, 8, 0))
    attn = {s: batch[f"{s}_attention_mask"].sum(1) for s in ("chosen", "rejected")}
    prompt = attn["chosen"] - batch["chosen_response_mask"].sum(1)
    units = packing.shared_pair_lengths(prompt, attn["chosen"] - prompt, attn["rejected"] - prompt)
    pk = packing.pack_batch(batch, rows=packing.rows_needed([units], 384), capacity=384,
                            pad_token_id=p.train_pairs.pad_token_id, share_prompt=True)
    assert (pk["packed_segment_ids"].max(1) > 1).any()  # some row holds several pairs
    packed, _ = p.fns.hidden(p.init_params, pk["packed_input_ids"], pk["packed_segment_ids"] > 0,
                             positions=pk["packed_positions"], segment_ids=pk["packed_segment_ids"],
                             branch_ids=pk["packed_branch"])
    packed = np.asarray(packed)
    seg, seq, br = pk["packed_segment_ids"], pk["packed_sequence"], pk["packed_branch"]
    for side, branch in (("chosen", 1), ("rejected", 2)):
        ref, _ = p.fns.hidden(p.init_params, batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"])
        ref = np.asarray(ref)
        for i in range(8):
            r = int(np.nonzero((seq == i).any(1))[0][0])
            at = np.nonzero((seg[r] == seg[r][seq[r] == i][0]) & ((br[r] == 0) | (br[r] == branch)))[0]
            np.testing.assert_allclose(packed[r, at], ref[i, :len(at)], rtol=2e-4, atol=2e-5)


def test_rows_needed_agree_across_hosts_and_round_to_few_sizes():
    lengths = [np.array([[90, 10]] * 4), np.array([[10, 10]] * 4)]
    # Host 0 needs 5 rows of 96 (one per 90, the four 10s in a fifth), host 1 one: both get 5.
    assert packing.rows_needed(lengths, 96) == 5
    assert packing.rows_needed(lengths, 96, row_multiple=3) == 6
    # Batches of random lengths: every row count covers the need, wastes at most ~1/8 past 8 rows,
    # and the counts fall on few sizes (fewer compiled shapes than distinct needs).
    rng = np.random.default_rng(0)
    needs, sizes = set(), set()
    for _ in range(200):
        lengths = rng.integers(5, 90, (40, 2))
        need = len(packing.first_fit_decreasing(lengths.T.reshape(-1), 96))
        size = packing.rows_needed([lengths], 96)
        assert need <= size <= max(8, int(np.ceil(need * 1.125)))
        needs.add(need), sizes.add(size)
    assert len(sizes) < len(needs)
    with pytest.raises(ValueError, match="does not fit"):
        packing.first_fit_decreasing(np.array([97]), 96)


def test_tight_rows_are_one_per_device_and_micro_batch_and_as_short_as_first_fit_allows():
    """``data.pack_rows: tight``: every process's micro-batches fit first-fit decreasing into
    ``row_multiple`` rows of the planned length, a multiple of 128 on the `size_class` ladder, and
    the next shorter size on the ladder would not hold them; hosts agree (global lengths)."""
    rng = np.random.default_rng(1)
    ladder = [packing.size_class(n) for n in range(1, 80)]
    for trial in range(200):
        hosts, accum, multiple = int(rng.integers(1, 3)), int(rng.choice([1, 2])), int(rng.choice([1, 2, 4]))
        lengths = [rng.integers(5, 700, 4 * accum) for _ in range(hosts)]
        minimum = int(rng.choice([0, 1024]))
        cap = packing.tight_capacity(lengths, accum=accum, row_multiple=multiple, minimum=minimum)
        assert cap % 128 == 0 and cap // 128 in ladder and cap >= minimum
        micro = [m for h in lengths for m in packing._micro_lengths(h, accum)]
        assert all(len(packing.first_fit_decreasing(m, cap)) <= multiple for m in micro)
        shorter = max([n for n in ladder if n < cap // 128], default=0) * 128
        if shorter >= max(minimum, max(int(m.max()) for m in micro)):
            assert any(len(packing.first_fit_decreasing(m, shorter)) > multiple for m in micro)
        # One device: no more positions than bucket rows (the smallest power of two holding the
        # longest pair), but for the rounding. (With more devices than a micro-batch's rows need,
        # tight rows are one per device by design.)
        bucket = 1 << int(np.ceil(np.log2(max(int(m.max()) for m in micro))))
        bucket_positions = packing.rows_needed(lengths, bucket, accum=accum, row_multiple=multiple) * bucket
        if minimum == 0 and multiple == 1:
            assert cap * multiple * accum <= 1.13 * bucket_positions + 128 * multiple * accum


def _loss_and_grads(p, cfg, batch_np, perturb=0.02):
    spec = run_lib.step_spec(cfg)
    kernel_params = run_lib.fit_kernel(p, spec)
    # A policy away from the reference, so log-ratios, divergences and gradients are not trivial.
    leaves, tree = jax.tree.flatten(p.init_params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    policy = jax.tree.unflatten(tree, [x + perturb * jax.random.normal(k, x.shape, x.dtype)
                                       for x, k in zip(leaves, keys)])
    trainable = {"policy": policy, "kernel": losses.init_hmk_params() if spec.kernel == "hmk" else {}}
    loss_fn = jax.jit(jax.value_and_grad(make_loss_fn(p.fns, spec, kernel_params), has_aux=True))
    (loss, metrics), grads = loss_fn(trainable, p.init_params, to_global(batch_np, p.batch_sharding))
    return float(loss), jax.tree.map(np.asarray, metrics), jax.tree.map(np.asarray, grads)


@pytest.mark.parametrize("extra", [
    ("loss.gamma=0.1", "loss.kernel=hmk", "loss.eta=0.01", "loss.alpha=0.1", "loss.divergence=kl",
     "loss.sft_weight=0.5"),
    ("loss.gamma=0.1", "loss.kernel=rbf", "loss.embeddings=reference", "loss.logp_reduction=mean",
     "loss.alpha=0.1", "loss.divergence=wasserstein", "loss.wasserstein.top_k=4"),
], ids=["hmk-kl-sft", "rbf-wasserstein-mean"])
@pytest.mark.parametrize("share", [True, pytest.param(False, marks=pytest.mark.slow)],
                         ids=["shared", "unshared"])  # unshared: slow (CI time); the layout test covers it
@pytest.mark.parametrize("rows", ["auto", pytest.param("bucket", marks=pytest.mark.slow)])  # auto: tight on CPU;
# bucket (GPU/TPU's auto): slow (CI time); its plan has the tests above
def test_packed_loss_gradients_and_metrics_equal_the_padded_step(tmp_path, extra, share, rows):
    cfg = _cfg(tmp_path, *extra, "data.packing=true", f"data.pack_share_prompt={share}",
               f"data.pack_rows={rows}")
    p = run_lib.prepare(cfg, devices=jax.devices()[:1])
    planned = next(run_lib._batcher(p.train_pairs, cfg, 8, 0, packing=True, mesh=p.mesh))
    padded = {k: v for k, v in planned.items() if k != "_pack"}
    packed = packing.apply_packing(planned)
    assert ("packed_branch" in packed) == share  # the setting reaches the layout
    if resolve_pack_rows(rows) == "tight":  # one row, longer than a 128-position block: the tiled attention runs
        assert packed["packed_input_ids"].shape[0] == 1 and packed["packed_input_ids"].shape[1] > 128
    else:
        assert packed["packed_input_ids"].shape[1] == 96
    positions = int((packed["packed_segment_ids"] > 0).sum())
    tokens = int(padded["chosen_attention_mask"].sum() + padded["rejected_attention_mask"].sum())
    assert positions < tokens if share else positions == tokens
    loss_a, met_a, grad_a = _loss_and_grads(p, cfg, padded)
    loss_b, met_b, grad_b = _loss_and_grads(p, cfg, packed)
    assert np.isfinite(loss_a) and loss_a > 0
    np.testing.assert_allclose(loss_b, loss_a, rtol=2e-5)
    assert set(met_a) == set(met_b)
    for key in met_a:
        np.testing.assert_allclose(met_b[key], met_a[key], rtol=1e-4, atol=1e-6, err_msg=key)
    norm = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(grad_a))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grad_a), jax.tree.leaves(grad_b)):
        np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-5 * norm, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("devices", [
    1, pytest.param(8, marks=pytest.mark.slow, id="data2-fsdp2-tensor2")])
def test_packed_run_equals_padded_run_with_precomputed_reference(tmp_path, devices):
    """A whole `dpok train` with gradient accumulation and a precomputed reference with top-k
    divergence rows and reference embeddings (and, slow, with HMK + hybrid on data=2 x fsdp=2 x
    tensor=2): the same losses, reference cache and held-out accuracy packed as padded."""
    more = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "loss.gamma=0.1", "loss.kernel=hmk",
            "loss.eta=0.01"] if devices == 8 else ["model.num_layers=1"]
    common = ["train.steps=2", "train.eval_every=0", "train.checkpoint_every=100",
              "train.compare_with_dpo=false", "reference.mode=precomputed", "loss.alpha=0.1",
              "loss.divergence=js", "optim.grad_accum=2", *more]
    runs = {}
    for mode in ("false", "true"):
        cfg = _cfg(tmp_path / mode / "run", *common, f"data.packing={mode}")
        summary = run_lib.run(cfg, devices=jax.devices()[:devices])
        caches = sorted((tmp_path / mode / ".reference_cache").glob("train-*.npz"))
        assert len(caches) == 1
        runs[mode] = (summary, read_metrics(Path(cfg.run_dir), "train"), dict(np.load(caches[0])))
    (s0, m0, c0), (s1, m1, c1) = runs["false"], runs["true"]
    assert [r["step"] for r in m1] == [1, 2]
    for a, b in zip(m0, m1):
        for key in ("loss", "grad_norm", "logps/chosen", "logps/rejected"):
            np.testing.assert_allclose(b[key], a[key], rtol=1e-4, err_msg=key)
        np.testing.assert_allclose(b["divergence/js"], a["divergence/js"], atol=1e-7)
    assert set(c0) == set(c1)
    # Top-k rows: the padded pass also stores rows for padding positions (never used); the packed
    # one only a sequence's own positions. Compare those.
    real = np.any(c1["ref_topk_logps"] != 0, axis=-1)
    assert real.sum() > 0.3 * real.size
    for key in c0:
        a, b = (c0[key][real], c1[key][real]) if key.startswith("ref_topk") else (c0[key], c1[key])
        if key == "ref_topk_indices":
            assert np.mean(a == b) > 0.99  # near-ties may swap places between layouts
        else:
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5, err_msg=key)
    assert s1["eval/accuracy"] == s0["eval/accuracy"]


def test_packed_rows_divide_over_the_resolved_mesh(tmp_path):
    """The default mesh's fsdp=-1 fills all 8 devices: packed rows must be a multiple of 8 (the
    config's -1 taken literally gave 6 rows, which the batch sharding rejected)."""
    cfg = _cfg(tmp_path)
    assert cfg.mesh.fsdp == -1 and len(jax.devices()) == 8
    p = run_lib.prepare(cfg)
    for mesh in (None, p.mesh):
        planned = next(run_lib._batcher(p.train_pairs, cfg, 8, 0, packing=True, mesh=mesh))
        assert planned["_pack"]["rows"] % 8 == 0
        packed = packing.apply_packing(planned)
        to_global(packed, p.batch_sharding)  # the sharding takes it
    # data.pack_share_prompt reaches the layout (its loss equality is the slow "unshared" case).
    for share in (True, False):
        c = _cfg(tmp_path, f"data.pack_share_prompt={share}")
        packed = packing.apply_packing(next(run_lib._batcher(p.train_pairs, c, 8, 0, packing=True,
                                                             mesh=p.mesh)))
        assert ("packed_branch" in packed) == share
