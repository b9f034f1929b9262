"""`dpok plan`: the ahead-of-time memory plan of a config's train step (8 fake CPU devices)."""

import dataclasses
from pathlib import Path

import jax
import numpy as np
import pytest

from dpok_jax.config import load_config
from dpok_jax.plan import GIB, Plan, abstract_batch, model_config, plan_config, run_plan, seq_len

REPO = Path(__file__).resolve().parents[1]
SMALL = ["model.preset=tiny", "model.num_layers=1", "train.batch_size=8", "data.max_length=32",
         "data.max_prompt_length=16", "data.buckets=[32]", "loss.chunk_size=16", "reference.mode=precomputed",
         "sft.steps=0", "train.steps=10"]


def _plan(**overrides) -> Plan:
    base = dict(config="c", model="m", mesh={"data": 4, "fsdp": 4, "tensor": 4}, devices=64, device_kind="v5e",
                hbm_bytes=16 * GIB, batch_size=256, seq_len=2048, grad_accum=1, remat="none",
                argument_bytes=2 * GIB, output_bytes=2 * GIB, alias_bytes=2 * GIB, temp_bytes=10 * GIB,
                held_bytes=0, flops_per_device=1e12, compile_seconds=1.0)
    return Plan(**{**base, **overrides})


def test_total_verdict_and_suggestions():
    fits = _plan()
    assert fits.total_bytes == 12 * GIB  # donated outputs are not counted twice
    assert fits.fits and fits.verdict().startswith("FITS: 75%") and fits.suggestions() == []
    tight = _plan(temp_bytes=int(13.5 * GIB))
    assert tight.fits is False and tight.verdict().startswith("TIGHT")
    big = _plan(argument_bytes=12 * GIB, temp_bytes=20 * GIB, output_bytes=0, alias_bytes=0)
    assert big.verdict().startswith("DOES NOT FIT: 200%")
    text = "\n".join(big.suggestions())
    assert "fold data=4 into fsdp (fsdp=16" in text and "model.remat=full" in text
    assert "optim.grad_accum=" in text
    assert _plan(hbm_bytes=None, device_kind=None).fits is None
    table = big.table()
    assert "temporaries" in table and "verdict: DOES NOT FIT" in table and "suggestion:" in table


def test_plan_of_a_compiled_step_on_fsdp8():
    assert jax.device_count() == 8
    cfg = load_config(None, SMALL + ["mesh.data=1", "mesh.fsdp=8", "mesh.tensor=1"])
    plan = plan_config(cfg, config_name="small", device_kind="v5e", devices=jax.devices())
    assert plan.devices == 8 and plan.mesh == {"data": 1, "fsdp": 8, "tensor": 1}
    assert plan.argument_bytes > 0 and plan.temp_bytes > 0
    # Precomputed reference: the frozen float32 parameters stay on the devices, 1/8 of them on each.
    from dpok_jax.plan import model_config

    mcfg, _ = model_config(cfg)
    n = mcfg.vocab_size * 64 + 64 + mcfg.num_layers * (2 * 64 + 64 * 64 * 2 + 2 * 64 * 32 + 3 * 64 * 192)
    norms = 64 + mcfg.num_layers * 2 * 64  # norm weights are replicated
    assert plan.held_bytes == 4 * ((n - norms) // 8 + norms)
    assert plan.total_bytes == plan.argument_bytes + max(plan.output_bytes - plan.alias_bytes, 0) \
        + plan.temp_bytes + plan.held_bytes
    assert np.isfinite(plan.flops_per_device) and plan.flops_per_device > 0
    assert plan.fits and plan.hbm_bytes == 16 * GIB
    tiny_hbm = plan_config(cfg, device_kind="v5e", hbm_bytes=plan.total_bytes // 2, devices=jax.devices())
    assert tiny_hbm.fits is False and tiny_hbm.suggestions()


def test_abstract_batch_matches_the_real_batcher():
    """Keys, shapes and dtypes of the planned batch equal a real `PreferenceBatcher` batch."""
    from dpok_jax import data as data_lib
    from dpok_jax.sharding import make_mesh
    from dpok_jax.train.run import step_spec

    cfg = load_config(None, SMALL + ["reference.mode=live", "data.max_length=96", "data.max_prompt_length=48",
                                     "data.buckets=[96]"])
    tok = data_lib.load_tokenizer("byte")
    ds = data_lib.synthetic_tasks(0, n_train_per_task=4, n_eval_per_task=1)["train"]
    pairs, _ = data_lib.tokenize_pairs(ds, tok, max_prompt_length=48, max_length=96)
    batch = next(data_lib.PreferenceBatcher(pairs, global_batch_size=8, seed=0, buckets=(96,)))
    mesh = make_mesh(data=1, fsdp=8, tensor=1)
    planned = abstract_batch(cfg, step_spec(cfg), 64, mesh)
    assert set(planned) == set(batch)
    for key, value in batch.items():
        assert planned[key].shape == np.asarray(value).shape, key
        assert planned[key].dtype == np.asarray(value).dtype, key
    assert seq_len(cfg) == 96


def test_abstract_batch_with_precomputed_divergence_matches_the_reference_pass():
    """The precomputed keys have the shapes and dtypes the jitted reference pass produces."""
    from flax import nnx

    from dpok_jax.models import Llama
    from dpok_jax.sharding import batch_sharding, make_mesh, param_shardings
    from dpok_jax.train import reference as reference_lib
    from dpok_jax.train.run import step_spec
    from dpok_jax.train.step import ModelFns

    cfg = load_config(None, SMALL + ["loss.alpha=0.1", "loss.divergence=kl", "reference.top_k=4"])
    spec = step_spec(cfg)
    mcfg, _ = model_config(cfg)
    graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: Llama(mcfg, rngs=nnx.Rngs(0))), nnx.Param, ...)
    mesh = make_mesh(data=1, fsdp=8, tensor=1)
    planned = abstract_batch(cfg, spec, mcfg.hidden_size, mesh)
    inputs = reference_lib._model_inputs(planned)  # what the reference pass is fed (task_id included)
    params = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), params,
                          param_shardings(mesh, params))
    ref_pass = reference_lib._reference_pass(ModelFns(graphdef, rest), spec, 4, params, batch_sharding(mesh))
    produced = jax.eval_shape(ref_pass, params, inputs)
    for key, value in produced.items():
        assert (planned[key].shape, planned[key].dtype) == (value.shape, value.dtype), key


def test_model_shape_from_preset_when_the_checkpoint_is_absent():
    cfg = load_config(REPO / "configs" / "llama3_1_8b_tpu_pod.yaml")
    mcfg, notes = model_config(cfg)
    assert (mcfg.hidden_size, mcfg.num_layers, mcfg.vocab_size) == (4096, 32, 128256)
    assert "planned with the model.preset=llama3_1_8b shape" in notes[0]
    bad = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, preset="tiny"))
    with pytest.raises(ValueError, match="has no config.json here: set model.preset"):
        model_config(bad)


def test_indivisible_batch_is_a_clear_error():
    with pytest.raises(ValueError, match="batch_size=8 must be divisible by the batch devices"):
        run_plan(None, SMALL + ["optim.grad_accum=2", "mesh.data=1", "mesh.fsdp=8", "mesh.tensor=1"],
                 devices=8, device_kind="v5e")


@pytest.mark.slow
def test_more_devices_than_this_process_plans_in_a_subprocess(capsys):
    plan = run_plan(None, SMALL + ["train.batch_size=16", "mesh.data=1", "mesh.fsdp=16", "mesh.tensor=1"],
                    devices=16, device_kind="v5e")
    assert plan.devices == 16 and plan.fits
    assert "verdict: FITS" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("name, devices, kind", [
    ("llama3_1_8b_tpu_pod.yaml", 64, "v5e"),
    ("llama3_2_1b_gpu8.yaml", 8, "h100"),
    ("smollm2_135m_hh_gpu.yaml", 1, "l4"),
])
def test_shipped_configs_fit_their_hardware(name, devices, kind):
    plan = run_plan(str(REPO / "configs" / name), [], devices=devices, device_kind=kind)
    assert plan.fits, plan.table()


def test_check_fits_stops_dpok_train_when_the_devices_memory_is_too_small(monkeypatch):
    """`dpok train` on an accelerator compiles its real step and compares it with the devices'
    `bytes_limit` before the first step; CPU devices report none, so the limit is patched here."""
    from dpok_jax import plan as plan_lib
    from dpok_jax.train.run import step_spec

    cfg = load_config(None, SMALL + ["mesh.data=1", "mesh.fsdp=8", "mesh.tensor=1"])
    step, state, ref, _, mesh, _ = plan_lib.abstract_train_step(cfg, jax.devices())
    assert plan_lib._bytes_limits(mesh) == []  # CPU: nothing to compare with, the check passes
    assert plan_lib.check_fits(cfg, step_spec(cfg), step, state, ref, mesh).fits is None
    monkeypatch.setattr(plan_lib, "_bytes_limits", lambda mesh: [16 * GIB, 16 * GIB])
    ok = plan_lib.check_fits(cfg, step_spec(cfg), step, state, ref, mesh)
    assert ok.fits and ok.hbm_bytes == 16 * GIB and ok.held_bytes > 0  # precomputed: reference held
    small = ok.total_bytes // 2
    monkeypatch.setattr(plan_lib, "_bytes_limits", lambda mesh: [16 * GIB, small])  # the smallest counts
    with pytest.raises(ValueError, match="does not fit the devices' memory; nothing was run") as err:
        plan_lib.check_fits(cfg, step_spec(cfg), step, state, ref, mesh)
    assert "verdict: DOES NOT FIT" in str(err.value)
