"""The pure train and eval steps of DPO-Kernels (SPEC §8), and the SFT warm-up step.

Everything here is a function of arrays plus a frozen, hashable `StepSpec` of hyperparameters that
is closed over (never the config object). The model enters through its NNX graphdef: parameters are
merged into it inside the traced function (`nnx.merge`), so the jitted functions are pure.

The fitted kernel parameters (`losses.fit_kernel_params`) are split by `split_kernel_params`: their
arrays (σ, Σ's Cholesky factor, the spectral frequencies...) are the steps' last argument
(`kernel_arrays`), so two runs that differ only in fitted values (another seed) compile one program
and share JAX's compilation cache; only their Python numbers (the polynomial degree, c, ρ) are
compile-time constants.

Batch layout (from `dpok_jax.data.PreferenceBatcher`): `{chosen,rejected}_{input_ids,attention_mask,
response_mask}` [b, L] int32, `task_id` [b], `valid` [b]; in precomputed-reference mode also
`ref_chosen_logps`, `ref_rejected_logps` [b], `ref_embedding_{prompt,chosen,rejected}` [b, H] and,
for divergences, `ref_topk_indices` / `ref_topk_logps` [b, 2, L-1, k]; with dataset embeddings,
`embedding_{prompt,chosen,rejected}` [b, d].
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dpok_jax import losses
from dpok_jax.data.packing import predicts_next
from dpok_jax.train.state import TrainState


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Static hyperparameters of the step (hashable; changing one retraces, by design)."""

    beta: float = 0.1
    link: str = "sigmoid"
    label_smoothing: float = 0.0
    reward: str = "reverse_kl"
    reward_params: tuple = ()
    logp_reduction: str = "sum"
    gamma: float = 0.0
    kernel: str = "none"
    embeddings: str = "policy"
    eta: float = 0.0
    alpha: float = 0.0
    divergence: str = "none"
    divergence_params: tuple = ()
    sft_weight: float = 0.0
    chunk_size: int = 64
    reference: str = "live"  # live | precomputed
    grad_accum: int = 1

    @property
    def uses_kernel(self) -> bool:
        return self.gamma > 0 and self.kernel != "none"

    @property
    def uses_divergence(self) -> bool:
        return self.alpha > 0 and self.divergence != "none"


def _pair_arrays(batch: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Chosen and rejected stacked into one [2b, L] forward pass."""
    ids = jnp.concatenate([batch["chosen_input_ids"], batch["rejected_input_ids"]], axis=0)
    attn = jnp.concatenate([batch["chosen_attention_mask"], batch["rejected_attention_mask"]], 0)
    resp = jnp.concatenate([batch["chosen_response_mask"], batch["rejected_response_mask"]], 0)
    return ids, attn, resp


def mean_pool(hidden: jax.Array, mask: jax.Array) -> jax.Array:
    """Masked mean over positions, in float32: [N, L, H], [N, L] -> [N, H]."""
    m = mask.astype(jnp.float32)[..., None]
    total = jnp.sum(hidden.astype(jnp.float32) * m, axis=1)
    return total / jnp.maximum(jnp.sum(m, axis=1), 1.0)


def pooled_embeddings(hidden: jax.Array, attn: jax.Array, resp: jax.Array) -> tuple:
    """SPEC §3 `e_x, e_{y+}, e_{y-}` from hidden states of the stacked [2b, L] pair batch."""
    b = hidden.shape[0] // 2
    prompt_mask = attn * (1 - resp)
    e_x = mean_pool(hidden[:b], prompt_mask[:b])
    e_y = mean_pool(hidden, resp)
    return e_x, e_y[:b], e_y[b:]


def response_embeddings(fns: "ModelFns", params, batch: dict) -> tuple[jax.Array, jax.Array]:
    """Pooled hidden states of the chosen and rejected responses, [b, H] each (padded pair batch)."""
    ids, attn, resp = _pair_arrays(batch)
    hidden, _ = fns.hidden(params, ids, attn)
    return pooled_embeddings(hidden, attn, resp)[1:]


class PairLayout:
    """The model's input rows for a batch of `b` pairs and how per-token values become per-sequence
    ones, for both layouts: padded (chosen rows then rejected rows, [2b, L]) and packed
    (`dpok_jax.data.packing`, [R, P], sequences found through ``packed_sequence``). Sequence results
    always come out as [2b]: chosen sequences, then rejected ones."""

    def __init__(self, batch: dict):
        self.pairs = batch["task_id"].shape[0]
        self.packed = "packed_input_ids" in batch
        if self.packed:
            self.ids = batch["packed_input_ids"]
            self.segments = batch["packed_segment_ids"]
            self.attn = (self.segments > 0).astype(jnp.int32)
            self.resp = batch["packed_response_mask"]
            self.positions = batch["packed_positions"]
            self.sequence = batch["packed_sequence"]
            self.branch = batch.get("packed_branch")  # prefix-shared pairs (`share_prompt`)
            # A prediction counts only inside its segment (never the next segment's first token)
            # and, with a shared prompt, only where token t + 1 attends token t.
            same = predicts_next(self.segments, self.branch)
            self.label_mask = self.resp[:, 1:] * same.astype(self.resp.dtype)
        else:
            self.ids, self.attn, self.resp = _pair_arrays(batch)
            self.positions = self.segments = self.branch = None
            self.label_mask = self.resp[:, 1:]
        self.labels = self.ids[:, 1:]

    def hidden(self, fns: "ModelFns", params) -> tuple[jax.Array, jax.Array]:
        return fns.hidden(params, self.ids, self.attn, positions=self.positions,
                          segment_ids=self.segments, branch_ids=self.branch)

    def sequence_tokens(self) -> jax.Array:
        """Tokens of the batch's sequences (a shared prompt counted in both), whatever the layout."""
        if self.branch is None:
            return jnp.sum(self.attn)
        return jnp.sum(self.attn) + jnp.sum(self.attn * (self.branch == 0))

    def sequence_sum(self, values: jax.Array) -> jax.Array:
        """Per-label-position values [rows, L-1] (already masked) -> per-sequence sums [2b]."""
        if not self.packed:
            return jnp.sum(values, axis=-1)
        return jax.ops.segment_sum(values.reshape(-1), self.sequence[:, 1:].reshape(-1),
                                   num_segments=2 * self.pairs)

    def sequence_logps(self, token_logps: jax.Array, reduction: str) -> jax.Array:
        m = self.label_mask.astype(jnp.float32)
        total = self.sequence_sum(token_logps * m)
        if reduction == "mean":
            return total / jnp.maximum(self.sequence_sum(m), 1.0)
        return total

    def _pool(self, hidden: jax.Array, mask: jax.Array) -> jax.Array:
        """Masked mean of every sequence's hidden states [2b, H] (float32)."""
        if not self.packed:
            return mean_pool(hidden, mask)
        m = mask.astype(jnp.float32)
        seq = self.sequence.reshape(-1)
        total = jax.ops.segment_sum((hidden.astype(jnp.float32) * m[..., None]).reshape(-1, hidden.shape[-1]),
                                    seq, num_segments=2 * self.pairs)
        count = jax.ops.segment_sum(m.reshape(-1), seq, num_segments=2 * self.pairs)
        return total / jnp.maximum(count, 1.0)[:, None]

    def pooled_embeddings(self, hidden: jax.Array) -> tuple:
        """SPEC §3 `e_x, e_{y+}, e_{y-}`: the chosen sequences' prompt tokens, and each response."""
        b = self.pairs
        e_x = self._pool(hidden, self.attn * (1 - self.resp))[:b]
        e_y = self._pool(hidden, self.resp)
        return e_x, e_y[:b], e_y[b:]


_DIVERGENCE_BLOCK = 128  # response positions per block of the masked Wasserstein computation


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of `values` over positions where `mask` is set (0 for an empty mask), float32."""
    m = mask.astype(jnp.float32)
    return jnp.sum(jnp.where(m > 0, values.astype(jnp.float32), 0.0) * m) / jnp.maximum(jnp.sum(m), 1.0)


class ModelFns:
    """The model as pure functions of its parameters (graphdef and non-parameter state closed over)."""

    def __init__(self, graphdef: Any, rest: Any):
        self.graphdef = graphdef
        self.rest = rest

    def hidden(self, params: Any, ids: jax.Array, attn: jax.Array, *, positions=None,
               segment_ids=None, branch_ids=None) -> tuple[jax.Array, jax.Array]:
        """Final hidden states [N, L, H] and the unembedding [H, V]."""
        model = nnx.merge(self.graphdef, params, self.rest)
        return (model(ids, attn, positions=positions, segment_ids=segment_ids, branch_ids=branch_ids,
                      return_hidden=True), model.unembedding())

    def input_embeddings(self, params: Any) -> jax.Array:
        """Token embedding rows [V, H] (the Wasserstein ground cost's coordinates)."""
        return nnx.merge(self.graphdef, params, self.rest).input_embeddings()


def _forward_pairs(fns: ModelFns, spec: StepSpec, trainable, ref_params, batch):
    """Shared by train and eval: per-sequence log-probs, embeddings and divergences."""
    lay = PairLayout(batch)
    labels, mask = lay.labels, lay.label_mask
    hidden, unembed = lay.hidden(fns, trainable["policy"])
    div_kwargs = dict(spec.divergence_params)
    divergence = spec.divergence if spec.uses_divergence else None
    if divergence == "wasserstein":
        # SPEC §6: cosine cost between the tokens' input-embedding rows, held fixed (stop-gradient).
        div_kwargs["cost_embeddings"] = jax.lax.stop_gradient(
            fns.input_embeddings(trainable["policy"]).astype(jnp.float32))
    ref_hidden = None
    extra_metrics = {}
    if spec.reference == "live":
        ref_hidden, ref_unembed = jax.lax.stop_gradient(lay.hidden(fns, ref_params))
        # The Wasserstein penalty solves one OT problem per position: only the response positions
        # (where it is averaged) are solved, compacted into blocks. Cheap divergences stay fused
        # into the chunked head.
        fused = None if divergence == "wasserstein" else divergence
        pol_tok, ref_tok, div = losses.chunked_logps_and_divergence(
            hidden[:, :-1], unembed, labels, ref_hidden=ref_hidden[:, :-1], ref_unembed=ref_unembed,
            divergence=fused, chunk_size=spec.chunk_size, mask=mask, **(div_kwargs if fused else {}),
        )
        if divergence == "wasserstein":
            div, converged = losses.masked_divergence(
                divergence, hidden[:, :-1], unembed, ref_hidden[:, :-1], ref_unembed, mask,
                block_size=_DIVERGENCE_BLOCK, return_converged=True, **div_kwargs)
            extra_metrics["divergence/sinkhorn_converged"] = _masked_mean(
                converged.astype(jnp.float32), mask)
        ref_seq = lay.sequence_logps(ref_tok, spec.logp_reduction)
    else:
        ref_topk = None
        if divergence is not None and lay.packed:
            ref_topk = (batch["packed_ref_topk_indices"], batch["packed_ref_topk_logps"])
        elif divergence is not None:
            # [b, 2, L-1, k] per pair (so the rows of a batch stay together over hosts) ->
            # [2b, L-1, k], chosen rows then rejected rows, like the model's inputs.
            ref_topk = tuple(jnp.concatenate([a[:, 0], a[:, 1]], axis=0) for a in
                             (batch["ref_topk_indices"], batch["ref_topk_logps"]))
        pol_tok, _, div = losses.chunked_logps_and_divergence(
            hidden[:, :-1], unembed, labels, ref_topk=ref_topk, divergence=divergence,
            chunk_size=spec.chunk_size, mask=mask, **div_kwargs,
        )
        ref_seq = jnp.concatenate([batch["ref_chosen_logps"], batch["ref_rejected_logps"]])
    pol_seq = lay.sequence_logps(pol_tok, spec.logp_reduction)
    if divergence in ("squared_hellinger", "hellinger"):
        # SPEC §6: the distance H = sqrt(H²) is reported, never trained on (infinite gradient at
        # p = q): the masked mean of the per-position distances.
        extra_metrics["divergence/hellinger_distance"] = _masked_mean(
            jnp.sqrt(jnp.maximum(jax.lax.stop_gradient(div), 0.0)), mask)
    b = lay.pairs
    embeddings = None
    if spec.uses_kernel:
        if spec.embeddings == "policy":
            embeddings = lay.pooled_embeddings(hidden)
        elif spec.embeddings == "reference" and ref_hidden is not None:
            embeddings = lay.pooled_embeddings(ref_hidden)
        elif spec.embeddings == "reference":
            embeddings = tuple(batch[f"ref_embedding_{k}"] for k in ("prompt", "chosen", "rejected"))
        else:
            embeddings = tuple(batch[f"embedding_{k}"] for k in ("prompt", "chosen", "rejected"))
    # Token-mean NLL of each chosen response (the SFT term).
    m = mask.astype(jnp.float32)
    nll = (-lay.sequence_sum(pol_tok * m)[:b]) / jnp.maximum(lay.sequence_sum(m)[:b], 1.0)
    return dict(
        pol_chosen=pol_seq[:b], pol_rejected=pol_seq[b:], ref_chosen=ref_seq[:b],
        ref_rejected=ref_seq[b:], embeddings=embeddings, div=div, div_mask=mask, chosen_nll=nll,
        tokens=lay.sequence_tokens(), extra_metrics=extra_metrics,
    )


def _is_array(x) -> bool:
    return isinstance(x, (np.ndarray, np.generic, jax.Array))


def split_kernel_params(kernel_params: dict | None) -> tuple[dict | None, dict | None]:
    """``(arrays, static)``: the fitted values of a ``kernel_params`` dict (NumPy/JAX arrays and
    scalars, which differ from fit to fit: the jitted steps take them as an argument) and the rest
    (Python numbers such as the polynomial ``degree``, hyperparameters that shape the program).

    Example:
      >>> split_kernel_params({"rbf": {"sigma": np.float32(0.5)}, "polynomial": {"c": 2.0, "degree": 2}})
      ({'rbf': {'sigma': np.float32(0.5)}, 'polynomial': {}}, {'rbf': {}, 'polynomial': {'c': 2.0, 'degree': 2}})
    """
    if kernel_params is None:
        return None, None
    arrays, static = {}, {}
    for name, value in kernel_params.items():
        if isinstance(value, dict):
            arrays[name], static[name] = split_kernel_params(value)
        elif _is_array(value):
            arrays[name] = value
        else:
            static[name] = value
    return arrays, static


def merge_kernel_params(arrays: dict | None, static: dict | None) -> dict | None:
    """The inverse of `split_kernel_params`."""
    if static is None:
        return None
    out = dict(static)
    for name, value in (arrays or {}).items():
        out[name] = merge_kernel_params(value, static.get(name, {})) if isinstance(value, dict) else value
    return out


def _kernel_resolver(kernel_params: dict | None) -> Callable:
    """``kernel_arrays -> kernel_params``: the fitted arrays given to a step (None: the ones of
    ``kernel_params``, compiled in as constants) joined with ``kernel_params``' static numbers."""
    default, static = split_kernel_params(kernel_params)
    return lambda arrays: merge_kernel_params(default if arrays is None else arrays, static)


def make_loss_fn(fns: ModelFns, spec: StepSpec, kernel_params: dict | None) -> Callable:
    """`loss_fn(trainable, ref_params, batch, kernel_arrays=None) -> (loss, metrics)`: the objective
    of SPEC §8. ``kernel_params`` fixes the kernel's structure and static numbers; ``kernel_arrays``
    (`split_kernel_params`) its fitted values, by default those of ``kernel_params``."""
    resolve = _kernel_resolver(kernel_params)

    def loss_fn(trainable, ref_params, batch, kernel_arrays=None):
        out = _forward_pairs(fns, spec, trainable, ref_params, batch)
        kernel_kwargs = {}
        if spec.uses_kernel:
            kernel_kwargs = dict(
                gamma=spec.gamma, kernel=spec.kernel, embeddings=out["embeddings"],
                kernel_params=resolve(kernel_arrays), eta=spec.eta,
                hmk_params=trainable["kernel"] if spec.kernel == "hmk" else None,
                mixture_params=trainable["kernel"] if spec.kernel == "mixture" else None,
            )
        div_kwargs = {}
        if spec.uses_divergence:
            div_kwargs = dict(
                divergence=out["div"], divergence_mask=out["div_mask"], alpha=spec.alpha,
                divergence_name=spec.divergence,
            )
        loss, metrics = losses.dpo_kernels_loss(
            out["pol_chosen"], out["pol_rejected"], out["ref_chosen"], out["ref_rejected"],
            beta=spec.beta, link=spec.link, label_smoothing=spec.label_smoothing,
            reward=spec.reward, reward_params=dict(spec.reward_params) or None,
            sft_weight=spec.sft_weight,
            chosen_nll=out["chosen_nll"] if spec.sft_weight > 0 else None,
            **kernel_kwargs, **div_kwargs,
        )
        metrics = dict(metrics, **jax.lax.stop_gradient(out["extra_metrics"]))
        metrics["tokens"] = out["tokens"].astype(jnp.float32)
        return loss, metrics

    return loss_fn


def _accumulated_grads(loss_fn: Callable, params, ref_params, batch, accum: int, kernel_arrays=None):
    """Mean loss, metrics and gradients over `accum` micro-batches (lax.scan, one compiled body)."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accum == 1:
        (loss, metrics), grads = grad_fn(params, ref_params, batch, kernel_arrays)
        return loss, metrics, grads

    def split(x):
        # Strided micro-batches keep each one spread over the batch-sharded devices.
        return jnp.swapaxes(x.reshape((x.shape[0] // accum, accum) + x.shape[1:]), 0, 1)

    micro = jax.tree.map(split, batch)

    def body(carry, mb):
        (loss, metrics), grads = grad_fn(params, ref_params, mb, kernel_arrays)
        acc = jax.tree.map(jnp.add, carry, (loss, metrics, grads))
        return acc, None

    shapes = jax.eval_shape(grad_fn, params, ref_params, jax.tree.map(lambda x: x[0], micro),
                            kernel_arrays)
    zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (shapes[0][0], shapes[0][1], shapes[1]))
    (loss, metrics, grads), _ = jax.lax.scan(body, zero, micro)
    scale = 1.0 / accum
    return jax.tree.map(lambda x: x * scale, (loss, metrics, grads))


def make_train_step(fns: ModelFns, spec: StepSpec, kernel_params: dict | None, tx) -> Callable:
    """`train_step(state, ref_params, batch, kernel_arrays=None) -> (state, metrics)`; jit it with
    shardings (`state.jit_train_step`, which passes the fitted ``kernel_arrays`` as an argument)."""
    loss_fn = make_loss_fn(fns, spec, kernel_params)

    def train_step(state: TrainState, ref_params, batch, kernel_arrays=None):
        loss, metrics, grads = _accumulated_grads(loss_fn, state.params, ref_params, batch,
                                                  spec.grad_accum, kernel_arrays)
        finite = jnp.isfinite(loss)
        # A non-finite loss with finite gradients must still be skipped: poison the gradients so
        # optax.apply_if_finite drops the update and counts it.
        grads = jax.tree.map(lambda g: jnp.where(finite, g, jnp.nan), grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads),
                       skipped=1.0 - opt_state.last_finite.astype(jnp.float32))
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    return train_step


def make_eval_step(fns: ModelFns, spec: StepSpec, kernel_params: dict | None) -> Callable:
    """`eval_step(params, ref_params, batch, kernel_arrays=None) -> per-pair dict` of reward margin,
    score and margin h (``kernel_arrays`` as in `make_loss_fn`)."""
    resolve = _kernel_resolver(kernel_params)

    def eval_step(params, ref_params, batch, kernel_arrays=None):
        out = _forward_pairs(fns, spec, params, ref_params, batch)
        reward_params = dict(spec.reward_params)
        r_pos = losses.implicit_reward(spec.reward, out["pol_chosen"], out["ref_chosen"],
                                       beta=spec.beta, **reward_params)
        r_neg = losses.implicit_reward(spec.reward, out["pol_rejected"], out["ref_rejected"],
                                       beta=spec.beta, **reward_params)
        reward_margin = r_pos - r_neg
        score = jnp.zeros_like(reward_margin)
        if spec.uses_kernel:
            e_x, e_pos, e_neg = out["embeddings"]
            score = losses.embedding_score(
                spec.kernel, e_x, e_pos, e_neg, kernel_params=resolve(kernel_arrays),
                hmk_params=params["kernel"] if spec.kernel == "hmk" else None,
                mixture_params=params["kernel"] if spec.kernel == "mixture" else None,
            )
        return dict(reward_margin=reward_margin, score=score,
                    margin=reward_margin + spec.gamma * score, task_id=batch["task_id"],
                    valid=batch["valid"])

    return eval_step


def make_sft_step(fns: ModelFns, tx, chunk_size: int, *, responses: str = "chosen") -> Callable:
    """`sft_step(params, opt_state, batch) -> (params, opt_state, loss)`: token-mean NLL of the
    chosen responses (the usual SFT-then-DPO recipe), or with `responses="both"` of both responses
    (a reference that knows the format but prefers neither)."""

    def loss_fn(params, batch):
        if responses == "chosen":
            ids, attn, resp = (batch[f"chosen_{k}"] for k in
                               ("input_ids", "attention_mask", "response_mask"))
        else:
            ids, attn, resp = _pair_arrays(batch)
        hidden, unembed = fns.hidden(params, ids, attn)
        tok = losses.chunked_token_logps(hidden[:, :-1], unembed, ids[:, 1:], chunk_size=chunk_size)
        mask = resp[:, 1:].astype(jnp.float32)
        return -jnp.sum(tok * mask) / jnp.maximum(jnp.sum(mask), 1.0)

    def sft_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, loss

    return sft_step
