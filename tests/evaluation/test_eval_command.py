"""`dpok eval RUN_DIR` end to end on a very short run."""

import json

import pytest

from dpok_jax.cli import main

TINY = ["train.steps=2", "sft.steps=0", "train.batch_size=8", "train.progress=false", "train.eval_every=2",
        "train.checkpoint_every=2", "data.synthetic_train_per_task=8", "data.synthetic_eval_per_task=4",
        "data.max_prompt_length=56", "data.max_length=64", "data.buckets=[64]", "model.num_layers=1",
        "loss.kernel=hmk", "loss.gamma=0.1", "loss.eta=0.01"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("evalrun") / "run"
    assert main(["train", f"run_dir={path}", *TINY]) == 0
    return path


def test_restore_params_reads_a_run_checkpoint(tmp_path):
    """Fast (not `slow`): `dpok eval`'s checkpoint read. It imported a helper from a module that no
    longer had it (ImportError on every `dpok eval`), and only the slow end-to-end test reached it."""
    import jax.numpy as jnp
    import numpy as np

    from dpok_jax.evaluation.run_eval import restore_params
    from dpok_jax.train.checkpoint import RunCheckpoints

    w = np.arange(6.0, dtype=np.float32).reshape(2, 3)
    state = {"params": {"policy": {"layer": {"kernel": {"value": jnp.asarray(w)}}},
                        "kernel": {"lambda_rbf": jnp.asarray(0.25)}}, "step": jnp.asarray(3)}
    ckpts = RunCheckpoints(tmp_path / "checkpoints", keep=2, async_save=False)
    ckpts.save(3, state, {"epoch": 0})
    ckpts.close()
    step, policy, kernel = restore_params(tmp_path)
    assert step == 3
    np.testing.assert_array_equal(np.asarray(policy["layer"]["kernel"]), w)  # {"value": x} unwrapped
    assert float(kernel["lambda_rbf"]) == 0.25
    with pytest.raises(ValueError, match="--step 5"):
        restore_params(tmp_path, step=5)


@pytest.mark.slow
def test_eval_reproduces_the_run_and_adds_analysis(run_dir, tmp_path):
    assert main(["eval", str(run_dir), "train.progress=false"]) == 0
    got = json.loads((run_dir / "eval.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    # The same policy, kernel weights and held-out pairs as the run's own final evaluation.
    for key in ("eval/accuracy", "eval/f1", "eval/accuracy/reasoning"):
        assert got[key] == pytest.approx(summary[key], abs=1e-9), key
    assert got["checkpoint_step"] == 2 and got["eval/count"] == 20
    for key in ("eval/davies_bouldin", "eval/davies_bouldin_reference", "eval/weighted_alpha",
                "eval/reward_margin"):
        assert isinstance(got[key], float), key
    # Other held-out data: a file of 3 pairs.
    data = tmp_path / "held.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q: Is ice cold? {i}\nA:", "chosen": " Yes.",
                                        "rejected": " No."}) + "\n" for i in range(3)))
    assert main(["eval", str(run_dir), "train.progress=false", "--data", str(data),
                 "--out", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["eval/count"] == 3
    assert main(["eval", str(run_dir), "--step", "7"]) == 2  # not a checkpoint: a clear error
