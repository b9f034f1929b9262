"""The trainer end to end on CPU: a short run, resume exactness, sharding, retracing, divergence."""

import json
from unittest import mock
from pathlib import Path

import chex
import jax
import numpy as np
import pytest

from dpok_jax.config import load_config
from dpok_jax.data import TASKS
from dpok_jax.train import run as run_lib
from dpok_jax.train.loop import TrainingDiverged, to_global
from dpok_jax.train.metrics_log import read_metrics
from dpok_jax.train.state import make_optimizer
from dpok_jax.train.step import make_train_step

SMALL = [
    "data.synthetic_train_per_task=16", "data.synthetic_eval_per_task=4",
    "train.batch_size=8", "train.progress=false", "train.log_every=1",
    "model.num_layers=1", "model.hidden_size=32", "model.intermediate_size=64",
    "model.num_heads=2", "model.num_kv_heads=1", "model.head_dim=16",
    "loss.chunk_size=32", "data.max_length=96", "data.max_prompt_length=48",
    "data.buckets=[96]",
]


def _cfg(tmp_path, *extra):
    return load_config(None, [f"run_dir={tmp_path}", *SMALL, *extra])


def test_few_step_run_writes_summary_metrics_checkpoints_and_exports(tmp_path):
    cfg = _cfg(tmp_path / "run", "train.steps=4", "train.eval_every=4", "sft.steps=2",
               "sft.batch_size=8", "loss.gamma=0.1", "loss.kernel=hmk", "loss.eta=0.01",
               "train.compare_with_dpo=true")
    summary = run_lib.run(cfg, devices=jax.devices()[:1])
    run_dir = Path(cfg.run_dir)
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved["steps"] == 4 and saved["run"] == "hmk+hybrid"
    for key in ["eval/accuracy", "eval/f1"] + [f"eval/accuracy/{t}" for t in TASKS]:
        assert 0.0 <= saved[key] <= 1.0, key
        assert f"baseline/{key}" in saved
    assert abs(sum(saved[f"hmk/{k}"] for k in ("tau_local", "tau_global")) - 1) < 1e-5
    train_rows = read_metrics(run_dir, "train")
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) for r in train_rows)
    assert (run_dir / "checkpoints").is_dir() and (run_dir / "reference").is_dir()
    assert (run_dir / "bad_rows_train.json").is_file()
    assert summary["eval/accuracy"] == saved["eval/accuracy"]

    # Export, then load with transformers: same logits as our model on the same tokens.
    torch = pytest.importorskip("torch")
    from transformers import LlamaForCausalLM

    from dpok_jax.cli import main

    out = tmp_path / "hf"
    assert main(["export", str(run_dir), str(out)]) == 0
    hf = LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    from dpok_jax.models import load_llama

    ours = load_llama(out)
    ids = np.array([[72, 105, 33, 10, 65, 66]], dtype=np.int32)
    mask = np.ones_like(ids)
    with torch.no_grad():
        ref = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours(ids, mask)), ref, atol=1e-4)


# slow (about 1 minute: three runs' compiles): CI's default run is close to its 15 minutes, and the
# default suite resumes exactly in test_remote_run_dir.py and across two processes in
# test_multiprocess.py.
@pytest.mark.slow
def test_resume_continues_exactly(tmp_path):
    common = ["train.steps=6", "train.eval_every=0", "train.checkpoint_every=100", "sft.steps=2",
              "sft.batch_size=8", "loss.gamma=0.1", "loss.kernel=hmk"]
    full = _cfg(tmp_path / "full", *common)
    run_lib.run(full, devices=jax.devices()[:1])
    cut = _cfg(tmp_path / "cut", *common)
    first = run_lib.run(cut, devices=jax.devices()[:1], should_stop=lambda step: step == 3)
    assert first["interrupted"] and first["steps"] == 3
    second = run_lib.run(cut, devices=jax.devices()[:1])
    assert not second["interrupted"] and second["steps"] == 6
    a = [r["loss"] for r in read_metrics(full.run_dir, "train")]
    b = [r["loss"] for r in read_metrics(cut.run_dir, "train")]
    assert len(a) == len(b) == 6
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)


def _one_step(cfg, devices, batch_np):
    p = run_lib.prepare(cfg, devices=devices)
    spec = run_lib.step_spec(cfg)
    tx = make_optimizer(learning_rate=1e-3, kernel_learning_rate=1e-2, warmup_steps=0,
                        total_steps=10, weight_decay=0.0, b1=0.9, b2=0.95, clip_norm=1.0)
    with mock.patch.object(run_lib, "make_train_step",
                           lambda *a: chex.assert_max_traces(make_train_step(*a), n=1)):
        state, step = run_lib.compile_train_step(p, spec, None, tx)
    batch = to_global(batch_np, p.batch_sharding)
    state, metrics = step(state, p.init_params, batch)
    state, metrics2 = step(state, p.init_params, batch)  # same shapes: must not retrace
    return p, state, metrics, metrics2


def test_sharded_step_equals_single_device_and_no_retrace(tmp_path):
    kv = "model.num_kv_heads=2"  # divisible by tensor=2
    cfg = _cfg(tmp_path, kv, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
    p1 = run_lib.prepare(_cfg(tmp_path, kv), devices=jax.devices()[:1])
    batch_np = next(run_lib._batcher(p1.train_pairs, p1.cfg, 8, 0))
    chex.clear_trace_counter()
    _, single, m1, m1b = _one_step(_cfg(tmp_path, kv), jax.devices()[:1], batch_np)
    chex.clear_trace_counter()
    p8, sharded, m8, m8b = _one_step(cfg, jax.devices()[:8], batch_np)
    assert p8.mesh.devices.size == 8
    for a, b in ((m1, m8), (m1b, m8b)):
        np.testing.assert_allclose(float(a["loss"]), float(b["loss"]), rtol=1e-5)
        np.testing.assert_allclose(float(a["grad_norm"]), float(b["grad_norm"]), rtol=1e-5)
    # Adam's update m/sqrt(v) is sign-like where gradients are ~0, so reduction-order noise there
    # moves a parameter by a fraction of one step (lr = 1e-3): allow a tenth of a step.
    for x, y in zip(jax.tree.leaves(single.params), jax.tree.leaves(sharded.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-4)
    sharded_leaves = [x for x in jax.tree.leaves(sharded.params["policy"])
                      if len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated]
    assert sharded_leaves, "no parameter is actually sharded over the 8-device mesh"


def test_nonfinite_losses_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
    from dpok_jax.train import step as step_lib

    real = step_lib.losses.dpo_kernels_loss

    def poisoned(*args, **kwargs):
        loss, metrics = real(*args, **kwargs)
        return loss * jax.numpy.nan, metrics

    monkeypatch.setattr(step_lib.losses, "dpo_kernels_loss", poisoned)
    cfg = _cfg(tmp_path / "nan", "train.steps=30", "train.eval_every=0", "train.max_nonfinite=3")
    with pytest.raises(TrainingDiverged, match="max_nonfinite=3"):
        run_lib.run(cfg, devices=jax.devices()[:1])
    rows = read_metrics(cfg.run_dir, "train")
    assert [r["skipped_total"] for r in rows] == [1.0, 2.0]


@pytest.mark.parametrize("extra", [pytest.param([], marks=pytest.mark.slow),  # CI time: kl runs the same
                                   ["loss.alpha=0.1", "loss.divergence=kl"]], ids=["dpo", "kl"])  # path and more
def test_precomputed_reference_matches_live(tmp_path, extra):
    """Same first-step loss from the cached reference as from the live one (the KL penalty is
    approximate in precomputed mode: top-k + tail, so only close)."""
    losses_by_mode = {}
    for mode in ("live", "precomputed"):
        cfg = _cfg(tmp_path / mode, "train.steps=1", "train.eval_every=0", "loss.gamma=0.1",
                   "loss.kernel=rbf", "loss.embeddings=reference", f"reference.mode={mode}",
                   "reference.top_k=64", *extra)
        run_lib.run(cfg, devices=jax.devices()[:1])
        losses_by_mode[mode] = read_metrics(cfg.run_dir, "train")[0]
    live, pre = losses_by_mode["live"], losses_by_mode["precomputed"]
    for key in ("logps/chosen", "rewards/margins", "embedding/score"):
        np.testing.assert_allclose(pre[key], live[key], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pre["loss"], live["loss"], rtol=1e-3 if extra else 1e-5)


def test_wasserstein_penalty_trains_with_live_reference(tmp_path):
    cfg = _cfg(tmp_path / "w", "train.steps=2", "train.eval_every=0", "loss.alpha=0.1",
               "loss.divergence=wasserstein", "loss.wasserstein.top_k=4")
    run_lib.run(cfg, devices=jax.devices()[:1])
    rows = read_metrics(cfg.run_dir, "train")
    assert len(rows) == 2 and all(np.isfinite(r["divergence/wasserstein"]) for r in rows)
    assert rows[0]["divergence/wasserstein"] >= -1e-6  # debiased: zero at p = q to solver tolerance
    with pytest.raises(ValueError, match="reference.mode=live"):
        _cfg(tmp_path / "w2", "loss.alpha=0.1", "loss.divergence=wasserstein",
             "reference.mode=precomputed")


def _blas_threads():
    import threadpoolctl

    return [lib["num_threads"] for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "blas"]


def test_run_limits_host_blas_to_one_thread_on_cpu_and_restores_it(tmp_path):
    # LAPACK custom calls inside the step (Mahalanobis solve) must not wake a BLAS thread pool that
    # competes with XLA's own threads for the cores.
    jax.scipy.linalg.solve_triangular(jax.numpy.eye(2), jax.numpy.ones((2, 1)), lower=True)
    before = _blas_threads()
    assert before, "no BLAS library loaded: the check below would be vacuous"
    seen = []
    with mock.patch.object(run_lib, "_run", side_effect=lambda *a, **k: seen.append(_blas_threads())
                           or {}):
        run_lib.run(_cfg(tmp_path))
    assert seen == [[1] * len(before)]
    assert _blas_threads() == before


def test_distributed_initialize_comes_before_any_backend_query(tmp_path):
    # jax.distributed.initialize must run before a backend exists; the BLAS guard asks for one.
    calls = []
    backend = jax.default_backend
    with mock.patch.object(jax.distributed, "initialize", lambda **kw: calls.append("initialize")), \
            mock.patch.object(jax, "default_backend", lambda: calls.append("backend") or backend()), \
            mock.patch.object(run_lib, "_run", lambda *a, **k: {}):
        run_lib.run(_cfg(tmp_path, "mesh.distributed=true", "mesh.num_processes=1", "mesh.process_id=0",
                         "mesh.coordinator_address=localhost:1234"))
    assert calls[:2] == ["initialize", "backend"]
