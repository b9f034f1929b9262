import numpy as np
import pytest
from sklearn.metrics import f1_score

from dpok_jax.evaluation.preference import preference_scores, scores_by_task


def test_f1_matches_sklearn_over_both_orders():
    rng = np.random.default_rng(0)
    h = rng.normal(0.3, 1.0, size=200)
    h[:5] = 0.0  # ties
    # Both orders: label 1 for (chosen, rejected), 0 for (rejected, chosen); predict 1 iff margin > 0.
    y_true = np.concatenate([np.ones_like(h), np.zeros_like(h)])
    y_pred = np.concatenate([h > 0, -h > 0]).astype(int)
    s = preference_scores(h)
    assert s["f1"] == pytest.approx(f1_score(y_true, y_pred))
    assert s["accuracy"] == pytest.approx(np.mean(h > 0))


def test_per_task_and_errors():
    out = scores_by_task(np.array([1.0, 1.0, -1.0, 2.0]), np.array([0, 0, 1, 1]), ["x", "y"])
    assert out["eval/accuracy/x"] == 1.0 and out["eval/accuracy/y"] == 0.5
    assert out["eval/accuracy/mean_over_tasks"] == 0.75
    with pytest.raises(ValueError, match="pair 1"):
        preference_scores(np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match="empty"):
        preference_scores(np.array([]))
