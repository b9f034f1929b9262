"""Trainer-side loss metrics (issue 10): the Wasserstein penalty is the debiased Sinkhorn divergence
(0 where the policy equals the reference, i.e. at the first step), its Sinkhorn convergence is
logged, and the squared-Hellinger penalty logs the Hellinger distance H = sqrt(H²) (SPEC §6)."""

import jax
import numpy as np

from dpok_jax.config import load_config
from dpok_jax.train import run as run_lib
from dpok_jax.train.metrics_log import read_metrics

TINY = [
    "data.synthetic_train_per_task=8", "data.synthetic_eval_per_task=2",
    "train.batch_size=4", "train.progress=false", "train.log_every=1", "train.eval_every=0",
    "model.num_layers=1", "model.hidden_size=32", "model.intermediate_size=64",
    "model.num_heads=2", "model.num_kv_heads=1", "model.head_dim=16",
    "loss.chunk_size=32", "data.max_length=96", "data.max_prompt_length=48", "data.buckets=[96]",
]


def _train_rows(tmp_path, *extra):
    cfg = load_config(None, [f"run_dir={tmp_path}", *TINY, *extra])
    run_lib.run(cfg, devices=jax.devices()[:1])
    return read_metrics(cfg.run_dir, "train")


def test_wasserstein_penalty_is_debiased_and_logs_sinkhorn_convergence(tmp_path):
    rows = _train_rows(tmp_path / "w", "train.steps=2", "loss.alpha=0.1", "loss.divergence=wasserstein",
                       "loss.wasserstein.top_k=4")
    first = rows[0]
    # Step 1: policy = reference. The biased entropic cost was ~0.2 here (and pulled the policy away);
    # the Sinkhorn divergence is 0 to the solver's tolerance.
    assert abs(first["divergence/wasserstein"]) < 1e-4
    for row in rows:
        assert 0.0 <= row["divergence/sinkhorn_converged"] <= 1.0
    assert first["divergence/sinkhorn_converged"] == 1.0


def test_squared_hellinger_penalty_logs_the_hellinger_distance(tmp_path):
    rows = _train_rows(tmp_path / "h", "train.steps=3", "loss.alpha=0.1",
                       "loss.divergence=squared_hellinger", "optim.learning_rate=0.05",
                       "optim.warmup_steps=0")
    assert rows[0]["divergence/hellinger_distance"] < 1e-3  # policy = reference
    last = rows[-1]
    h2, h = last["divergence/squared_hellinger"], last["divergence/hellinger_distance"]
    assert h2 > 0
    # Mean of per-position sqrt(H²_t) in [0, 1]: >= mean H² (sqrt x >= x on [0, 1]) and, by Jensen,
    # <= sqrt(mean H²).
    assert h2 - 1e-7 <= h <= np.sqrt(h2) + 1e-7
