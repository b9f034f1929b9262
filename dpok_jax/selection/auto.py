"""Selection with a model: `dpok select` and `loss.kernel: auto` / `loss.divergence: auto`."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np
from etils import epath

from dpok_jax.selection.metrics import log_ratio_kurtosis, smoothness, support_overlap
from dpok_jax.selection.rules import SelectionReport, select

# ------------------------------------------------------------------------------------------------
# with a model: `dpok select` and `kernel: auto` / `divergence: auto`


def collect(p, *, max_pairs: int, top_k: int) -> dict:
    """One reference pass over up to `max_pairs` training pairs of a prepared run (`train.run.prepare`):
    embeddings (the reference's pooled hidden states, or the dataset's columns with
    `loss.embeddings: dataset`), sequence log-probs, top-k next-token log-probs along both responses."""
    import jax
    import jax.numpy as jnp

    from dpok_jax import data as data_lib
    from dpok_jax import losses
    from dpok_jax.train.loop import host_rows, to_global
    from dpok_jax.train.step import pooled_embeddings

    cfg, fns = p.cfg, p.fns
    vocab_k = int(top_k)

    @jax.jit
    def ref_pass(params, batch):
        ids = jnp.concatenate([batch["chosen_input_ids"], batch["rejected_input_ids"]])
        attn = jnp.concatenate([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
        resp = jnp.concatenate([batch["chosen_response_mask"], batch["rejected_response_mask"]])
        hidden, unembed = fns.hidden(params, ids, attn)
        tok = losses.chunked_token_logps(hidden[:, :-1], unembed, ids[:, 1:], chunk_size=cfg.loss.chunk_size)
        mask = resp[:, 1:].astype(jnp.float32)
        seq = jnp.sum(tok * mask, -1)
        if cfg.loss.logp_reduction == "mean":
            seq = seq / jnp.maximum(jnp.sum(mask, -1), 1.0)
        idx, lp = losses.topk_reference(hidden[:, :-1], unembed, k=min(vocab_k, unembed.shape[-1]),
                                        chunk_size=cfg.loss.chunk_size)
        return dict(emb=pooled_embeddings(hidden, attn, resp), seq=seq, idx=idx, lp=lp, mask=mask)

    batcher = data_lib.PreferenceBatcher(
        p.train_pairs, global_batch_size=cfg.train.batch_size, seed=cfg.train.seed,
        buckets=cfg.data.buckets, process_index=jax.process_index(), process_count=jax.process_count())
    cols: dict[str, list] = {}
    count = 0
    for batch in batcher.iterate_once():
        inputs = {k: v for k, v in batch.items() if k.startswith(("chosen_", "rejected_"))}
        out = ref_pass(p.init_params, to_global(inputs, p.batch_sharding))
        out = jax.tree.map(lambda x: np.asarray(_gather(x)), out)
        rows = host_rows({k: batch[k] for k in batch if k in ("valid", "task_id") or
                          k.startswith("embedding_")}, p.batch_sharding)
        valid = rows["valid"].astype(bool)
        b = len(valid)
        e_x, e_pos, e_neg = out["emb"]
        if cfg.loss.embeddings == "dataset":
            if "embedding_prompt" not in rows:
                raise ValueError("loss.embeddings=dataset needs embedding_prompt, embedding_chosen and "
                                 "embedding_rejected columns in the data")
            e_x, e_pos, e_neg = (rows[f"embedding_{k}"] for k in ("prompt", "chosen", "rejected"))
        got = dict(e_x=e_x, e_pos=e_pos, e_neg=e_neg, task_id=rows["task_id"],
                   ref_pos=out["seq"][:b], ref_neg=out["seq"][b:], idx_pos=out["idx"][:b],
                   idx_neg=out["idx"][b:], lp_pos=out["lp"][:b], lp_neg=out["lp"][b:],
                   mask_pos=out["mask"][:b], mask_neg=out["mask"][b:])
        for k, v in got.items():
            cols.setdefault(k, []).append(np.asarray(v)[valid])
        count += int(valid.sum())
        if count >= max_pairs:
            break
    width = max(c.shape[1] for c in cols["idx_pos"])  # batches may differ in padded length

    def cat(k):
        arrs = cols[k]
        if k.startswith(("idx_", "lp_", "mask_")):
            arrs = [np.pad(a, [(0, 0), (0, width - a.shape[1])] + [(0, 0)] * (a.ndim - 2)) for a in arrs]
        return np.concatenate(arrs)[:max_pairs]

    out = {k: cat(k) for k in cols}
    out["cost_embeddings"] = np.asarray(_gather(fns.input_embeddings(p.init_params)), np.float32)
    return out


def _gather(x):
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(x, tiled=True)
    return x


def run_selection(p, *, exclude_divergences: tuple[str, ...] = ()) -> SelectionReport:
    """SPEC §9 on a prepared run: its reference model and training pairs, `cfg.selection` thresholds."""
    th = p.cfg.selection
    c = collect(p, max_pairs=th.max_pairs, top_k=th.top_k)
    div = {
        "overlap": support_overlap(c["idx_pos"], c["lp_pos"], c["mask_pos"], c["idx_neg"], c["lp_neg"],
                                   c["mask_neg"], nucleus=th.nucleus),
        "kurtosis": log_ratio_kurtosis(c["ref_pos"], c["ref_neg"]),
        "smoothness": smoothness(c["idx_pos"], c["lp_pos"], c["mask_pos"], c["cost_embeddings"],
                                 max_positions=th.smoothness_positions, epsilon=th.smoothness_epsilon),
    }
    return select(c["e_x"], c["e_pos"], c["e_neg"], thresholds=th, divergence_metrics=div,
                  task_ids=c["task_id"], task_names=p.task_names,
                  exclude_divergences=exclude_divergences)


def resolve_auto(p) -> Any:
    """`p.cfg` with `loss.kernel: auto` / `loss.divergence: auto` replaced by the rules' choices.

    The report goes to `RUN_DIR/selection.json` (the run folder's `config.yaml` keeps `auto`, so a
    resume is checked against what the user asked for); a resumed run reuses the recorded choice
    instead of recomputing it. Configs without `auto` are returned unchanged.
    """
    import jax

    cfg = p.cfg
    if "auto" not in (cfg.loss.kernel, cfg.loss.divergence):
        return cfg
    path = epath.Path(cfg.run_dir) / "selection.json"
    if path.exists():
        recorded = json.loads(path.read_text())
        kernel, divergence = recorded["kernel"]["choice"], (recorded.get("divergence") or {}).get("choice")
        print(f"Selection reused from {path}: kernel {kernel}, divergence {divergence}.", flush=True)
    else:
        exclude = ()
        if cfg.reference.mode == "precomputed" and cfg.loss.alpha > 0:
            exclude = ("wasserstein",)  # needs a live reference (config.validate says why)
        report = run_selection(p, exclude_divergences=exclude)
        kernel, divergence = report.kernel["choice"], report.divergence["choice"]
        if jax.process_index() == 0:
            report.save(path)
            print(report.table(), flush=True)
            print(f"Selection report written to {path}", flush=True)
    changes = {}
    if cfg.loss.kernel == "auto":
        changes["kernel"] = kernel
    if cfg.loss.divergence == "auto":
        changes["divergence"] = divergence
    print(f"auto -> {changes}", flush=True)
    return dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, **changes))

