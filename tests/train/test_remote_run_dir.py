"""A `gs://` run folder, through the same `etils.epath` API as on Google Cloud Storage.

No machine here reaches GCS, so `fake_gcs` serves `gs://` paths from a local folder:
- every `epath.Path("gs://bucket/x")` operation goes to `ROOT/bucket/x` (`etils.epath.testing.mock_epath`),
  and opening a `gs://` object for append fails, as it does on GCS;
- orbax's TensorStore writes go to the same folder through TensorStore's file driver (orbax's choice
  of the `gcs` driver and its bucket-namespace query are patched; everything else in orbax takes its
  GCS code paths, e.g. commit-marker files instead of renames);
- the test runs in an empty working directory and checks it stays empty: any write that bypassed
  epath (`open`, `os.open`, `np.savez` on the URL string) would land in `./gs:/...` there.

Not covered: GCS itself (latency, eventual listing, permissions), gcsfs / tf.io.gfile, TensorStore's
gcs driver, and TensorBoard events on GCS (tensorboardX needs google-cloud-storage, absent here: the
run logs a note and writes metrics.jsonl only).
"""

import json
import os

import jax
import numpy as np
import pytest
from etils import epath
from etils.epath import testing as epath_testing

from dpok_jax import storage
from dpok_jax.config import load_config
from dpok_jax.train import run as run_lib
from dpok_jax.train.metrics_log import MetricsLog, read_metrics
from dpok_jax.train.run_folder import RunFolderLock

SMALL = [
    "data.synthetic_train_per_task=16", "data.synthetic_eval_per_task=4",
    "train.batch_size=8", "train.progress=false", "train.log_every=1",
    "model.num_layers=1", "model.hidden_size=32", "model.intermediate_size=64",
    "model.num_heads=2", "model.num_kv_heads=1", "model.head_dim=16",
    "loss.chunk_size=32", "data.max_length=96", "data.max_prompt_length=48",
    "data.buckets=[96]",
]


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
    """`gs://...` served from `tmp_path/gcs` (see the module docstring); yields that folder."""
    from orbax.checkpoint._src.path import gcs_utils
    from orbax.checkpoint._src.serialization import tensorstore_utils

    root = tmp_path / "gcs"
    root.mkdir()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)

    def local(path):
        s = os.fspath(path)
        return str(root / s[len("gs://"):]) if s.startswith("gs://") else s

    def remote(path):
        s = os.fspath(path)
        return "gs://" + os.path.relpath(s, root) if s.startswith(str(root)) else s

    def one(fn, path, *args, **kwargs):
        return fn(local(path), *args, **kwargs)

    def two(fn, path, dst, *args, **kwargs):
        return fn(local(path), local(dst), *args, **kwargs)

    def open_(fn, path, mode):
        if os.fspath(path).startswith("gs://") and "a" in mode:
            raise NotImplementedError(f"GCS objects cannot be appended to ({path})")
        return fn(local(path), mode)

    def glob(fn, pattern):
        return [remote(p) for p in fn(local(pattern))]

    def walk(fn, top, **kwargs):
        for dirpath, dirs, files in fn(local(top), **kwargs):
            yield remote(dirpath), dirs, files

    monkeypatch.setattr(tensorstore_utils, "_use_gcs_driver", lambda directory: False)
    real_normalize = tensorstore_utils._normalize_path
    monkeypatch.setattr(tensorstore_utils, "_normalize_path", lambda p: real_normalize(local(p)))
    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
    with epath_testing.mock_epath(exists=one, isdir=one, listdir=one, makedirs=one, mkdir=one,
                                  remove=one, rmtree=one, stat=one, open=open_, rename=two,
                                  replace=two, copy=two, glob=glob, walk=walk):
        yield root
    assert os.listdir(cwd) == [], f"written outside epath: {os.listdir(cwd)}"


def test_storage_writes_and_reads_remote_files_whole(fake_gcs):
    path = epath.Path("gs://bucket/d/cache.npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    storage.save_npz(path, a=np.arange(3), b=np.ones((2, 2), np.float32))
    got = storage.load_npz(path)
    np.testing.assert_array_equal(got["a"], np.arange(3))
    assert (fake_gcs / "bucket/d/cache.npz").is_file()
    assert os.listdir(fake_gcs / "bucket/d") == ["cache.npz"]  # no temporary left behind
    storage.write_text("gs://bucket/d/x.txt", "hello")
    with storage.local_copy("gs://bucket/d/x.txt") as local:
        assert not local.startswith("gs:") and open(local).read() == "hello"
    assert storage.run_path("gs://bucket/d") == epath.Path("gs://bucket/d")


def test_metrics_log_on_a_remote_folder_rewrites_the_file(fake_gcs):
    """GCS cannot append: the rows reach the object at flush (every checkpoint) and close."""
    (fake_gcs / "bucket/run").mkdir(parents=True)
    log = MetricsLog("gs://bucket/run", flush_every_s=3600)  # tensorboardX cannot write gs:// here
    log.write(1, "train", {"loss": 1.0})
    log.write(2, "train", {"loss": float("nan")})
    assert not (fake_gcs / "bucket/run/metrics.jsonl").exists()  # not flushed yet
    log.flush()
    assert [r["step"] for r in read_metrics("gs://bucket/run")] == [1, 2]
    log.write(3, "eval", {"accuracy": 0.5})
    log.close()
    log = MetricsLog("gs://bucket/run", tensorboard=False)  # a resumed run: truncate, then go on
    log.truncate_after(1)
    log.write(2, "train", {"loss": 0.5})
    log.close()
    assert [(r["step"], r["split"]) for r in read_metrics("gs://bucket/run")] == [(1, "train"),
                                                                                 (2, "train")]


def test_remote_lock_is_a_marker_that_is_reported_not_obeyed(fake_gcs, capsys):
    (fake_gcs / "bucket/run").mkdir(parents=True)
    with RunFolderLock("gs://bucket/run"):
        marker = json.loads((fake_gcs / "bucket/run/.lock").read_text())
        assert marker["pid"] == os.getpid()
        with RunFolderLock("gs://bucket/run"):  # an OS lock would refuse; a marker can only warn
            pass
        assert "cannot be locked" in capsys.readouterr().out
    assert not (fake_gcs / "bucket/run/.lock").exists()


@pytest.mark.slow  # three whole runs (~2.5 min); CI keeps the storage, metrics and lock tests above
def test_a_run_in_a_gs_folder_writes_its_files_and_resumes_exactly(tmp_path, fake_gcs):
    """SFT warm-up, HMK, a precomputed reference: config.yaml, metrics.jsonl, summary.json, the
    reference cache, SFT reference and checkpoints all in the bucket; stopped at step 3 and resumed,
    the losses equal an uninterrupted local run's."""
    common = [*SMALL, "train.steps=6", "train.eval_every=0", "train.checkpoint_every=100",
              "sft.steps=2", "sft.batch_size=8", "loss.gamma=0.1", "loss.kernel=hmk",
              "reference.mode=precomputed"]
    full = load_config(None, [f"run_dir={tmp_path / 'full' / 'run'}", *common])
    run_lib.run(full, devices=jax.devices()[:1])
    cut = load_config(None, ["run_dir=gs://bucket/runs/cut", *common])
    first = run_lib.run(cut, devices=jax.devices()[:1], should_stop=lambda step: step == 3)
    assert first["interrupted"] and first["steps"] == 3
    assert [r["step"] for r in read_metrics("gs://bucket/runs/cut", "train")] == [1, 2, 3]
    second = run_lib.run(cut, devices=jax.devices()[:1])
    assert not second["interrupted"] and second["steps"] == 6

    bucket = fake_gcs / "bucket" / "runs"
    files = set(os.listdir(bucket / "cut"))
    assert {"config.yaml", "metrics.jsonl", "summary.json", "checkpoints", "reference",
            "bad_rows_train.json"} <= files, files
    assert ".lock" not in files and "tensorboard" not in files
    assert json.loads((bucket / "cut" / "summary.json").read_text())["steps"] == 6
    assert sorted(os.listdir(bucket / ".reference_cache"))[0].startswith("eval-")
    assert load_config(str(bucket / "cut" / "config.yaml")).run_dir == "gs://bucket/runs/cut"
    a = [r["loss"] for r in read_metrics(full.run_dir, "train")]
    b = [r["loss"] for r in read_metrics("gs://bucket/runs/cut", "train")]
    assert len(a) == len(b) == 6
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)

    from dpok_jax.train.checkpoint import restore_policy  # `dpok export`'s read, from the bucket

    step, policy = restore_policy("gs://bucket/runs/cut/checkpoints")
    assert step == 6 and jax.tree.leaves(policy)
