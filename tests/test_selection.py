"""SPEC §9 selection: metrics against hand computation, every branch of both rules, fallbacks."""

import math

import numpy as np
import pytest
from scipy.optimize import linprog

from dpok_jax import selection
from dpok_jax.config import SelectionSection, load_config


def _circle(n, a_pos, a_neg, dim=3):
    """n pairs: x = e1, y+ / y- at angles a_pos / a_neg (radians) in the (e1, e2) plane."""
    e = np.zeros((n, dim))
    x = e.copy(); x[:, 0] = 1.0
    yp = e.copy(); yp[:, 0], yp[:, 1] = np.cos(a_pos), np.sin(a_pos)
    yn = e.copy(); yn[:, 0], yn[:, 1] = np.cos(a_neg), np.sin(a_neg)
    return x, yp, yn


def _chord(a):
    return 2 * abs(math.sin(a / 2))


def test_kernel_metrics_by_hand():
    a, b = math.radians(30), math.radians(-50)
    x, yp, yn = _circle(4, a, b)
    m = selection.kernel_metrics(3.0 * x, 0.5 * yp, yn)  # scale must not matter (unit-normalized)
    dp, dn, dpn = _chord(a), _chord(b), _chord(a - b)
    assert m["PND"] == pytest.approx(dp / dn)
    assert m["PNAV"] == pytest.approx((dp - dn) ** 2)
    assert m["TAT"] == pytest.approx(dpn / (dp + dn))
    assert m["NAG"] == pytest.approx((dn - dp) / (dn + dp))
    assert m["drift"] == pytest.approx(dp - dn)


def _rbf_data():
    # 20 % of pairs: y+ = x, y- = -x (d+ - d- = -2, TAT 1); 80 %: y+ = y- = e2 (no gap, TAT 0).
    # PNAV = 0.2 * 4 = 0.8 > 0.5, TAT = 0.2 < 0.3.
    x1, yp1, yn1 = _circle(2, 0.0, math.pi)
    x2, yp2, yn2 = _circle(8, math.pi / 2, math.pi / 2)
    return np.concatenate([x1, x2]), np.concatenate([yp1, yp2]), np.concatenate([yn1, yn2])


@pytest.mark.parametrize("case, expected, values", [
    ("rbf", "rbf", {"PNAV": 0.8, "TAT": 0.2}),
    # y± mirror images about x: NAG = 0, PND = 1, PNAV = 0.
    ("polynomial", "polynomial", {"NAG": 0.0, "PND": 1.0, "PNAV": 0.0}),
    # d+ = 0.518 < d- = 0.845: NAG > 0, PNAV = 0.107 < 0.2, log PND = -0.49.
    ("mahalanobis", "mahalanobis", {"PNAV": (_chord(math.radians(30)) - _chord(math.radians(50))) ** 2}),
    # d+ = 0.052, d- = 1: PND 0.052 < 0.1, TAT 0.99 > 0.7, PNAV 0.9 (not Mahalanobis, not RBF).
    ("spectral", "spectral", {"PND": _chord(math.radians(3)) / _chord(math.radians(60))}),
    # d+ = 1 > d- = 0.518: NAG < 0, PNAV 0.23, PND 1.93.
    ("hmk", "hmk", {}),
])
def test_kernel_rule_every_branch(case, expected, values):
    data = {
        "rbf": _rbf_data,
        "polynomial": lambda: _circle(6, math.radians(40), math.radians(-40)),
        "mahalanobis": lambda: _circle(6, math.radians(30), math.radians(50)),
        "spectral": lambda: _circle(6, math.radians(3), math.radians(-60)),
        "hmk": lambda: _circle(6, math.radians(60), math.radians(30)),
    }[case]()
    m = selection.kernel_metrics(*data)
    for k, v in values.items():
        assert m[k] == pytest.approx(v, abs=1e-9), k
    r = selection.kernel_rule(m)
    assert r["choice"] == expected
    assert r["notes"] == []
    fired = [c for c in r["conditions"] if c["rule"] == expected]
    assert all(c["holds"] for c in fired)


def test_thresholds_are_configurable():
    m = selection.kernel_metrics(*_circle(6, math.radians(30), math.radians(50)))
    strict = SelectionSection(kernel_eps3=0.05)  # PNAV 0.107 no longer counts as small
    assert selection.kernel_rule(m, strict)["choice"] == "hmk"


def test_mahalanobis_falls_back_when_pairs_fewer_than_dims():
    x, yp, yn = _circle(4, math.radians(30), math.radians(50), dim=8)
    rep = selection.select(x, yp, yn)
    assert rep.kernel["choice"] == "hmk"
    assert any("fewer pairs (4) than embedding dimensions (8)" in n and "fallback: hmk" in n
               for n in rep.notes)
    x, yp, yn = _circle(10, math.radians(30), math.radians(50), dim=8)
    assert selection.select(x, yp, yn).kernel["choice"] == "mahalanobis"


def test_single_task_and_too_few_pairs():
    x, yp, yn = _circle(6, math.radians(30), math.radians(50))
    rep = selection.select(x, yp, yn, task_ids=np.zeros(6, int), task_names=["only"])
    assert rep.per_task == {} and any("single task (only)" in n for n in rep.notes)
    rep = selection.select(x, yp, yn, task_ids=np.array([0, 0, 0, 1, 1, 2]), task_names=["a", "b", "c"])
    assert set(rep.per_task) == {"a", "b"} and any("task c has 1 pair" in n for n in rep.notes)
    with pytest.raises(ValueError, match="at least 2 pairs"):
        selection.select(x[:1], yp[:1], yn[:1])


def test_support_overlap_by_hand():
    # Position probabilities [0.9, 0.06, 0.04]: the 0.95 nucleus is the first two tokens.
    lp = np.log(np.array([[[0.9, 0.06, 0.04], [0.5, 0.3, 0.2]]]))
    idx_pos = np.array([[[1, 2, 3], [4, 5, 6]]])
    idx_neg = np.array([[[1, 7, 3], [4, 5, 6]]])
    mask_pos = np.array([[1, 0]])  # {1, 2}
    mask_neg = np.array([[1, 1]])  # {1, 7} | {4, 5, 6}
    got = selection.support_overlap(idx_pos, lp, mask_pos, idx_neg, lp, mask_neg, nucleus=0.95)
    assert got == pytest.approx(1 / 6)


def test_kurtosis_by_hand():
    z = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 10.0])
    m = z - z.mean()
    assert selection.log_ratio_kurtosis(z, np.zeros_like(z)) == pytest.approx(
        np.mean(m ** 4) / np.mean(m ** 2) ** 2)
    assert math.isnan(selection.log_ratio_kurtosis(z[:3], z[:3] * 0))  # too few pairs


def _exact_w1(a, b, cost):
    n, m = cost.shape
    eq = np.zeros((n + m, n * m))
    for i in range(n):
        eq[i, i * m:(i + 1) * m] = 1
    for j in range(m):
        eq[n + j, j::m] = 1
    res = linprog(cost.reshape(-1), A_eq=eq, b_eq=np.concatenate([a, b]), bounds=(0, None))
    return res.fun


def test_transport_w1_matches_exact_lp():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(12, 5))
    idx_a, idx_b = rng.integers(0, 12, size=(3, 4)), rng.integers(0, 12, size=(3, 4))
    la, lb = rng.normal(size=(2, 3, 4))
    got = selection.transport_w1(idx_a, la, idx_b, lb, emb, epsilon=1e-3)
    u = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    for i in range(3):
        cost = np.clip(1 - u[idx_a[i]] @ u[idx_b[i]].T, 0, 2)
        pa, pb = np.exp(la[i]) / np.exp(la[i]).sum(), np.exp(lb[i]) / np.exp(lb[i]).sum()
        assert got[i] == pytest.approx(_exact_w1(pa, pb, cost), abs=5e-3)


@pytest.mark.parametrize("metrics, expected", [
    ({"overlap": 0.7, "drift": 0.5, "kurtosis": 9.0, "smoothness": 0.0}, "bhattacharyya"),
    ({"overlap": 0.5, "drift": 0.4, "kurtosis": 9.0, "smoothness": 0.0}, "wasserstein"),
    ({"overlap": 0.5, "drift": 0.1, "kurtosis": 4.0, "smoothness": 0.0}, "renyi"),
    ({"overlap": 0.2, "drift": 0.1, "kurtosis": 2.0, "smoothness": 0.0}, "js"),
    ({"overlap": 0.4, "drift": 0.1, "kurtosis": 2.0, "smoothness": 0.05}, "squared_hellinger"),
    ({"overlap": 0.4, "drift": 0.1, "kurtosis": 2.0, "smoothness": 0.5}, "kl"),
    ({"overlap": 0.2, "drift": 0.1, "kurtosis": float("nan"), "smoothness": 0.05}, "kl"),
])
def test_divergence_rule_every_branch(metrics, expected):
    r = selection.divergence_rule(metrics)
    assert r["choice"] == expected
    if math.isnan(metrics["kurtosis"]):
        assert any("kurtosis is missing" in n for n in r["notes"])


def test_divergence_exclusion_falls_back():
    r = selection.divergence_rule({"overlap": 0.5, "drift": 0.4, "kurtosis": 4.0, "smoothness": 1.0},
                                  exclude=("wasserstein",))
    assert r["choice"] == "renyi" and "wasserstein matched but is not usable" in r["notes"][0]


def _divergence_data(overlap: str, heavy: bool, smooth: bool):
    """Reference top-k arrays for 8 pairs x 4 positions x k=4, and log-ratios over pairs.

    overlap: "same" (Jaccard 1), "partial" (supports {0, 1} vs {1, 2}: 1/3) or "disjoint" (0).
    heavy: log-ratios [0] * 7 + [10] (Pearson kurtosis 6.1) instead of +-1 (kurtosis 1).
    smooth: every position has the same distribution (W1 0), else positions alternate between
    tokens {0..3} and {4..7} with orthogonal embeddings (W1 1).
    """
    n, t, k = 8, 4, 4
    half = np.log(np.array([0.5, 0.5, 1e-9, 1e-9]))
    ids = {"same": ([0, 1, 2, 3], [0, 1, 2, 3]), "partial": ([0, 1, 2, 3], [1, 2, 0, 3]),
           "disjoint": ([0, 1, 2, 3], [2, 3, 0, 1])}[overlap]  # nuclei: the first two tokens
    idx_pos = np.tile(np.array(ids[0]), (n, t, 1))
    idx_neg = np.tile(np.array(ids[1]), (n, t, 1))
    if not smooth:
        idx_pos[:, 1::2] = (idx_pos[:, 1::2] + 4) % 8
        idx_neg[:, 1::2] = (idx_neg[:, 1::2] + 4) % 8
    lp = np.tile(half, (n, t, 1))
    mask = np.ones((n, t))
    z = np.array([0.0] * 7 + [10.0]) if heavy else np.array([-1.0, 1.0] * 4)
    return idx_pos, idx_neg, lp, mask, z


@pytest.mark.parametrize("overlap, heavy, smooth, angles, expected", [
    ("same", True, False, (60, 30), "bhattacharyya"),
    ("partial", True, False, (60, 30), "wasserstein"),  # drift d+ - d- = 1.0 - 0.518 > 0.3
    ("partial", True, False, (30, 50), "renyi"),  # drift < 0, kurtosis 6.1 > 3
    ("disjoint", False, False, (30, 50), "js"),  # overlap 0, kurtosis 1
    ("partial", False, True, (30, 50), "squared_hellinger"),  # overlap 1/3, smoothness 0
    ("partial", False, False, (30, 50), "kl"),  # overlap 1/3, kurtosis 1, smoothness 1
])
def test_divergence_rule_every_branch_on_constructed_data(overlap, heavy, smooth, angles, expected):
    idx_pos, idx_neg, lp, mask, z = _divergence_data(overlap, heavy, smooth)
    emb = np.eye(8)  # orthogonal token embeddings: cosine distance 1 between different tokens
    metrics = {
        "overlap": selection.support_overlap(idx_pos, lp, mask, idx_neg, lp, mask),
        "kurtosis": selection.log_ratio_kurtosis(z, np.zeros_like(z)),
        "smoothness": selection.smoothness(idx_pos, lp, mask, emb),
    }
    assert metrics["overlap"] == pytest.approx({"same": 1.0, "partial": 1 / 3, "disjoint": 0.0}[overlap])
    p = 1 / 8  # Pearson kurtosis of a two-point law with mass p on one point
    assert metrics["kurtosis"] == pytest.approx((1 - 3 * p + 3 * p * p) / (p * (1 - p)) if heavy else 1.0)
    assert metrics["smoothness"] == pytest.approx(0.0 if smooth else 1.0, abs=1e-3)
    x, yp, yn = _circle(8, math.radians(angles[0]), math.radians(angles[1]))
    rep = selection.select(x, yp, yn, divergence_metrics=metrics)
    assert rep.metrics["drift"] == pytest.approx(_chord(math.radians(angles[0])) - _chord(math.radians(angles[1])))
    assert rep.divergence["choice"] == expected


def test_report_table_and_json(tmp_path):
    x, yp, yn = _rbf_data()
    rep = selection.select(x, yp, yn, divergence_metrics={"overlap": 0.7, "kurtosis": 3.0,
                                                          "smoothness": float("nan")})
    text = rep.table()
    assert "kernel:     rbf  (rule: PNAV > eps1 and TAT < eps2)" in text
    assert "divergence: bhattacharyya" in text and "holds" in text and "fails" in text
    saved = rep.save(tmp_path / "s.json")
    import json

    data = json.loads(saved.read_text())
    assert data["kernel"]["choice"] == "rbf" and data["metrics"]["smoothness"] is None


def test_config_accepts_auto_and_thresholds():
    cfg = load_config(None, ["loss.kernel=auto", "loss.divergence=auto", "selection.kernel_eps1=0.4"])
    assert cfg.loss.kernel == "auto" and cfg.selection.kernel_eps1 == 0.4
    with pytest.raises(ValueError, match="loss.kernel"):
        load_config(None, ["loss.kernel=automatic"])


def test_resolve_auto_replaces_records_and_reuses(tmp_path, monkeypatch):
    import dataclasses
    import types

    x, yp, yn = _rbf_data()
    calls = []

    def fake_run_selection(p, exclude_divergences=()):
        calls.append(exclude_divergences)
        return selection.select(x, yp, yn, divergence_metrics={"overlap": 0.1, "kurtosis": 1.0,
                                                               "smoothness": 1.0})

    monkeypatch.setattr(selection.auto, "run_selection", fake_run_selection)
    cfg = load_config(None, [f"run_dir={tmp_path}", "loss.kernel=auto", "loss.divergence=auto",
                             "loss.alpha=0.1", "reference.mode=precomputed"])
    out = selection.resolve_auto(types.SimpleNamespace(cfg=cfg))
    assert (out.loss.kernel, out.loss.divergence) == ("rbf", "js")
    assert calls == [("wasserstein",)]  # a precomputed reference cannot serve the Wasserstein penalty
    assert (tmp_path / "selection.json").exists()
    again = selection.resolve_auto(types.SimpleNamespace(cfg=cfg))  # resume: reused, not recomputed
    assert again == out and len(calls) == 1
    fixed = dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, kernel="hmk", divergence="kl"))
    assert selection.resolve_auto(types.SimpleNamespace(cfg=fixed)) is fixed


@pytest.mark.slow
def test_auto_in_training_resolves_and_records(tmp_path):
    """`kernel: auto` / `divergence: auto` run the rules after the reference exists; the run folder
    records the report and the run trains with the choice."""
    import json

    from dpok_jax.train.run import run

    cfg = load_config(None, [
        f"run_dir={tmp_path / 'run'}", "loss.kernel=auto", "loss.divergence=auto", "loss.gamma=0.1",
        "loss.alpha=0.01", "train.steps=1", "train.batch_size=8", "train.progress=false",
        "train.eval_every=0", "train.checkpoint_every=0", "data.synthetic_train_per_task=4",
        "data.synthetic_eval_per_task=2", "data.max_prompt_length=56", "data.max_length=64",
        "data.buckets=[64]", "selection.max_pairs=16", "selection.smoothness_positions=8",
        "model.num_layers=1",
    ])
    summary = run(cfg)
    report = json.loads((tmp_path / "run" / "selection.json").read_text())
    assert report["n_pairs"] == 16
    assert summary["run"] == f"{report['kernel']['choice']}+hybrid+{report['divergence']['choice']}"


_HH = __import__("pathlib").Path(__file__).parents[1] / ".." / "shared" / "data" / "hh-rlhf" / \
    "harmless-base-test.jsonl.gz"


@pytest.mark.slow
@pytest.mark.skipif(not _HH.exists(), reason=f"HH-RLHF test split not found at {_HH}")
def test_dpok_select_on_hh_rlhf(tmp_path):
    """`dpok select --data` on real preference pairs (tiny byte-level model: a demonstration of the
    pipeline, not a meaningful choice for HH)."""
    import json

    from dpok_jax.cli import main
    from dpok_jax.losses import registry

    out = tmp_path / "sel.json"
    assert main(["select", "--data", str(_HH), "--out", str(out), f"run_dir={tmp_path / 'run'}",
                 "sft.steps=0", "data.max_prompt_length=192", "data.max_length=256", "data.buckets=[256]",
                 "train.batch_size=16", "selection.max_pairs=32", "selection.smoothness_positions=32",
                 "train.progress=false", "model.num_layers=1"]) == 0
    rep = json.loads(out.read_text())
    assert rep["n_pairs"] == 32 and rep["kernel"]["choice"] in registry.KERNELS
    assert rep["divergence"]["choice"] in registry.DIVERGENCES
    assert any("single task" in n for n in rep["notes"])
    assert all(rep["metrics"][k] is not None for k in ("PND", "PNAV", "TAT", "NAG", "overlap", "kurtosis"))
