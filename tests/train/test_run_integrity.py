"""A run folder never trains on wrong data or settings and never loses work (issue: run integrity).

Unit-level checks (lock, resume-config rule, torn metrics line, damaged checkpoint fallback, cache
fingerprint, config validation) plus short in-process runs where the whole path matters.
"""

import json
import os
import stat
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpok_jax.cli import main
from dpok_jax.config import load_config
from dpok_jax.train import run as run_lib
from dpok_jax.train import run_folder
from dpok_jax.train.checkpoint import RunCheckpoints
from dpok_jax.train.loop import TrainingDiverged
from dpok_jax.train.metrics_log import MetricsLog, read_metrics

SMALL = [
    "data.synthetic_train_per_task=16", "data.synthetic_eval_per_task=4",
    "train.batch_size=8", "train.progress=false", "train.log_every=1",
    "model.num_layers=1", "model.hidden_size=32", "model.intermediate_size=64",
    "model.num_heads=2", "model.num_kv_heads=1", "model.head_dim=16",
    "loss.chunk_size=32", "data.max_length=96", "data.max_prompt_length=48",
    "data.buckets=[96]", "train.eval_every=0",
]


def _cfg(run_dir, *extra):
    return load_config(None, [f"run_dir={run_dir}", *SMALL, *extra])


# --- config validation: one clear error naming the key, before any work -------------------------

@pytest.mark.parametrize("override, key", [
    ("train.log_every=0", "train.log_every"),
    ("train.max_nonfinite=0", "train.max_nonfinite"),
    ("loss.beta=inf", "loss.beta"),
    ("optim.learning_rate=inf", "optim.learning_rate"),
    ("optim.learning_rate=nan", "optim.learning_rate"),
    ("train.checkpoint_every=-1", "train.checkpoint_every"),
    ("train.eval_every=-5", "train.eval_every"),
    ("optim.warmup_steps=-1", "optim.warmup_steps"),
    ("optim.clip_norm=-1.0", "optim.clip_norm"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints"),
    ("data.pack_length=-1", "data.pack_length"),
    ("data.pack_length=100000", "data.pack_length"),
])
def test_bad_settings_are_one_line_errors_naming_the_key(override, key, capsys):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_config(None, [override])
    assert main(["train", override]) == 2
    err = capsys.readouterr().err.strip()
    assert key in err and len(err.splitlines()) == 1


def test_entropy_weight_needs_a_mixture_kernel():
    with pytest.raises(ValueError, match="loss.eta=0.1"):
        load_config(None, ["loss.eta=0.1", "loss.kernel=rbf", "loss.gamma=0.1"])
    assert load_config(None, ["loss.eta=0.1", "loss.kernel=hmk", "loss.gamma=0.1"]).loss.eta == 0.1


def test_malformed_yaml_names_the_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: 3\n loss: [unclosed\n")
    assert main(["train", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "malformed YAML" in err and "bad.yaml" in err and "line" in err
    assert "Traceback" not in err


def test_run_dir_that_is_a_file_or_read_only_is_a_clear_error(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(["train", f"run_dir={a_file}"]) == 2
    assert "is not a folder" in capsys.readouterr().err
    if os.geteuid() == 0:
        pytest.skip("root ignores folder permissions: the read-only case cannot be shown")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        assert main(["train", f"run_dir={ro / 'run'}"]) == 2
        assert "cannot be created" in capsys.readouterr().err
    finally:
        ro.chmod(stat.S_IRWXU)


# --- lock ---------------------------------------------------------------------------------------

def test_second_process_on_a_run_folder_is_refused_naming_the_holder(tmp_path):
    run_dir = run_folder.prepare_run_dir(tmp_path / "run")
    with run_folder.RunFolderLock(run_dir):
        with pytest.raises(run_folder.RunFolderError, match=rf"pid {os.getpid()} on host"):
            run_lib.run(_cfg(run_dir, "train.steps=1"))
    # Released: a lock file left behind (as by a killed process) does not block.
    assert (run_dir / ".lock").exists()
    with run_folder.RunFolderLock(run_dir):
        pass


def test_stale_lock_file_of_a_killed_process_does_not_block(tmp_path):
    run_dir = run_folder.prepare_run_dir(tmp_path / "run")
    (run_dir / ".lock").write_text(json.dumps({"pid": 999999, "host": "gone", "started": "then"}))
    with run_folder.RunFolderLock(run_dir) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()


# --- resume with other settings -----------------------------------------------------------------

def test_resume_config_rule(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = _cfg(run_dir, "train.steps=20")
    run_folder.check_resume_config(cfg, run_dir)  # a new folder: anything goes
    run_folder.record_config(cfg, run_dir)
    saved = (run_dir / "config.yaml").read_text()

    changed = _cfg(run_dir, "train.steps=20", "loss.beta=0.5", "optim.learning_rate=0.005",
                   "sft.steps=5", "data.seed=3")
    with pytest.raises(run_folder.RunFolderError) as err:
        run_folder.check_resume_config(changed, run_dir)
    for key in ("loss.beta", "optim.learning_rate", "sft.steps", "data.seed"):
        assert key in str(err.value)
    # Operational settings change freely; train.steps only on purpose.
    run_folder.check_resume_config(_cfg(run_dir, "train.steps=20", "train.log_every=5",
                                        "train.checkpoint_every=3", "mesh.data=2"), run_dir)
    longer = _cfg(run_dir, "train.steps=40")
    with pytest.raises(run_folder.RunFolderError, match="--allow-change train.steps"):
        run_folder.check_resume_config(longer, run_dir)
    run_folder.check_resume_config(longer, run_dir, allow=("train.steps",))
    with pytest.raises(run_folder.RunFolderError, match="only"):
        run_folder.check_resume_config(changed, run_dir, allow=("loss.beta",))
    assert (run_dir / "config.yaml").read_text() == saved


def test_cli_refuses_changed_settings_and_keeps_config_yaml(tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = [f"run_dir={run_dir}", *SMALL, "sft.steps=2", "train.compare_with_dpo=false", "train.steps=2"]
    assert main(["train", *args]) == 0
    saved = (run_dir / "config.yaml").read_text()
    summary = (run_dir / "summary.json").read_text()
    capsys.readouterr()
    assert main(["train", *args, "loss.beta=0.5"]) == 2
    err = capsys.readouterr().err
    assert "loss.beta: 0.1 -> 0.5" in err
    assert (run_dir / "config.yaml").read_text() == saved
    assert (run_dir / "summary.json").read_text() == summary
    # Extending the run on purpose continues it from step 2.
    assert main(["train", *args[:-1], "train.steps=3", "--allow-change", "train.steps"]) == 0
    assert [r["step"] for r in read_metrics(run_dir, "train")] == [1, 2, 3]
    assert "steps: 3" in (run_dir / "config.yaml").read_text()


# --- non-finite state is never saved; export refuses it -----------------------------------------

def test_nonfinite_parameters_are_never_checkpointed_and_export_refuses_them(tmp_path, monkeypatch):
    real = run_lib.make_train_step

    def poisoning(*args):
        step = real(*args)

        def wrapped(state, ref, batch, *kernel_arrays):
            state, metrics = step(state, ref, batch, *kernel_arrays)
            # From step 3 on, the parameters turn to NaN (as an infinite learning rate would make them).
            bad = state.step >= 3
            params = jax.tree.map(lambda x: jnp.where(bad, x * jnp.nan, x), state.params)
            return state.replace(params=params), metrics

        return wrapped

    monkeypatch.setattr(run_lib, "make_train_step", poisoning)
    cfg = _cfg(tmp_path / "nan", "train.steps=8", "train.checkpoint_every=2", "optim.warmup_steps=0")
    with pytest.raises(TrainingDiverged, match="last good checkpoint \\(step 2\\)"):
        run_lib.run(cfg, devices=jax.devices()[:1])
    ckpt_dir = Path(cfg.run_dir) / "checkpoints"
    assert sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()) == [2]

    # A checkpoint holding NaN weights (written by an older version, say) is refused by export.
    manager = RunCheckpoints(ckpt_dir, keep=5, async_save=False)
    _, state, data = manager.restore_latest(_abstract_state(ckpt_dir))
    nan_state = dict(state)
    nan_state["params"] = jax.tree.map(lambda x: x * np.nan, state["params"])
    manager.save(4, nan_state, data, force=True)
    manager.close()
    assert main(["export", cfg.run_dir, str(tmp_path / "hf")]) == 2
    assert not (tmp_path / "hf" / "model.safetensors").exists()


def _abstract_state(ckpt_dir: Path):
    """The saved tree as numpy (a target-free restore of the newest step)."""
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(ckpt_dir, item_names=("state", "data")) as m:
        restored = m.restore(m.latest_step(), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore()))
    return jax.tree.map(np.asarray, restored["state"])


# --- damaged checkpoint, torn metrics line -------------------------------------------------------

def test_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    directory = tmp_path / "checkpoints"
    target = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    ckpt = RunCheckpoints(directory, keep=3, async_save=False)
    ckpt.save(1, {"w": target["w"] + 1}, {"position": 1}, force=True)
    ckpt.save(2, {"w": target["w"] + 2}, {"position": 2}, force=True)
    ckpt.close()
    # Damage every data file of step 2 (a copy cut short).
    for f in (directory / "2" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
            f.write_bytes(b"\0" * 3)
    ckpt = RunCheckpoints(directory, keep=3, async_save=False)
    step, state, data = ckpt.restore_latest(target)
    ckpt.close()
    assert step == 1 and data["position"] == 1
    np.testing.assert_array_equal(np.asarray(state["w"]), target["w"] + 1)
    out = capsys.readouterr().out
    assert "Checkpoint 2" in out and "falling back to the previous checkpoint" in out
    assert (tmp_path / "checkpoints_damaged" / "2").is_dir() and not (directory / "2").exists()


def test_torn_last_metrics_line_is_dropped_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "split": "train", "loss": 0.7}\n'
                    '{"step": 2, "split": "train", "loss": 0.6}\n{"step": 3, "spl')
    log = MetricsLog(tmp_path, tensorboard=False)
    log.truncate_after(2)
    log.write(3, "train", {"loss": 0.5})
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    path.write_text('{"step": 1, "sp\n{"step": 2, "split": "train", "loss": 0.6}\n')
    with pytest.raises(ValueError, match="metrics.jsonl line 1"):
        MetricsLog(tmp_path, tensorboard=False).truncate_after(2)


# --- the first logged window after a resume ----------------------------------------------------

def test_first_log_after_a_resume_averages_the_whole_window(tmp_path):
    """Item 10: with log_every > 1 the first window logged after a resume averaged only the steps run
    since the resume; the partly filled window is saved with the checkpoint and restored."""
    common = ["train.steps=6", "train.log_every=4", "train.checkpoint_every=100", "sft.steps=0",
              "optim.warmup_steps=0"]
    full = _cfg(tmp_path / "full", *common)
    run_lib.run(full, devices=jax.devices()[:1])
    cut = _cfg(tmp_path / "cut", *common)
    first = run_lib.run(cut, devices=jax.devices()[:1], should_stop=lambda step: step == 3)
    assert first["interrupted"] and first["steps"] == 3
    logged = Path(cut.run_dir) / "metrics.jsonl"
    assert not logged.exists() or read_metrics(cut.run_dir, "train") == []  # no full window yet
    run_lib.run(cut, devices=jax.devices()[:1])
    a, b = read_metrics(full.run_dir, "train"), read_metrics(cut.run_dir, "train")
    assert [r["step"] for r in b] == [r["step"] for r in a] == [4, 6]
    for key in ("loss", "rewards/accuracies", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in b], [r[key] for r in a], rtol=1e-6, atol=1e-7,
                                   err_msg=key)


# --- the precomputed reference cache follows the data -------------------------------------------

def _write_pairs(path: Path, responses: str):
    rows = [{"prompt": f"Question {i}: what is {i} plus {i}?",
             "chosen": f" {2 * i}{responses}", "rejected": f" {2 * i + 1}{responses}"}
            for i in range(48)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_precomputed_reference_is_recomputed_when_the_data_changes(tmp_path):
    train, held_out = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    _write_pairs(held_out, ".")
    common = ["train.steps=1", "sft.steps=0", "loss.gamma=0", "loss.kernel=none",
              "reference.mode=precomputed", f"data.source={train}", f"data.eval_source={held_out}",
              f"reference.cache_dir={tmp_path / 'cache'}"]
    first_losses = []
    for i, responses in enumerate((".", " and that is the answer, surely.")):
        _write_pairs(train, responses)  # same row count, other responses
        cfg = _cfg(tmp_path / f"r{i}", *common)
        run_lib.run(cfg, devices=jax.devices()[:1])
        first_losses.append(read_metrics(cfg.run_dir, "train")[0]["loss"])
    # Policy == reference at step 1: the DPO loss is exactly log 2 when the cached reference values
    # belong to this data (a stale cache gave 32.75 here).
    np.testing.assert_allclose(first_losses, [np.log(2.0)] * 2, rtol=1e-5)
    assert len(list((tmp_path / "cache").glob("train-*.npz"))) == 2


# --- SFT on an fsdp mesh; export on a machine with fewer devices ---------------------------------

def test_sft_on_a_sharded_mesh_then_export_on_one_device_with_tokenizer(tmp_path):
    """SFT + fsdp > 1 failed in one process ("Sharding passed to jit does not match"); export must
    restore only the parameters, on a machine with 1 device, and write loadable tokenizer files."""
    import subprocess
    import sys

    cfg = _cfg(tmp_path / "run", "train.steps=1", "sft.steps=2", "sft.batch_size=8",
               "model.num_kv_heads=2", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
    summary = run_lib.run(cfg, devices=jax.devices()[:8])
    assert summary["steps"] == 1
    out = tmp_path / "hf"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    done = subprocess.run([sys.executable, "-m", "dpok_jax.cli", "export", cfg.run_dir, str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    from transformers import AutoTokenizer

    from dpok_jax.data.tokenizer import ByteTokenizer
    from dpok_jax.models import load_llama
    from dpok_jax.train.checkpoint import restore_policy

    tok = AutoTokenizer.from_pretrained(out)
    text = "Ünïcode 🤖 and\ttabs"
    assert tok.encode(text, add_special_tokens=False) == ByteTokenizer().encode(text)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (256, 257, 258)
    messages = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        ByteTokenizer().apply_chat_template(messages, add_generation_prompt=True)
    _, policy = restore_policy(Path(cfg.run_dir) / "checkpoints")
    from flax import nnx

    exported = nnx.to_pure_dict(nnx.state(load_llama(out), nnx.Param))
    for a, b in zip(jax.tree.leaves(policy), jax.tree.leaves(exported)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
