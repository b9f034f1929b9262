"""Fitted kernel parameters are arguments of the compiled steps, not constants in them: runs that
differ only in fitted values (another seed) lower to the same program and hit the compilation cache,
and the numbers still follow the values."""

from pathlib import Path
from unittest import mock

import chex
import jax
import numpy as np
import pytest

from dpok_jax import losses
from dpok_jax.config import load_config
from dpok_jax.sweep import compilation_cache
from dpok_jax.train import run as run_lib
from dpok_jax.train.loop import to_global, tree_copy
from dpok_jax.train.state import make_optimizer
from dpok_jax.train.step import (make_eval_step, make_train_step, merge_kernel_params,
                                 split_kernel_params)

SMALL = [
    "data.synthetic_train_per_task=8", "data.synthetic_eval_per_task=4",
    "train.batch_size=8", "train.progress=false", "train.steps=2",
    "model.num_layers=1", "model.hidden_size=32", "model.intermediate_size=64",
    "model.num_heads=2", "model.num_kv_heads=1", "model.head_dim=16",
    "loss.chunk_size=32", "data.max_length=96", "data.max_prompt_length=48",
    "data.buckets=[96]", "data.packing=false",
    # HMK reads all four kernels' parameters (σ, Σ's Cholesky factor, the spectral arrays, the
    # polynomial's static c and degree).
    "loss.gamma=0.1", "loss.kernel=hmk", "loss.eta=0.01",
]


def test_split_and_merge_kernel_params_round_trip():
    kp = losses.fit_kernel_params(*(np.random.default_rng(i).normal(size=(16, 4)) for i in range(3)))
    arrays, static = split_kernel_params(kp)
    assert static["polynomial"] == {"c": 2.0, "degree": 2} and static["spectral"] == {"rho": 0.5}
    assert set(arrays["spectral"]) == {"weights", "lengthscales", "frequencies"}
    assert all(isinstance(x, (np.ndarray, np.generic)) for x in jax.tree.leaves(arrays))
    merged = merge_kernel_params(arrays, static)
    assert jax.tree.structure(merged) == jax.tree.structure(kp)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(kp)))
    assert split_kernel_params(None) == (None, None) and merge_kernel_params(None, None) is None


def _scaled(kp, factor):
    """The same structure, other fitted values (σ, Σ, frequencies, length-scales all scaled)."""
    arrays, static = split_kernel_params(kp)
    arrays = jax.tree.map(lambda x: (x * factor).astype(x.dtype), arrays)
    return merge_kernel_params(arrays, static)


def test_fitted_values_share_one_compiled_program_and_still_change_the_numbers(tmp_path):
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", *SMALL])
    p = run_lib.prepare(cfg, devices=jax.devices()[:1])
    spec = run_lib.step_spec(cfg)
    kp_a = run_lib.fit_kernel(p, spec)
    kp_b = _scaled(kp_a, 1.7)
    assert float(kp_b["rbf"]["sigma"]) != pytest.approx(float(kp_a["rbf"]["sigma"]))
    tx = make_optimizer(learning_rate=1e-3, kernel_learning_rate=1e-2, warmup_steps=0, total_steps=10,
                        weight_decay=0.0, b1=0.9, b2=0.95, clip_norm=1.0)
    batch = to_global(next(run_lib._batcher(p.train_pairs, cfg, 8, 0)), p.batch_sharding)
    init = losses.init_hmk_params()

    cache = tmp_path / "cache"
    chex.clear_trace_counter()
    with compilation_cache(cache):
        with mock.patch.object(run_lib, "make_train_step",
                               lambda *a: chex.assert_max_traces(make_train_step(*a), n=1)):
            state_a, step_a = run_lib.compile_train_step(p, spec, kp_a, tx, init)
        state_b, step_b = run_lib.compile_train_step(p, spec, kp_b, tx, init)
        # One program text for both (the old closures' texts differ: the values were constants).
        text_a = step_a.lower(state_a, p.init_params, batch).as_text()
        assert step_b.lower(state_b, p.init_params, batch).as_text() == text_a
        closure = [jax.jit(make_train_step(p.fns, spec, kp, tx)).lower(state_a, p.init_params, batch)
                   .as_text() for kp in (kp_a, kp_b)]
        assert closure[0] != closure[1]

        state_a, metrics_a = step_a(state_a, p.init_params, batch)
        step_a(state_a, p.init_params, batch)  # the bound kernel arrays never retrace the step
        entries = sorted(f.name for f in Path(cache).iterdir())
        assert entries, "the train step's compilation should have been cached"
        _, metrics_b = step_b(state_b, p.init_params, batch)
        # The second step compiled nothing new: it was a cache hit.
        assert sorted(f.name for f in Path(cache).iterdir()) == entries

    # The numbers follow the values: b's loss differs from a's and equals the old closure's with b.
    assert float(metrics_a["loss"]) != pytest.approx(float(metrics_b["loss"]), rel=1e-4)
    state_c, _ = run_lib.compile_train_step(p, spec, kp_b, tx, init)
    _, metrics_c = jax.jit(make_train_step(p.fns, spec, kp_b, tx))(state_c, p.init_params, batch)
    np.testing.assert_allclose(float(metrics_b["loss"]), float(metrics_c["loss"]), rtol=1e-5, atol=1e-6)

    # The eval step likewise: one program, scores that follow the values.
    params = {"policy": tree_copy(p.init_params), "kernel": init}
    eval_fn = jax.jit(make_eval_step(p.fns, spec, kp_a))
    arrays = {k: split_kernel_params(kp)[0] for k, kp in (("a", kp_a), ("b", kp_b))}
    assert (eval_fn.lower(params, p.init_params, batch, arrays["a"]).as_text()
            == eval_fn.lower(params, p.init_params, batch, arrays["b"]).as_text())
    score_b = np.asarray(eval_fn(params, p.init_params, batch, arrays["b"])["score"])
    score_a = np.asarray(eval_fn(params, p.init_params, batch, arrays["a"])["score"])
    old_b = np.asarray(jax.jit(make_eval_step(p.fns, spec, kp_b))(params, p.init_params, batch)["score"])
    np.testing.assert_allclose(score_b, old_b, rtol=1e-5, atol=1e-6)
    assert not np.allclose(score_a, score_b)
