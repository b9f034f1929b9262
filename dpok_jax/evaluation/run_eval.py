"""`dpok eval RUN_DIR [--data FILE]`: a trained run's held-out metrics (SPEC §10), printed and saved.

From the run's `config.yaml` and its latest (or a chosen) checkpoint: preference accuracy and F1
overall and per task, implicit-reward margins, the Davies–Bouldin score of the policy's chosen vs
rejected response embeddings (and the reference's, for comparison), and weighted alpha of the
policy's and the reference's weight matrices. The reference is run live (its values are the same as
a precomputed cache's); the divergence penalty plays no part in the margins and is not computed.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
from etils import epath

from dpok_jax.evaluation.alpha import named_matrices, weighted_alpha
from dpok_jax.evaluation.clusters import davies_bouldin
from dpok_jax.evaluation.preference import margin_stats, scores_by_task


def restore_params(run_dir: epath.PathLike, step: int | None = None) -> tuple[int, dict, dict]:
    """`(step, policy pure dict, kernel params)` of a run's checkpoint (latest when `step` is None)."""
    import orbax.checkpoint as ocp

    from dpok_jax import storage
    from dpok_jax.train.checkpoint import _unwrap_values

    ckpt_dir = storage.run_path(run_dir) / "checkpoints"
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"no checkpoints folder in {run_dir}: is it a dpok run folder?")
    manager = ocp.CheckpointManager(ckpt_dir, item_names=("state", "data"))
    steps = manager.all_steps()
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {ckpt_dir}")
    step = manager.latest_step() if step is None else int(step)
    if step not in steps:
        raise ValueError(f"--step {step}: not among the checkpoints of {run_dir} ({sorted(steps)})")
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    manager.close()
    params = restored["state"]["params"]
    return step, _unwrap_values(params["policy"]), dict(params.get("kernel") or {})


def evaluate_run(run_dir: epath.PathLike, *, data: str | None = None, step: int | None = None,
                 overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """All SPEC §10 metrics of one run folder (see the module docstring); returns a flat dict."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dpok_jax import data as data_lib
    from dpok_jax import selection, storage
    from dpok_jax.config import load_config
    from dpok_jax.host_device import to_global
    from dpok_jax.host_device import to_host as _fetch
    from dpok_jax.train.run import fit_kernel, host_blas_single_threaded, prepare, step_spec
    from dpok_jax.train.state import BoundStep
    from dpok_jax.train.step import make_eval_step, response_embeddings, split_kernel_params

    run_dir = epath.Path(run_dir)
    config_file = run_dir / "config.yaml"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} not found: is {run_dir} a dpok run folder?")
    with storage.local_copy(config_file) as local:
        cfg = load_config(local, [f"run_dir={run_dir}", *overrides])
    with host_blas_single_threaded():
        p = prepare(cfg)
        cfg = p.cfg = selection.resolve_auto(p)  # a run trained with `auto` records its choice
        eval_pairs, task_names = p.eval_pairs, p.task_names
        if data is not None:
            eval_pairs = _load_pairs(data, cfg, p.tokenizer)
            task_names = list(eval_pairs.task_names)
        ckpt_step, policy_pure, kernel = restore_params(run_dir, step)
        policy = jax.tree.map(jnp.copy, p.init_params)
        nnx.replace_by_pure_dict(policy, policy_pure)
        policy = jax.device_put(policy, p.param_shardings)
        spec = dataclasses.replace(step_spec(cfg), reference="live", alpha=0.0)
        kernel_params = fit_kernel(p, spec)
        # The fitted arrays as an argument: evaluating another seed's run reuses the compiled step.
        kernel_arrays = split_kernel_params(kernel_params)[0]
        eval_step = BoundStep(jax.jit(make_eval_step(p.fns, spec, kernel_params)),
                              *(() if kernel_arrays is None else (kernel_arrays,)))

        embed = jax.jit(lambda params, batch: response_embeddings(p.fns, params, batch))

        trainable = {"policy": policy, "kernel": {k: jnp.asarray(v) for k, v in kernel.items()}}
        cols: dict[str, list] = {}
        batcher = data_lib.make_batcher(eval_pairs, batch_size=cfg.train.batch_size,
                                        seed=cfg.train.seed, buckets=cfg.data.buckets,
                                        batch_ways=p.mesh.shape["data"] * p.mesh.shape["fsdp"],
                                        pack_length=cfg.data.pack_length)
        for batch in batcher.iterate_once():
            g = to_global(batch, p.batch_sharding)
            out = jax.tree.map(_fetch, eval_step(trainable, p.init_params, g))
            valid = out["valid"].astype(bool)
            inputs = {k: v for k, v in g.items() if k.startswith(("chosen_", "rejected_"))}
            pol = [_fetch(e) for e in embed(policy, inputs)]
            ref = [_fetch(e) for e in embed(p.init_params, inputs)]
            got = dict(margin=out["margin"], reward_margin=out["reward_margin"], task=out["task_id"],
                       pol_pos=pol[0], pol_neg=pol[1], ref_pos=ref[0], ref_neg=ref[1])
            for k, v in got.items():
                cols.setdefault(k, []).append(np.asarray(v)[valid])
        c = {k: np.concatenate(v) for k, v in cols.items()}
        result = {"run_dir": str(run_dir), "checkpoint_step": ckpt_step, "eval_data": data or "run's"}
        result.update(scores_by_task(c["margin"], c["task"], task_names))
        result.update(margin_stats(c["reward_margin"], c["task"], task_names))
        result["eval/davies_bouldin"] = davies_bouldin(c["pol_pos"], c["pol_neg"])
        result["eval/davies_bouldin_reference"] = davies_bouldin(c["ref_pos"], c["ref_neg"])
        wa = weighted_alpha(named_matrices(jax.tree.map(_fetch, nnx.to_pure_dict(policy))))
        wa_ref = weighted_alpha(named_matrices(jax.tree.map(_fetch, nnx.to_pure_dict(p.init_params))))
        result["eval/weighted_alpha"] = wa["weighted_alpha"]
        result["eval/weighted_alpha_reference"] = wa_ref["weighted_alpha"]
        result["weighted_alpha_layers"] = {k: v["alpha"] for k, v in wa["layers"].items()}
    return result


def _load_pairs(path: str, cfg, tokenizer):
    """Held-out pairs from a file or folder (its `data.eval_split`), tokenized like the run's."""
    from dpok_jax import data as data_lib

    ds = data_lib.load_preference_dataset(path, split=cfg.data.eval_split, format=cfg.data.format,
                                          tokenizer=tokenizer)
    pairs, report = data_lib.tokenize_pairs(ds, tokenizer, max_prompt_length=cfg.data.max_prompt_length,
                                            max_length=cfg.data.max_length, strict=cfg.data.strict)
    if report.total_skipped:
        print(f"[--data {path}] {report.summary()}", flush=True)
    if len(pairs) == 0:
        raise ValueError(f"--data {path}: no usable pairs: {report.summary()}")
    return pairs


def format_eval(result: dict) -> str:
    """The scalar metrics as an aligned two-column table."""
    rows = [(k, v) for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}"
                     for k, v in rows)


def save_eval(result: dict, path: epath.PathLike) -> epath.Path:
    path = epath.Path(path)
    path.write_text(json.dumps(result, indent=2))
    return path
