"""`dpok report`: plots exist, are non-empty PNGs with drawn content, and the summary links them."""

import json
import re

import numpy as np
import pytest
from matplotlib.image import imread

from dpok_jax.cli import main
from dpok_jax.report import read_metrics, write_report


def _write_run(path, *, hmk=True, divergence=True, baseline=False):
    path.mkdir(parents=True)
    rows = []
    for step in range(10, 110, 10):
        row = {"step": step, "split": "train", "loss": 0.7 - step / 1000, "rewards/margins": step / 100,
               "rewards/accuracies": 0.5 + step / 400}
        if hmk:
            row.update({"hmk/lambda_rbf": 0.5 + step / 1000, "hmk/lambda_poly": 0.5 - step / 1000,
                        "hmk/lambda_spec": 0.5, "hmk/lambda_maha": 0.5, "hmk/tau_local": 0.6,
                        "hmk/tau_global": 0.4})
        if divergence:
            row["divergence/kl"] = step / 500 if step != 50 else "nan"
        rows.append(row)
        if step % 50 == 0:
            rows.append({"step": step, "split": "eval", "eval/accuracy": 0.6 + step / 1000})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "summary.json").write_text(json.dumps({"eval/accuracy": 0.7, "run": "hmk+hybrid"}))
    (path / "selection.json").write_text(json.dumps({"kernel": {"choice": "rbf", "rule": "PNAV > eps1"},
                                                     "divergence": {"choice": "kl", "rule": "otherwise"}}))
    if baseline:
        _write_run(path / "dpo_baseline", hmk=False, divergence=False)


def _assert_png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and np.std(img[..., :3]) > 0.01  # something is drawn


def test_report_draws_everything_and_links_it(tmp_path):
    run = tmp_path / "run"
    _write_run(run, baseline=True)
    md_path = write_report(run)
    md = md_path.read_text()
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(linked) == ["divergences.png", "kernel_weights.png", "margins_accuracy.png",
                              "paper_forms.png"]
    for name in linked:
        _assert_png(md_path.parent / name)
    assert "| `eval/accuracy` | 0.7000 |" in md and "kernel **rbf**" in md
    assert read_metrics(run)[4]["divergence/kl"] != read_metrics(run)[4]["divergence/kl"]  # "nan" -> NaN


def test_report_skips_plots_without_data_and_says_why(tmp_path):
    run = tmp_path / "run"
    _write_run(run, hmk=False, divergence=False)
    assert main(["report", str(run), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "report.md").read_text()
    assert "kernel_weights.png" not in md and not (tmp_path / "out" / "kernel_weights.png").exists()
    assert "skipped, no HMK / mixture weights" in md and "skipped, no divergence/* values" in md
    _assert_png(tmp_path / "out" / "margins_accuracy.png")


def test_report_bad_input(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "metrics.jsonl not found" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "split": "train"}\n{oops\n')
    with pytest.raises(ValueError, match="line 2"):
        write_report(tmp_path)
