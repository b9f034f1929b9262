"""`dpok train`: a whole run from a `Config`.

data -> tokenized pairs (bad rows reported) -> model (preset or local HF checkpoint) on the mesh ->
optional SFT warm-up that becomes the reference -> kernel parameters fitted on training embeddings ->
(optional) precomputed reference -> the DPO-Kernels loop -> held-out evaluation -> `summary.json`.
With `train.compare_with_dpo`, plain DPO is trained from the same reference into
`RUN_DIR/dpo_baseline` and both are tabulated.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any

import jax
import numpy as np
import threadpoolctl
from etils import epath
from flax import nnx

from dpok_jax import config as config_lib
from dpok_jax import data as data_lib
from dpok_jax import host_device, losses, selection, sharding
from dpok_jax.data import packing as packing_lib
from dpok_jax.losses import registry
from dpok_jax.models import build
from dpok_jax.train import reference as reference_lib
from dpok_jax.train import run_folder
from dpok_jax.train import sft as sft_lib
from dpok_jax.train import summary as summary_lib
from dpok_jax.train.interrupts import EXIT_STATUS, Interrupted, StopRequest
from dpok_jax.train.loop import LoopResult, run_loop, to_global, tree_copy
from dpok_jax.train.state import (BoundStep, init_sharded, jit_train_step, make_optimizer,
                                  replicated_args, state_shardings)
from dpok_jax.train.step import (ModelFns, StepSpec, make_eval_step, make_train_step,
                                 split_kernel_params)


@dataclasses.dataclass
class Prepared:
    """Everything shared by the runs of one `dpok train` (main run and DPO baseline)."""

    cfg: config_lib.Config
    mesh: Any
    tokenizer: Any
    train_pairs: Any
    eval_pairs: Any
    task_names: list
    fns: ModelFns
    init_params: Any  # the reference's parameters (after the SFT warm-up, if any)
    param_shardings: Any
    batch_sharding: Any


def step_spec(cfg: config_lib.Config) -> StepSpec:
    loss = cfg.loss
    # Each variant's hyperparameters as the losses registry names them (one table per family).
    reward_params = registry.keyword_params("reward", loss.reward, loss)
    div_params = (registry.keyword_params("divergence", loss.divergence, loss)
                  if loss.divergence in registry.DIVERGENCES else ())
    return StepSpec(
        beta=loss.beta, link=loss.link, label_smoothing=loss.label_smoothing, reward=loss.reward,
        reward_params=reward_params, logp_reduction=loss.logp_reduction, gamma=loss.gamma,
        kernel=loss.kernel, embeddings="dataset" if loss.embeddings == "encoder" else loss.embeddings,
        eta=loss.eta, alpha=loss.alpha,
        divergence=loss.divergence, divergence_params=div_params, sft_weight=loss.sft_weight,
        chunk_size=loss.chunk_size, reference=cfg.reference.mode, grad_accum=cfg.optim.grad_accum,
    )


def _load_data(cfg: config_lib.Config, tokenizer, run_dir: epath.Path):
    """Training and held-out pairs (`data.load_pairs`); bad-row reports saved in `run_dir`."""
    if cfg.model.path is not None and Path(cfg.model.path).is_dir():
        # A folder that is not a Llama fails here, before any data work, with its model_type.
        from dpok_jax.models.hf import read_config

        read_config(cfg.model.path)
    batches = [b for b, steps in ((cfg.train.batch_size, cfg.train.steps), (cfg.sft.batch_size, cfg.sft.steps))
               if steps > 0]
    return data_lib.load_pairs(cfg.data, tokenizer, run_dir=run_dir, is_main_process=jax.process_index() == 0,
                               min_train_pairs=max(batches, default=1))


def prepare(cfg: config_lib.Config, *, devices=None, stop: StopRequest | None = None) -> Prepared:
    """Data, model on the mesh, and the reference (after the SFT warm-up, if any)."""
    run_dir = epath.Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    mesh = sharding.make_mesh(data=cfg.mesh.data, fsdp=cfg.mesh.fsdp, tensor=cfg.mesh.tensor,
                              devices=devices)
    n_batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.train.batch_size % (n_batch_devices * cfg.optim.grad_accum):
        raise ValueError(
            f"config train.batch_size={cfg.train.batch_size} must be divisible by the batch devices "
            f"(mesh data x fsdp = {n_batch_devices}) times optim.grad_accum={cfg.optim.grad_accum}")
    # Before any data or compile work: each process must own the rows its batcher feeds it.
    for size in {cfg.train.batch_size, cfg.sft.batch_size} if cfg.sft.steps else {cfg.train.batch_size}:
        host_device.check_batch_layout(sharding.batch_sharding(mesh), size)
    tokenizer = data_lib.load_tokenizer(build.tokenizer_source(cfg.data.tokenizer, cfg.model.path))
    train_pairs, eval_pairs = _load_data(cfg, tokenizer, run_dir)
    if cfg.loss.embeddings == "encoder":  # the paper's external sentence encoder, once, cached on disk
        from dpok_jax.models.embed import add_pair_embeddings
        from dpok_jax.models.encoder import SentenceEncoder

        encoder = SentenceEncoder(cfg.loss.encoder_path)
        cache = _cache_dir(cfg, run_dir)
        train_pairs, eval_pairs = (add_pair_embeddings(p, tokenizer, encoder, cache)
                                   for p in (train_pairs, eval_pairs))
    model = build.build_model(cfg.model, tokenizer, seed=cfg.train.seed, mesh=mesh)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    shardings = sharding.param_shardings(mesh, params)
    params = jax.device_put(params, shardings)
    fns = ModelFns(graphdef, rest)
    prepared = Prepared(cfg=cfg, mesh=mesh, tokenizer=tokenizer, train_pairs=train_pairs,
                        eval_pairs=eval_pairs, task_names=list(train_pairs.task_names), fns=fns,
                        init_params=params, param_shardings=shardings,
                        batch_sharding=sharding.batch_sharding(mesh))
    if cfg.sft.steps > 0:
        prepared.init_params = sft_lib.sft_warmup(
            cfg=cfg, fns=fns, init_params=params, param_shardings=shardings,
            batch_sharding=prepared.batch_sharding,
            batcher=_batcher(train_pairs, cfg, cfg.sft.batch_size, cfg.train.seed + 1, mesh=mesh),
            run_dir=run_dir, stop=stop if stop is not None else StopRequest())
    return prepared


def _batcher(pairs, cfg: config_lib.Config, batch_size: int, seed: int, *, packing: bool = False,
             accum: int = 1, mesh=None):
    """`data.make_batcher` with the config's buckets and packing settings, and the batch devices
    (data x fsdp) of `mesh` (default: the config's mesh over all devices, its -1 axis resolved):
    packed rows must divide over them."""
    if mesh is None:
        mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    return data_lib.make_batcher(pairs, batch_size=batch_size, seed=seed, buckets=cfg.data.buckets,
                                 batch_ways=mesh.shape["data"] * mesh.shape["fsdp"], packing=packing,
                                 accum=accum, pack_length=cfg.data.pack_length,
                                 pack_share_prompt=cfg.data.pack_share_prompt,
                                 pack_rows=cfg.data.pack_rows)


def fit_kernel(p: Prepared, spec: StepSpec, stop: StopRequest | None = None) -> dict | None:
    """Kernel parameters (σ by the median heuristic, Ledoit–Wolf Σ, spectral frequencies) fitted
    once on training embeddings from the reference (or the dataset's columns)."""
    if not spec.uses_kernel:
        return None
    e_x, e_pos, e_neg = reference_lib.training_embeddings(
        fns=p.fns, spec=spec, params=p.init_params, batches=_one_pass(p, p.train_pairs),
        batch_sharding=p.batch_sharding, max_pairs=1024, stop=stop)
    return losses.fit_kernel_params(e_x, e_pos, e_neg)


def _one_pass(p: Prepared, pairs):
    """Every pair once, in order, the last batch padded (evaluation, reference pass, fitting);
    packed when `data.packing` is on."""
    batches = _batcher(pairs, p.cfg, p.cfg.train.batch_size, p.cfg.train.seed,
                       packing=p.cfg.data.packing, mesh=p.mesh).iterate_once()
    return map(packing_lib.apply_packing, batches)


def _cache_dir(cfg: config_lib.Config, run_dir: epath.PathLike) -> epath.Path:
    """`reference.cache_dir`, by default `.reference_cache` beside `run_dir` (shared by runs)."""
    if cfg.reference.cache_dir:
        return epath.Path(cfg.reference.cache_dir)
    return epath.Path(run_dir).parent / ".reference_cache"


def _reference_cache(p: Prepared, spec: StepSpec, ref_params, run_dir: epath.Path, split: str,
                     stop: StopRequest | None):
    cfg = p.cfg
    pairs = p.train_pairs if split == "train" else p.eval_pairs
    top_k = cfg.reference.top_k if spec.uses_divergence else None
    width = next(b for b in sorted(cfg.data.buckets) if b >= cfg.data.max_length) - 1
    path = reference_lib.cache_path(_cache_dir(cfg, run_dir), split=split, pairs=pairs,
                                    ref_params=ref_params, spec=spec, top_k=top_k, width=width,
                                    model=config_lib.to_dict(cfg)["model"])
    return reference_lib.precomputed_reference(
        fns=p.fns, spec=spec, ref_params=ref_params, pairs=pairs, batches=_one_pass(p, pairs),
        batch_sharding=p.batch_sharding, path=path, top_k=top_k, width=width,
        progress=cfg.train.progress, stop=stop)


def train_one(p: Prepared, cfg: config_lib.Config, run_dir: epath.PathLike, *, should_stop=None,
              stop: StopRequest | None = None) -> LoopResult:
    """One DPO-Kernels run from the prepared reference into `run_dir` (whose config.yaml the caller
    has checked and written)."""
    run_dir = epath.Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    stop = stop if stop is not None else StopRequest()
    spec = step_spec(cfg)
    kernel_params = fit_kernel(p, spec, stop)
    if spec.kernel == "hmk" and spec.uses_kernel:
        kernel_init = losses.init_hmk_params()
    elif spec.kernel == "mixture" and spec.uses_kernel:
        kernel_init = losses.init_mixture_params()
    else:
        kernel_init = {}
    tx = make_optimizer(
        learning_rate=cfg.optim.learning_rate, kernel_learning_rate=cfg.optim.kernel_learning_rate,
        warmup_steps=cfg.optim.warmup_steps, total_steps=cfg.train.steps,
        weight_decay=cfg.optim.weight_decay, b1=cfg.optim.b1, b2=cfg.optim.b2,
        clip_norm=cfg.optim.clip_norm)
    ref_params = p.init_params
    state, train_step = compile_train_step(p, spec, kernel_params, tx, kernel_init)
    if jax.default_backend() != "cpu":
        # Compiled for the real devices before the first step: stop with the memory plan when
        # the step cannot fit (`dpok plan` does the same ahead of time on fake CPU devices).
        from dpok_jax.plan import check_fits

        print(check_fits(cfg, spec, train_step, state, ref_params, p.mesh).table(), flush=True)

    cache = None
    if spec.reference == "precomputed":
        cache = _reference_cache(p, spec, ref_params, run_dir, "train", stop)
    # The fitted kernel arrays are an argument (replicated), not constants: see `compile_train_step`.
    kernel_args, kernel_shardings = replicated_args(p.mesh, split_kernel_params(kernel_params)[0])
    eval_step = BoundStep(jax.jit(make_eval_step(p.fns, spec, kernel_params),
                                  in_shardings=(jax.tree.map(lambda x: x.sharding, state.params),
                                                p.param_shardings, p.batch_sharding, *kernel_shardings),
                                  out_shardings=p.batch_sharding), *kernel_args)
    packing = cfg.data.packing
    batcher = _batcher(p.train_pairs, cfg, cfg.train.batch_size, cfg.train.seed, packing=packing,
                       accum=cfg.optim.grad_accum, mesh=p.mesh)
    eval_batcher = _batcher(p.eval_pairs, cfg, cfg.train.batch_size, cfg.train.seed, packing=packing,
                            mesh=p.mesh)
    if cache is not None:
        batcher = cache.attach(batcher)
        eval_cache = _reference_cache(p, spec, ref_params, run_dir, "eval", stop)
        eval_batches = lambda: map(packing_lib.apply_packing,  # noqa: E731
                                   eval_cache.attach_iter(eval_batcher.iterate_once()))
    else:
        eval_batches = lambda: map(packing_lib.apply_packing, eval_batcher.iterate_once())  # noqa: E731
    if packing:
        batcher = packing_lib.PackedBatcher(batcher)
    result = run_loop(
        state=state, ref_params=ref_params, train_step=train_step, eval_step=eval_step,
        batcher=batcher, eval_batches=eval_batches, task_names=p.task_names,
        sharding=p.batch_sharding, run_dir=run_dir, total_steps=cfg.train.steps,
        log_every=cfg.train.log_every, eval_every=cfg.train.eval_every,
        checkpoint_every=cfg.train.checkpoint_every, keep_checkpoints=cfg.train.keep_checkpoints,
        max_nonfinite=cfg.train.max_nonfinite, progress=cfg.train.progress,
        desc=run_dir.name, stop=stop, should_stop=should_stop,
    )
    if not result.eval_metrics and not result.interrupted:
        from dpok_jax.train.loop import evaluate

        result.eval_metrics = evaluate(eval_step, result.state.params, ref_params, eval_batches(),
                                       p.batch_sharding, p.task_names)
    if spec.uses_kernel and spec.kernel in ("hmk", "mixture"):
        weights = (losses.hmk_weights if spec.kernel == "hmk" else losses.mixture_weights)(
            result.state.params["kernel"])
        result.eval_metrics.update({f"{spec.kernel}/{k}": float(v) for k, v in weights.items()})
    return result


def compile_train_step(p: Prepared, spec: StepSpec, kernel_params, tx, kernel_init=None):
    """The initial state, born sharded on the mesh, and the train step jitted with explicit in/out
    shardings (the same before and after a step, so it never retraces) and a donated state. The
    fitted kernel arrays are the step's (bound, replicated) last argument, so runs that differ only
    in them (another seed) compile the same program and hit JAX's compilation cache."""
    params = {"policy": tree_copy(p.init_params),
              "kernel": jax.tree.map(np.asarray, kernel_init or {})}
    shardings = _state_shardings(params, p, tx)
    state = init_sharded(params, tx, p.cfg.train.seed, shardings)
    train_step = jit_train_step(make_train_step(p.fns, spec, kernel_params, tx), p.mesh, shardings,
                                p.param_shardings, p.batch_sharding,
                                kernel_arrays=split_kernel_params(kernel_params)[0])
    return state, train_step


def _state_shardings(params, p: Prepared, tx):
    """The whole TrainState by the rules table: moments like their parameters, scalars replicated."""
    return state_shardings(p.mesh, params, p.param_shardings, tx, p.cfg.train.seed)


def dpo_baseline_config(cfg: config_lib.Config) -> config_lib.Config:
    """The same run as plain DPO: no kernel term, no divergence penalty, sigmoid link."""
    loss = dataclasses.replace(cfg.loss, gamma=0.0, kernel="none", eta=0.0, alpha=0.0,
                               divergence="none", link="sigmoid", reward="reverse_kl",
                               label_smoothing=0.0)
    return dataclasses.replace(cfg, loss=loss, run_dir=str(epath.Path(cfg.run_dir) / "dpo_baseline"))


@contextlib.contextmanager
def host_blas_single_threaded():
    """On the CPU backend, limit the host BLAS/LAPACK libraries to one thread while XLA runs.

    XLA:CPU runs a step on its own thread pool, one thread per core. LAPACK calls inside the step
    (the Mahalanobis kernel's triangular solve, `lapack_strsm_ffi`) go to OpenBLAS, whose worker
    threads spin-wait after every call and take those cores from XLA: with HMK on 2 cores this made
    the whole train step about 10% slower (bench/hmk_overhead.py). One BLAS thread costs nothing
    here, since the solves are tiny. Other backends are left as they are.
    """
    if jax.default_backend() != "cpu":
        yield
        return
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        yield


def run(cfg: config_lib.Config, *, should_stop=None, devices=None,
        allow_changes: tuple[str, ...] = ()) -> dict:
    """Train (and optionally the DPO baseline), print the accuracy table, write summary.json.

    The run folder is locked for the whole run; a folder holding a run trained with other settings
    is refused (`allow_changes` names the few keys that may change on purpose, e.g. `train.steps`).
    SIGINT/SIGTERM in any phase save what can be saved and return with `summary["interrupted"]` and
    `summary["exit_status"]` (130 / 143).
    """
    if cfg.mesh.distributed:
        # Before anything touches a JAX backend (host_blas_single_threaded asks which one it is).
        m = cfg.mesh
        jax.distributed.initialize(coordinator_address=m.coordinator_address,
                                   num_processes=m.num_processes, process_id=m.process_id)
    run_dir = run_folder.prepare_run_dir(cfg.run_dir)
    lock = run_folder.RunFolderLock(run_dir) if jax.process_index() == 0 else None
    with contextlib.ExitStack() as stack:
        if lock is not None:
            stack.enter_context(lock)
        run_folder.check_resume_config(cfg, run_dir, allow=tuple(allow_changes))
        _barrier("dpok_config_checked")
        if jax.process_index() == 0:
            run_folder.record_config(cfg, run_dir)
        stop = stack.enter_context(StopRequest())
        stack.enter_context(host_blas_single_threaded())
        try:
            return _run(cfg, should_stop=should_stop, devices=devices, stop=stop,
                        allow_changes=tuple(allow_changes))
        except Interrupted as err:
            print(f"Stopped: {err}.", flush=True)
            return {"interrupted": True, "interrupted_by": _signal_name(err.signum),
                    "exit_status": EXIT_STATUS.get(err.signum, 130), "phase": str(err)}


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _signal_name(signum: int | None) -> str:
    import signal

    return signal.Signals(signum).name if signum else "SIGINT"


def _run(cfg: config_lib.Config, *, should_stop=None, devices=None,
         stop: StopRequest | None = None, allow_changes: tuple[str, ...] = ()) -> dict:
    stop = stop if stop is not None else StopRequest()
    run_dir = epath.Path(cfg.run_dir)
    p = prepare(cfg, devices=devices, stop=stop)
    cfg = p.cfg = selection.resolve_auto(p)  # loss.kernel / loss.divergence "auto" (SPEC §9)
    runs: dict[str, LoopResult] = {}
    label = summary_lib.run_label(gamma=cfg.loss.gamma, kernel=cfg.loss.kernel, alpha=cfg.loss.alpha,
                                  divergence=cfg.loss.divergence)
    runs[label] = train_one(p, cfg, run_dir, should_stop=should_stop, stop=stop)
    if cfg.train.compare_with_dpo and not runs[label].interrupted:
        base = dpo_baseline_config(cfg)
        base_dir = epath.Path(base.run_dir)
        run_folder.prepare_run_dir(base_dir)
        run_folder.check_resume_config(base, base_dir, allow=allow_changes)
        if jax.process_index() == 0:
            run_folder.record_config(base, base_dir)
        runs["dpo"] = train_one(p, base, base_dir, should_stop=should_stop, stop=stop)
    interrupted = any(r.interrupted for r in runs.values())
    summary = summary_lib.build_summary(
        runs, label, interrupted_by=_signal_name(stop.signum) if interrupted else None,
        exit_status=EXIT_STATUS.get(stop.signum, 130) if interrupted else None)
    path = summary_lib.write_summary(run_dir, summary, jax.process_index())
    if jax.process_index() == 0:
        print(summary_lib.format_table({k: r.eval_metrics for k, r in runs.items()}, p.task_names),
              flush=True)
        print(f"Summary written to {path}", flush=True)
    return summary
