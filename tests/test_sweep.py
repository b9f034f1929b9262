"""`dpok sweep`: the grid, cell configs, divergence recording, resume, tables and heatmaps."""

import csv
import types

import pytest

from dpok_jax import sweep
from dpok_jax.config import load_config


def test_grid_and_cell_configs(tmp_path):
    cells = sweep.grid()
    assert len(cells) == 7 * 7 + 4 and len({c.name for c in cells}) == len(cells)
    base = load_config(None, ["loss.gamma=0.2", "loss.eta=0.01", "loss.alpha=0.1", "loss.divergence=kl",
                              "loss.kernel=hmk"])
    dpo = sweep.cell_config(base, sweep.Cell("dpo", "js"), tmp_path / "a")
    assert (dpo.loss.kernel, dpo.loss.gamma, dpo.loss.eta, dpo.loss.divergence, dpo.loss.alpha) == \
        ("none", 0.0, 0.0, "js", 0.1)
    rbf = sweep.cell_config(base, sweep.Cell("rbf", "wasserstein"), tmp_path / "b")
    assert (rbf.loss.kernel, rbf.loss.gamma, rbf.loss.eta) == ("rbf", 0.2, 0.0)
    hmk = sweep.cell_config(base, sweep.Cell("mixture", "f"), tmp_path / "c")
    assert (hmk.loss.eta, hmk.run_dir) == (0.01, str(tmp_path / "c"))
    imp = sweep.cell_config(base, sweep.Cell("implicit", "none", "alpha"), tmp_path / "d")
    assert (imp.loss.reward, imp.loss.kernel, imp.loss.alpha) == ("alpha", "none", 0.0)
    with pytest.raises(ValueError, match="unknown kernel"):
        sweep.grid(kernels=("gaussian",))


class _Fake:
    """Stands in for prepare/train_one: accuracy = 0.5 + 0.1 * row + 0.01 * seed; one cell diverges,
    one call is interrupted (the first time)."""

    def __init__(self, interrupt_at=None):
        self.calls, self.interrupt_at = [], interrupt_at

    def prepare(self, cfg):
        return types.SimpleNamespace(cfg=cfg)

    def train_one(self, p, cfg, run_dir):
        from dpok_jax.train.loop import TrainingDiverged

        seed, name = cfg.train.seed, run_dir.name
        self.calls.append((seed, name))
        if (seed, name) == self.interrupt_at:
            self.interrupt_at = None
            raise KeyboardInterrupt
        if (seed, name) == (1, "hmk__js"):
            raise TrainingDiverged("5 non-finite losses in a row at step 7 (limit ...)")
        row = ["dpo", "hmk", "implicit"].index(name.split("__")[0])
        acc = 0.5 + 0.1 * row + 0.01 * seed
        return types.SimpleNamespace(interrupted=False, final_step=cfg.train.steps,
                                     eval_metrics={"eval/accuracy": acc, "eval/accuracy/t1": acc - 0.1})


def test_sweep_records_divergence_resumes_and_tabulates(tmp_path, monkeypatch):
    import dpok_jax.train.run as run_mod

    fake = _Fake(interrupt_at=(1, "dpo__js"))
    monkeypatch.setattr(run_mod, "prepare", fake.prepare)
    monkeypatch.setattr(run_mod, "train_one", fake.train_one)
    base = load_config(None, ["train.steps=9", "loss.alpha=0.1", "loss.divergence=kl"])
    cells = sweep.grid(("dpo", "hmk"), ("kl", "js"), ("forward_kl",))
    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep(base, tmp_path, seeds=(0, 1), cells=cells, progress=lambda msg: None)
    first = list(fake.calls)
    assert len(first) == 7  # seed 0 (5 cells), then seed 1: dpo__kl, then dpo__js interrupted
    md = sweep.run_sweep(base, tmp_path, seeds=(0, 1), cells=cells, progress=lambda msg: None)
    resumed = fake.calls[len(first):]
    assert resumed == [(1, "dpo__js"), (1, "hmk__kl"), (1, "hmk__js"), (1, "implicit__forward_kl")]
    with (tmp_path / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 10
    div = [r for r in rows if r["status"] == "diverged"]
    assert [(r["seed"], r["cell"], r["step"]) for r in div] == [("1", "hmk__js", "7")]
    text = md.read_text()
    assert "| dpo | 0.505 ± 0.005 | 0.505 ± 0.005 |" in text
    assert "| hmk | 0.605 ± 0.005 | 0.600 ± 0.000 diverged@7 |" in text
    assert "| (no kernel, no penalty) | 0.705 ± 0.005 |" in text
    assert (tmp_path / "heatmap_all.png").stat().st_size > 5000
    assert (tmp_path / "heatmap_t1.png").stat().st_size > 5000
    assert "eval/accuracy/t1" in text and "seed 1 `hmk__js`: diverged at step 7" in text


def test_failed_cell_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    import dpok_jax.train.run as run_mod

    def boom(p, cfg, run_dir):
        if run_dir.name == "dpo__kl":
            raise RuntimeError("XLA said no")
        return types.SimpleNamespace(interrupted=False, final_step=3, eval_metrics={"eval/accuracy": 0.5})

    monkeypatch.setattr(run_mod, "prepare", lambda cfg: types.SimpleNamespace(cfg=cfg))
    monkeypatch.setattr(run_mod, "train_one", boom)
    base = load_config(None, ["loss.alpha=0.1", "loss.divergence=kl"])
    sweep.run_sweep(base, tmp_path, seeds=(0,), cells=sweep.grid(("dpo",), ("kl", "js"), ()),
                    progress=lambda msg: None)
    with (tmp_path / "results.csv").open() as f:
        rows = {r["cell"]: r for r in csv.DictReader(f)}
    assert rows["dpo__kl"]["status"] == "failed" and "XLA said no" in rows["dpo__kl"]["error"]
    assert rows["dpo__js"]["status"] == "done"


@pytest.mark.slow
def test_tiny_sweep_end_to_end(tmp_path):
    from dpok_jax.cli import main

    out = tmp_path / "sw"
    assert main(["sweep", "--out", str(out), "--seeds", "0", "--kernels", "dpo,hmk", "--divergences",
                 "kl,js", "--rewards", "", "sft.steps=4", "train.steps=3", "train.eval_every=3",
                 "train.checkpoint_every=3", "train.batch_size=8"]) == 0
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["cell"] for r in rows) == ["dpo__js", "dpo__kl", "hmk__js", "hmk__kl"]
    assert all(r["status"] == "done" and r["step"] == "3" for r in rows)
    assert all(0.0 <= float(r["eval/accuracy"]) <= 1.0 for r in rows)
    assert (out / "heatmap_all.png").exists() and "| hmk |" in (out / "sweep.md").read_text()
    # Everything finished: a second call trains nothing and only redraws.
    assert main(["sweep", "--out", str(out), "--seeds", "0", "--kernels", "dpo,hmk", "--divergences",
                 "kl,js", "--rewards", ""]) == 0


def test_hard_tasks_shift_and_noise(tmp_path):
    from dpok_jax.data import load_preference_dataset, synthetic_tasks
    from dpok_jax.data.synthetic_hard import synthetic_hard_tasks, write_hard_tasks

    d = synthetic_hard_tasks(3, n_train_per_task=200, n_eval_per_task=30, noise=0.2)
    train, test = d["train"], d["test"]
    train_prompts = set(train["prompt"])
    assert not train_prompts & set(test["prompt"])
    # Wordings and words held out entirely.
    for marker in ("Max of", "Min of", " really ", " usually ", "I want to", "Teach me", "tent", "pipe"):
        assert not any(marker in p for p in train["prompt"]), marker
    for row in test:
        if row["task"] == "factuality":  # one stated entity never appears in training prompts
            assert any(name not in " ".join(train_prompts) for name in row["prompt"].split(".")[0:2])
    # Noise: the clean rule decides chosen for instruction following; about 20 % of train pairs flipped.
    upper = ("uppercase", "capital letters", "all caps")
    inst = [r for r in train if any(u in r["prompt"] for u in upper)]
    flipped = sum(r["chosen"] != r["chosen"].upper() for r in inst)
    assert len(inst) > 30 and 0.05 < flipped / len(inst) < 0.4
    inst_test = [r for r in test if any(u in r["prompt"] for u in upper)]
    assert inst_test and all(r["chosen"] == r["chosen"].upper() for r in inst_test)
    # Same format and lengths as the default tasks; readable as a local folder.
    assert d["train"].column_names == synthetic_tasks(0, n_train_per_task=1, n_eval_per_task=1)["train"].column_names
    folder = write_hard_tasks(tmp_path / "hard", seed=3, n_train_per_task=10, n_eval_per_task=2)
    back = load_preference_dataset(str(folder), split="test")
    assert back.num_rows == 10 and sorted(set(back["task"])) == sorted(set(test["task"]))
    with pytest.raises(ValueError, match="noise"):
        synthetic_hard_tasks(0, noise=0.5)


# ------------------------------------------------------------------------------------------------
# the registries every name list reads from (item 5)


def test_registries_feed_config_selection_sweep_and_docs():
    from pathlib import Path

    from dpok_jax import config, selection
    from dpok_jax.losses import registry

    assert config.KERNELS == ("none",) + tuple(registry.KERNELS)
    assert config.DIVERGENCES == ("none",) + tuple(registry.DIVERGENCES)
    assert config.LINKS == tuple(registry.LINKS) and config.REWARDS == tuple(registry.REWARDS)
    assert sweep.KERNEL_ROWS == ("dpo",) + tuple(registry.KERNELS)
    assert sweep.DIVERGENCE_COLUMNS == tuple(registry.DIVERGENCES)
    assert sweep.IMPLICIT_REWARDS == tuple(registry.REWARDS)
    assert set(selection.KERNEL_BRANCHES + (selection.KERNEL_OTHERWISE,)) <= set(registry.KERNELS)
    assert set(selection.DIVERGENCE_BRANCHES + (selection.DIVERGENCE_OTHERWISE,)) <= set(registry.DIVERGENCES)
    doc = (Path(__file__).parents[1] / "docs" / "analysis.md").read_text()
    assert registry.markdown_tables() in doc, "docs/analysis.md: paste registry.markdown_tables() again"


def test_registry_functions_and_keyword_params():
    import jax
    import numpy as np

    from dpok_jax import losses
    from dpok_jax.config import LossSection
    from dpok_jax.losses import registry

    cfg = LossSection()
    k = jax.random.split(jax.random.key(0), 4)
    p, q = jax.random.normal(k[0], (2, 3, 40))  # V = 40 > every default top-k
    emb = jax.random.normal(k[1], (40, 4))
    for name, v in registry.DIVERGENCES.items():
        kw = dict(registry.keyword_params("divergence", name, cfg))
        if name == "wasserstein":
            kw["cost_embeddings"] = emb
        np.testing.assert_allclose(v.fn(p, q, **kw), losses.divergence(name, p, q, **kw), rtol=1e-6)
    a, b = jax.random.normal(k[2], (2, 5, 4))
    np.testing.assert_allclose(registry.KERNELS["rbf"].fn(a, b, sigma=0.7),
                               losses.kernel_log("rbf", a, b, sigma=0.7))
    assert registry.KERNELS["hmk"].fn is losses.hmk_log
    pc, pr = jax.random.normal(k[3], (2, 6)) - 5.0
    for name, v in registry.REWARDS.items():
        kw = dict(registry.keyword_params("reward", name, cfg))
        np.testing.assert_allclose(v.fn(pc, pr, beta=0.1, **kw),
                                   losses.implicit_reward(name, pc, pr, beta=0.1, **kw))
    for name, v in registry.LINKS.items():
        kw = dict(registry.keyword_params("link", name, cfg))
        np.testing.assert_allclose(v.fn(pc, **kw), losses.preference_loss(name, pc, **kw))
    assert registry.keyword_params("divergence", "renyi", cfg) == (("order", cfg.renyi.order),)
    # Dotted overrides of the nested per-variant sections reach the functions' keywords.
    from dpok_jax.config import load_config

    loss = load_config(None, ["loss.wasserstein.epsilon=0.05", "loss.wasserstein.top_k=4", "loss.f.name=tv",
                              "loss.renyi.order=2", "loss.alpha_reward.alpha=0.3"]).loss
    assert registry.keyword_params("divergence", "wasserstein", loss) == (("epsilon", 0.05), ("top_k", 4))
    assert registry.keyword_params("divergence", "f", loss) == (("f", "tv"),)
    assert registry.keyword_params("divergence", "renyi", loss) == (("order", 2.0),)
    assert registry.keyword_params("reward", "alpha", loss) == (("alpha", 0.3),)
    with pytest.raises(ValueError, match="unknown divergence 'tv'"):
        registry.keyword_params("divergence", "tv", cfg)


def test_table_of_an_implicit_rewards_only_sweep_has_no_empty_grid():
    rows = [dict(seed=str(s), cell="implicit__forward_kl", kernel="none", divergence="none",
                 reward="forward_kl", status="done", step="9", **{"eval/accuracy": str(0.7 + 0.01 * s)})
            for s in (0, 1)]
    text = sweep.sweep_table(rows, "eval/accuracy")
    assert text.splitlines()[0] == "| implicit f-DPO reward | forward_kl |"
    assert "| (no kernel, no penalty) | 0.705 ± 0.005 |" in text


def test_compilation_cache_is_used_then_restored(tmp_path):
    import jax
    import jax.numpy as jnp

    before = jax.config.jax_compilation_cache_dir
    with sweep.compilation_cache(tmp_path / "cache"):
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "cache")
        # Compiling inside works (entries are written only for compilations of 0.2 s or more).
        jax.jit(lambda x: jax.lax.fori_loop(0, 3, lambda i, y: jnp.sin(y) @ y.T, x))(jnp.ones((64, 64)))
    assert jax.config.jax_compilation_cache_dir == before
    with sweep.compilation_cache(None):
        assert jax.config.jax_compilation_cache_dir == before
