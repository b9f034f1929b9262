"""Reward margins, Davies–Bouldin and weighted alpha against independent computations (SPEC §10)."""

import warnings

import numpy as np
import pytest

from dpok_jax.evaluation.alpha import eigenvalues, fit_power_law, named_matrices, weighted_alpha
from dpok_jax.evaluation.clusters import davies_bouldin
from dpok_jax.evaluation.preference import margin_stats


def _matrices(seed=0):
    rng = np.random.default_rng(seed)
    return {"gauss": rng.normal(size=(120, 60)), "student_t": rng.standard_t(3, size=(200, 80)),
            "wide": rng.standard_t(4, size=(50, 150)), "tensor3": rng.normal(size=(40, 8, 6))}


def test_eigenvalues_are_those_of_wtw_over_n():
    for w in _matrices().values():
        w2 = w.reshape(w.shape[0], -1)
        if w2.shape[0] < w2.shape[1]:
            w2 = w2.T
        ref = np.linalg.eigvalsh(w2.T @ w2 / w2.shape[0])
        np.testing.assert_allclose(eigenvalues(w), ref, rtol=1e-9, atol=1e-12)


def _powerlaw_fit(ev):
    import powerlaw

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # powerlaw 2.0 caps alpha at 3 by default; spectra of barely trained layers go beyond.
        return powerlaw.Fit(ev, verbose=False, parameter_ranges={"alpha": [1.0, 100.0]})


@pytest.mark.parametrize("name", ["gauss", "student_t", "wide", "tensor3"])
def test_power_law_fit_matches_the_powerlaw_package(name):
    ev = eigenvalues(_matrices()[name])
    mine, ref = fit_power_law(ev), _powerlaw_fit(ev)
    assert mine["xmin"] == pytest.approx(ref.xmin, rel=1e-12)
    assert mine["alpha"] == pytest.approx(ref.alpha, rel=1e-9)
    assert mine["D"] == pytest.approx(ref.D, rel=1e-9)


def test_weighted_alpha_is_the_mean_of_alpha_log_lambda_max():
    mats = _matrices(1)
    mats["tiny"] = np.ones((4, 3))  # too small for a tail fit: skipped
    out = weighted_alpha(mats, min_size=16)
    expected = []
    for name in ("gauss", "student_t", "wide"):
        ev = eigenvalues(mats[name])
        expected.append(_powerlaw_fit(ev).alpha * np.log10(ev.max()))
    # tensor3 flattens to [40, 48]: included.
    ev = eigenvalues(mats["tensor3"])
    expected.append(_powerlaw_fit(ev).alpha * np.log10(ev.max()))
    assert out["weighted_alpha"] == pytest.approx(np.mean(expected), rel=1e-9)
    assert out["skipped"] == ["tiny"] and len(out["layers"]) == 4
    with pytest.raises(ValueError, match="no weight matrix"):
        weighted_alpha({"tiny": np.ones((4, 3))})


def test_heavier_tails_give_smaller_alpha():
    rng = np.random.default_rng(2)
    light = fit_power_law(eigenvalues(rng.normal(size=(400, 200))))["alpha"]
    heavy = fit_power_law(eigenvalues(rng.standard_cauchy(size=(400, 200))))["alpha"]
    assert heavy < 2.5 < light


def test_named_matrices_keeps_two_or_more_axes():
    tree = {"a": {"kernel": np.ones((3, 4)), "bias": np.ones(4)}, "b": np.ones((2, 3, 4))}
    assert sorted(named_matrices(tree)) == ["['a']['kernel']", "['b']"]


def _db_by_hand(a, b):
    ca, cb = a.mean(0), b.mean(0)
    sa = np.mean(np.linalg.norm(a - ca, axis=1))
    sb = np.mean(np.linalg.norm(b - cb, axis=1))
    r = (sa + sb) / np.linalg.norm(ca - cb)
    return r  # with two clusters, each one's worst ratio is this same one


def test_davies_bouldin_matches_hand_formula():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(30, 5)), rng.normal(size=(20, 5)) + 1.5
    assert davies_bouldin(a, b) == pytest.approx(_db_by_hand(a, b), rel=1e-12)
    far = davies_bouldin(a, b + 10.0)
    assert far < davies_bouldin(a, b)
    with pytest.raises(ValueError, match=r"\[N, d\]"):
        davies_bouldin(a, b[:, :3])
    with pytest.raises(ValueError, match="non-finite"):
        davies_bouldin(np.full((3, 5), np.nan), b)


def test_margin_stats_against_numpy():
    rng = np.random.default_rng(0)
    m, t = rng.normal(size=50), rng.integers(0, 3, size=50)
    out = margin_stats(m, t, ["x", "y", "z", "empty"])
    assert out["eval/reward_margin"] == pytest.approx(m.mean())
    assert out["eval/reward_margin_std"] == pytest.approx(m.std())
    for i, name in enumerate("xyz"):
        assert out[f"eval/reward_margin/{name}"] == pytest.approx(m[t == i].mean())
    assert "eval/reward_margin/empty" not in out
    with pytest.raises(ValueError, match="pair 3"):
        margin_stats(np.array([0.0, 1.0, 2.0, np.inf]), np.zeros(4, int), ["x"])
