from pathlib import Path

import pytest

from dpok_jax.cli import default_config_path, main
from dpok_jax.config import Config, load_config

ROOT = Path(__file__).resolve().parents[2]
CONFIG_FILES = sorted((ROOT / "configs").glob("*.yaml")) + [default_config_path()]


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_every_config_file_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    # Files hold differences only: at least one value differs from the defaults.
    assert cfg != Config()


def test_overrides_and_errors(tmp_path):
    cfg = load_config(default_config_path(), ["loss.beta=0.3", "train.steps=7"])
    assert cfg.loss.beta == 0.3 and cfg.train.steps == 7 and cfg.loss.kernel == "hmk"
    with pytest.raises(ValueError, match="nonexistent"):
        load_config(None, ["loss.nonexistent=1"])
    with pytest.raises(ValueError, match="loss.kernel"):
        load_config(None, ["loss.kernel=gaussian"])
    with pytest.raises(ValueError, match="loss.beta"):
        load_config(None, ["loss.beta=0"])
    with pytest.raises(ValueError, match="needs a loss.kernel"):
        load_config(None, ["loss.gamma=0.5"])
    with pytest.raises(ValueError, match="grad_accum"):
        load_config(None, ["train.batch_size=10", "optim.grad_accum=3"])
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: many\n")
    with pytest.raises(ValueError, match="bad.yaml"):
        load_config(bad)


def test_cli_reports_bad_config(capsys):
    assert main(["train", "loss.kernel=nope"]) == 2
    assert "loss.kernel" in capsys.readouterr().err


def test_ipo_link_with_summed_logps_warns():
    """Issue 10 (docs drift): IPO's target margin 1/(2β) is meant for length-normalized log-probs; the
    config default reduction is `sum`, so that combination warns and `mean` does not."""
    import warnings

    assert load_config(None, []).loss.logp_reduction == "sum"
    with pytest.warns(UserWarning, match=r"loss\.link=ipo.*loss\.logp_reduction=mean"):
        load_config(None, ["loss.link=ipo"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_config(None, ["loss.link=ipo", "loss.logp_reduction=mean"]).loss.link == "ipo"
        load_config(None, ["loss.link=sigmoid"])


def test_per_variant_hyperparameters_are_nested_and_old_flat_keys_are_errors(tmp_path):
    cfg = load_config(None, ["loss.wasserstein.epsilon=0.05", "loss.wasserstein.top_k=8", "loss.renyi.order=2",
                             "loss.f.name=tv", "loss.alpha_reward.alpha=0.3"])
    assert (cfg.loss.wasserstein.epsilon, cfg.loss.wasserstein.top_k) == (0.05, 8)
    assert (cfg.loss.renyi.order, cfg.loss.f.name, cfg.loss.alpha_reward.alpha) == (2.0, "tv", 0.3)
    nested = tmp_path / "nested.yaml"
    nested.write_text("loss:\n  divergence: renyi\n  alpha: 0.1\n  renyi: {order: 0.7}\n")
    assert load_config(nested).loss.renyi.order == 0.7
    for old, new in [("loss.renyi_order=2", "loss.renyi.order"), ("loss.f_name=tv", "loss.f.name"),
                     ("loss.wasserstein_epsilon=0.05", "loss.wasserstein.epsilon"),
                     ("loss.wasserstein_top_k=4", "loss.wasserstein.top_k"),
                     ("loss.reward_alpha=0.3", "loss.alpha_reward.alpha")]:
        with pytest.raises(ValueError, match=rf"{old.split('=')[0]} .*use {new}"):
            load_config(None, [old])
    flat = tmp_path / "flat.yaml"
    flat.write_text("loss:\n  divergence: wasserstein\n  wasserstein_top_k: 4\n")
    with pytest.raises(ValueError, match=r"loss.wasserstein_top_k in .*flat.yaml has moved: use loss.wasserstein.top_k"):
        load_config(flat)
