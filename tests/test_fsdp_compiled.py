"""The compiled fsdp=8 train step on 8 fake CPU devices: activations sharded like data=8's.

Compiled ahead of time (nothing runs) through `dpok_jax.plan.lower_train_step`, the same jitted
step `dpok train` uses. Before issue 12 the fsdp=8 step all-reduced full-batch activations in the
layer loop and held 4.2x the per-device temporaries of data=8 (32.2 MB vs 7.6 MB on the tiny model).

XLA:CPU has no reduce-scatter creator pass (GPU and TPU pipelines turn the "all-reduce, then keep my
slice" of a sharded gradient into a reduce-scatter), so on CPU the per-layer gradient reduction
shows up as an all-reduce of one layer's gradient followed by the device's slice; the test checks
that no all-reduce carries an activation (nothing with the sequence axis).
"""

import re

import jax
import pytest

from dpok_jax.config import load_config
from dpok_jax.plan import lower_train_step

SEQ = 48  # distinct from every model width below, so a sequence axis in a shape is unambiguous
TINY = ["model.preset=tiny", "train.batch_size=16", f"data.max_length={SEQ}", "data.max_prompt_length=24",
        f"data.buckets=[{SEQ}]", "loss.chunk_size=16", "reference.mode=precomputed", "sft.steps=0",
        "train.steps=10", "mesh.tensor=1"]


def _compile(data: int, fsdp: int):
    cfg = load_config(None, TINY + [f"mesh.data={data}", f"mesh.fsdp={fsdp}"])
    lowered, _ = lower_train_step(cfg, jax.devices()[:data * fsdp])
    return lowered.compile()


def _collectives(hlo: str) -> dict[str, list[str]]:
    """Result shapes of each collective op in optimized HLO text."""
    out: dict[str, list[str]] = {}
    for line in hlo.splitlines():
        m = re.search(r"= (.*?) (all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all)(?:-start)?\(",
                      line)
        if m:
            out.setdefault(m.group(2), []).append(m.group(1))
    return out


@pytest.fixture(scope="module")
def compiled():
    assert jax.device_count() == 8
    return {"data8": _compile(8, 1), "fsdp8": _compile(1, 8)}


def test_fsdp8_temporaries_close_to_data8_and_state_sharded(compiled):
    data8 = compiled["data8"].memory_analysis()
    fsdp8 = compiled["fsdp8"].memory_analysis()
    # Each device holds 1/8 of the batch's activations with fsdp as with data parallelism.
    assert fsdp8.temp_size_in_bytes <= 1.5 * data8.temp_size_in_bytes, (fsdp8.temp_size_in_bytes,
                                                                         data8.temp_size_in_bytes)
    # Parameters and Adam moments sharded 8 ways (data=8 replicates them): well under half.
    assert fsdp8.argument_size_in_bytes < 0.25 * data8.argument_size_in_bytes


def test_fsdp8_all_gathers_weights_and_never_all_reduces_activations(compiled):
    ops = _collectives(compiled["fsdp8"].as_text())
    assert ops.get("all-gather"), "fsdp=8 must all-gather the sharded weights"
    for shape in ops.get("all-reduce", []):
        dims = [int(d) for d in re.findall(r"\d+", " ".join(re.findall(r"\[([\d,]*)\]", shape)))]
        assert SEQ not in dims and SEQ - 1 not in dims, f"all-reduce of an activation: {shape}"
