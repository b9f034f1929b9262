"""`dpok export RUN_DIR OUT`: the latest checkpoint's policy as a Hugging Face Llama folder."""

from __future__ import annotations

from pathlib import Path

import orbax.checkpoint as ocp
from flax import nnx

from dpok_jax.config import load_config


def export_run(run_dir: Path, out: Path) -> Path:
    from dpok_jax import data as data_lib
    from dpok_jax.models import save_llama
    from dpok_jax.train.run import _build_model, tokenizer_source

    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: is {run_dir} a dpok run folder?")
    cfg = load_config(config_file)
    ckpt_dir = (run_dir / "checkpoints").absolute()
    manager = ocp.CheckpointManager(ckpt_dir, item_names=("state", "data"))
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {ckpt_dir}")
    model = _build_model(cfg, data_lib.load_tokenizer(tokenizer_source(cfg)), None)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    manager.close()
    nnx.replace_by_pure_dict(params, _unwrap_values(restored["state"]["params"]["policy"]))
    save_llama(nnx.merge(graphdef, params, rest), out)
    return out


def _unwrap_values(tree):
    """Target-free restores keep NNX variables as `{"value": array}`; the pure dict has arrays."""
    if isinstance(tree, dict):
        if set(tree) == {"value"}:
            return tree["value"]
        return {k: _unwrap_values(v) for k, v in tree.items()}
    return tree
