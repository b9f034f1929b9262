"""Our plain-DPO train step against TRL's DPOTrainer on the same model, weights, pairs and loss.

The same Llama (random init here, the identical weights copied into `transformers`'
LlamaForCausalLM through `dpok_jax.models.hf.save_llama`), the same pairs and token ids (the
repo's ByteTokenizer; TRL gets our ids through its own `DataCollatorForPreference`), sigmoid DPO,
beta = 0.1, a live reference model on both sides (TRL: `ref_model`; ours: `reference.mode=live`),
no kernel or divergence term. The two trainers first take one step each on the same batch from the
same weights and must agree: loss (|diff| < 1e-4; it is log 2 at the first step whatever the model),
the policy's mean chosen / rejected sequence log-probs (the forward) and the gradient norm (the
backward), so what is timed is the same computation.
Then rounds alternate one TRL step and one of ours (who goes first alternates too), round r on
batch r of the same batch sequence for both, and it prints per-trainer median step time, useful
(non-padding) tokens per second and the per-round ratio ours/TRL with its quartiles.

What a step is, on each side (host work of a step counted on both):
- TRL 1.16 (PyTorch, CPU, `torch.set_num_threads(--threads)`): `DataCollatorForPreference` on
  the pairs' ids, then what `transformers.Trainer`'s inner loop does per optimizer step:
  `trainer.training_step` (DPOTrainer.compute_loss, forward + backward, reference forward),
  gradient clipping (max_grad_norm 1.0), `optimizer.step()`, `lr_scheduler.step()`, `zero_grad`.
- ours: the batch's packing (`data.packing`, the default: prefix-shared packed rows; `--padded` for
  padded rows) and its transfer to the device,
  then the jitted, donated train step as `dpok train` runs it (`run.compile_train_step`), host
  BLAS limited to one thread as in `dpok train` (`run.host_blas_single_threaded`; torch's own
  thread pool is not affected by it, which the script checks).

Useful tokens: the real prompt + response tokens of the chosen and the rejected sequence of every
pair (the prompt counted once per sequence, as both trainers compute it). FLOPs: XLA's cost
analysis of our compiled step (it counts the body of the layer scan once: a lower bound) and, for
both sides, an estimate, 8 * params * computed (padded) tokens (6NT for the policy's forward and
backward, 2NT for the reference forward, attention left out); over the step's wall time, against a
float32 matmul peak measured here (the best of JAX and torch).

    python bench/vs_trl.py                                  # all four cases (small shape: 20 rounds)
    python bench/vs_trl.py --dataset synthetic --shape small --rounds 30
    python bench/vs_trl.py --padded                         # ours with data.packing=false
    python bench/vs_trl.py --dataset hh --shape smollm2 --rounds 3

Needs the `bench` extra (`pip install -e ".[bench]"`: trl, torch, accelerate). HH-RLHF pairs are
read from ../shared/data/hh-rlhf/harmless-base-test.jsonl.gz (or `--hh-path`); the case is skipped
with a message when the file is absent.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
HH_DEFAULT = REPO.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
LOSS_TOL = 1e-4

# name -> (ModelConfig constructor, overrides); "small" is the issue's 3.1M-parameter Llama.
SHAPES = {
    "small": ("tiny", dict(vocab_size=512, hidden_size=256, intermediate_size=688, num_layers=4,
                           num_heads=8, num_kv_heads=4, head_dim=32)),
    "smollm2": ("smollm2_135m", dict()),  # hidden 576, 30 layers, 9/3 heads, vocab 49152
}
# name -> (config overrides, pairs per batch) per shape
DATASETS = {
    "synthetic": ["data.source=synthetic", "data.max_prompt_length=64", "data.max_length=128",
                  "data.synthetic_train_per_task=64", "data.synthetic_eval_per_task=8"],
    "hh": ["data.max_prompt_length=256", "data.max_length=512", "data.max_eval_examples=8"],
}
BATCH = {("synthetic", "small"): 8, ("synthetic", "smollm2"): 8, ("hh", "small"): 8, ("hh", "smollm2"): 4}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=["synthetic", "hh", "all"], default="all")
    parser.add_argument("--shape", choices=["small", "smollm2", "all"], default="all")
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds, small shape")
    parser.add_argument("--smollm2-rounds", type=int, default=3, help="timed rounds, SmolLM2 shape")
    parser.add_argument("--batch-size", type=int, default=None, help="pairs per batch (default: 8; "
                        "4 for HH at the SmolLM2 shape)")
    parser.add_argument("--padded", action="store_true",
                        help="ours with data.packing=false (padded rows; packed rows are the default)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (XLA uses every core)")
    parser.add_argument("--hh-path", default=str(HH_DEFAULT))
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("overrides", nargs="*", help="extra dotted config overrides for our side")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    _quiet()
    from dpok_jax.train import run as run_lib

    peak = measure_peak()
    rows = []
    with run_lib.host_blas_single_threaded():  # as `dpok train` runs its steps
        if torch.get_num_threads() != args.threads:
            raise RuntimeError("the host BLAS limit changed torch's thread count")
        for dataset in (["synthetic", "hh"] if args.dataset == "all" else [args.dataset]):
            if dataset == "hh" and not Path(args.hh_path).is_file():
                print(f"\n== hh: SKIPPED, {args.hh_path} is absent (the HH-RLHF pairs live in "
                      "../shared/data; pass --hh-path)", flush=True)
                continue
            for shape in (["small", "smollm2"] if args.shape == "all" else [args.shape]):
                rounds = args.rounds if shape == "small" else args.smollm2_rounds
                rows.append(bench_case(dataset, shape, rounds, args, peak))
    print("\nSummary (ours / TRL useful tokens per second; per-round ratio median and quartiles)")
    print(f"{'dataset':<10} {'shape':<8} {'pairs':>5} {'rounds':>6} {'ratio':>6} {'q1':>6} {'q3':>6} "
          f"{'TRL s':>7} {'ours s':>7} {'loss diff':>9} {'logp rel':>9} {'gnorm rel':>9}  packing  load")
    for r in rows:
        print(f"{r['dataset']:<10} {r['shape']:<8} {r['pairs']:>5} {r['rounds']:>6} {r['q2']:>6.2f} "
              f"{r['q1']:>6.2f} {r['q3']:>6.2f} {r['trl_med']:>7.3f} {r['ours_med']:>7.3f} "
              f"{r['loss_diff']:>9.1e} {r['logp_diff']:>9.1e} {r['grad_diff']:>9.1e}  {r['packing']:<7}  "
              f"{r['load']:.1f}")


def _quiet() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    for name in ("transformers", "trl", "accelerate", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()


# ----------------------------------------------------------------------------------------------
# The machine's float32 matmul peak

def measure_peak(n: int = 2048, reps: int = 5) -> dict:
    """Best float32 matmul FLOP/s of JAX (XLA:CPU) and torch on an n x n product."""
    import jax
    import jax.numpy as jnp
    import torch

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    t_jax = min(_timed(lambda: f(a).block_until_ready()) for _ in range(reps))
    x = torch.randn(n, n)
    torch.mm(x, x)
    t_torch = min(_timed(lambda: torch.mm(x, x)) for _ in range(reps))
    flops = 2 * n ** 3
    peak = {"jax": flops / t_jax, "torch": flops / t_torch}
    peak["best"] = max(peak.values())
    print(f"float32 matmul peak ({n}x{n}, best of {reps}): JAX {peak['jax'] / 1e9:.1f} GFLOP/s, "
          f"torch ({torch.get_num_threads()} threads) {peak['torch'] / 1e9:.1f} GFLOP/s", flush=True)
    return peak


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------
# One (dataset, shape) case

def bench_case(dataset: str, shape: str, rounds: int, args, peak: dict) -> dict:
    import jax

    from dpok_jax import data as data_lib
    from dpok_jax.config import load_config
    from dpok_jax.models import ModelConfig

    pairs_per_batch = args.batch_size or BATCH[(dataset, shape)]
    base = ["run_dir=/tmp/dpok_bench_vs_trl", "train.progress=false", "reference.mode=live",
            "loss.beta=0.1", "loss.link=sigmoid", "loss.gamma=0.0", "loss.kernel=none", "loss.alpha=0.0",
            "loss.divergence=none", "loss.logp_reduction=sum", "optim.grad_accum=1",
            f"train.batch_size={pairs_per_batch}", *DATASETS[dataset]]
    if dataset == "hh":
        base.append(f"data.source={args.hh_path}")
    if args.padded:
        base.append("data.packing=false")
    cfg = load_config(None, base + list(args.overrides))
    packing = bool(getattr(cfg.data, "packing", False))
    print(f"\n== {dataset} pairs, {shape} shape: {pairs_per_batch} pairs per batch, max length "
          f"{cfg.data.max_length}, {rounds} rounds, ours packing={'on' if packing else 'off'}", flush=True)

    # Data: our tokenization, one batch sequence for both trainers.
    tokenizer = data_lib.load_tokenizer(cfg.data.tokenizer)
    train_pairs, _ = data_lib.load_pairs(cfg.data, tokenizer, run_dir=cfg.run_dir,
                                         min_train_pairs=pairs_per_batch)
    n_batches = rounds + 1  # batch 0: the loss check and warm-up
    batcher = data_lib.PreferenceBatcher(
        train_pairs, global_batch_size=pairs_per_batch, seed=cfg.train.seed, buckets=cfg.data.buckets,
        packing=packing, pack_share_prompt=cfg.data.pack_share_prompt,
        pack_rows=cfg.data.pack_rows)
    batches = [next(batcher) for _ in range(n_batches)]
    examples = [_examples(train_pairs, b) for b in batches]
    useful = [sum(2 * len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in ex)
              for ex in examples]

    # Model: our random init; the same weights into transformers.
    ctor, over = SHAPES[shape]
    mcfg = getattr(ModelConfig, ctor)(dtype="float32", param_dtype="float32", **over)
    if mcfg.vocab_size < len(tokenizer):
        raise ValueError(f"vocab {mcfg.vocab_size} < tokenizer {len(tokenizer)}")
    ours = Ours(cfg, tokenizer, train_pairs, mcfg, args.learning_rate)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(ours.prepared.init_params))
    print(f"model: {n_params / 1e6:.2f}M parameters (hidden {mcfg.hidden_size}, {mcfg.num_layers} layers, "
          f"{mcfg.num_heads}/{mcfg.num_kv_heads} heads, vocab {mcfg.vocab_size}, "
          f"intermediate {mcfg.intermediate_size})", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        from dpok_jax.models.hf import save_llama

        save_llama(ours.model, folder)  # our initial weights, in transformers' layout
        trl = Trl(folder, tokenizer, cfg, args, examples[0])

    # The same computation: the first step from the same weights on the same batch. Its loss is
    # log 2 on both sides whatever the model (policy = reference), so the policy's sequence log-probs
    # (the forward) and the gradient norm (the backward) are compared as well.
    t_trl0, first_trl = trl.step(examples[0], check=True)
    t_ours0, first_ours = ours.step(batches[0], check=True)
    diffs = {k: abs(first_trl[k] - first_ours[k]) / (1.0 if k == "loss" else max(1.0, abs(first_trl[k])))
             for k in ("loss", "logps/chosen", "logps/rejected", "grad_norm")}
    tols = {"loss": LOSS_TOL, "logps/chosen": 1e-5, "logps/rejected": 1e-5, "grad_norm": 1e-3}
    ok = all(diffs[k] < tols[k] for k in diffs)
    diff = diffs["loss"]
    for k in diffs:
        print(f"first step {k:<15} TRL {first_trl[k]:14.7f}  ours {first_ours[k]:14.7f}  "
              f"{'|diff|' if k == 'loss' else 'rel diff'} {diffs[k]:.1e} (tolerance {tols[k]:g})")
    print(f"first-step check: {'the two trainers agree' if ok else 'DISAGREE'}; first steps (TRL "
          f"warm-up, our compile) {t_trl0:.2f} s / {t_ours0:.2f} s; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    if not ok:
        raise SystemExit("the two trainers do not compute the same thing; not timing them")

    # Compile every distinct batch shape of ours before timing (buckets / packed row counts).
    seen = {ours.signature(batches[0])}
    for b in batches[1:]:
        if ours.signature(b) not in seen:
            seen.add(ours.signature(b))
            ours.step(b)
    trl.step(examples[1])  # a second TRL warm-up step (allocator, optimizer state exists now)

    t_trl, t_ours = [], []
    for r in range(1, n_batches):
        order = ((trl, examples[r], t_trl), (ours, batches[r], t_ours))
        for who, batch, out in (order if r % 2 else order[::-1]):
            out.append(who.step(batch)[0])

    trl_padded = [2 * len(ex) * max(max(len(e["prompt_ids"]) + len(e["chosen_ids"]),
                                        len(e["prompt_ids"]) + len(e["rejected_ids"])) for e in ex)
                  for ex in examples]
    ours_padded = [ours.padded_tokens(b) for b in batches]
    u = useful[1:]
    ratios = sorted(a / b for a, b in zip(t_trl, t_ours))  # same useful tokens: ratio of tokens/s
    q1, q2, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
    med_t, med_o = statistics.median(t_trl), statistics.median(t_ours)
    print(f"useful tokens per batch: median {statistics.median(u):.0f} "
          f"(min {min(u)}, max {max(u)}); computed on (padded): TRL {statistics.median(trl_padded[1:]):.0f}, "
          f"ours {statistics.median(ours_padded[1:]):.0f} (useful share TRL "
          f"{sum(u) / sum(trl_padded[1:]):.0%}, ours {sum(u) / sum(ours_padded[1:]):.0%})")
    tps_t = [n / t for n, t in zip(u, t_trl)]
    tps_o = [n / t for n, t in zip(u, t_ours)]
    print(f"  TRL  median step {med_t * 1e3:9.1f} ms   useful tokens/s median {statistics.median(tps_t):9.1f}")
    print(f"  ours median step {med_o * 1e3:9.1f} ms   useful tokens/s median {statistics.median(tps_o):9.1f}")
    print(f"ratio ours / TRL useful tokens/s: median {q2:.3f} (quartiles {q1:.3f}-{q3:.3f}), "
          f"ratio of medians {med_t / med_o:.3f}, of fastest steps {min(t_trl) / min(t_ours):.3f}")

    # Roofline: FLOPs over wall time against the measured matmul peak (medians over rounds).
    flops_ours = [ours.flops(b) for b in batches[1:]]
    est = lambda tokens: 8 * n_params * tokens  # noqa: E731
    fr_o = statistics.median(f / t for f, t in zip(flops_ours, t_ours))
    fr_t = statistics.median(est(p) / t for p, t in zip(trl_padded[1:], t_trl))
    fr_oe = statistics.median(est(p) / t for p, t in zip(ours_padded[1:], t_ours))
    # XLA's cost analysis counts the body of the layer scan (a while loop) once, so its count is
    # about the embedding/unembedding plus one layer: a lower bound; the 8NT estimate counts all.
    print(f"FLOPs per step (median): ours {statistics.median(flops_ours) / 1e9:.1f} G (XLA cost analysis, "
          "layer scan counted once), "
          f"{statistics.median(est(p) for p in ours_padded[1:]) / 1e9:.1f} G (8NT estimate); TRL "
          f"{statistics.median(est(p) for p in trl_padded[1:]) / 1e9:.1f} G (8NT estimate)")
    print(f"roofline (FLOP/s / {peak['best'] / 1e9:.1f} GFLOP/s matmul peak): ours {fr_o / 1e9:.1f} GFLOP/s "
          f"= {fr_o / peak['best']:.0%} (XLA FLOPs), {fr_oe / peak['best']:.0%} (8NT estimate); "
          f"TRL {fr_t / 1e9:.1f} GFLOP/s = {fr_t / peak['best']:.0%} (8NT estimate)", flush=True)
    return dict(dataset=dataset, shape=shape, pairs=pairs_per_batch, rounds=len(ratios), q1=q1, q2=q2,
                q3=q3, trl_med=med_t, ours_med=med_o, loss_diff=diff,
                logp_diff=max(diffs["logps/chosen"], diffs["logps/rejected"]), grad_diff=diffs["grad_norm"],
                packing="on" if packing else "off", load=os.getloadavg()[0])


def _examples(pairs, batch: dict) -> list[dict]:
    """The batch's pairs as TRL's prepared rows: ``prompt_ids / chosen_ids / rejected_ids`` lists."""
    rows = [int(np.nonzero(pairs.example_index == i)[0][0]) for i in batch["example_index"]]
    return [{"prompt_ids": pairs.prompt_ids[r].tolist(), "chosen_ids": pairs.chosen_ids[r].tolist(),
             "rejected_ids": pairs.rejected_ids[r].tolist()} for r in rows]


# ----------------------------------------------------------------------------------------------
# Our side: the step `dpok train` runs

class Ours:
    def __init__(self, cfg, tokenizer, train_pairs, mcfg, learning_rate: float):
        import jax
        from flax import nnx

        from dpok_jax import sharding
        from dpok_jax.models import init_llama
        from dpok_jax.train import run as run_lib
        from dpok_jax.train.state import make_optimizer
        from dpok_jax.train.step import ModelFns

        mesh = sharding.make_mesh(data=cfg.mesh.data, fsdp=cfg.mesh.fsdp, tensor=cfg.mesh.tensor)
        model = init_llama(mcfg, seed=cfg.train.seed, mesh=mesh)
        self.model = model
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        shardings = sharding.param_shardings(mesh, params)
        params = jax.device_put(params, shardings)
        self.prepared = run_lib.Prepared(
            cfg=cfg, mesh=mesh, tokenizer=tokenizer, train_pairs=train_pairs, eval_pairs=None,
            task_names=list(train_pairs.task_names), fns=ModelFns(graphdef, rest), init_params=params,
            param_shardings=shardings, batch_sharding=sharding.batch_sharding(mesh))
        tx = make_optimizer(learning_rate=learning_rate, kernel_learning_rate=1e-2, warmup_steps=0,
                            total_steps=10_000, weight_decay=0.0, b1=0.9, b2=0.95, clip_norm=1.0)
        spec = run_lib.step_spec(cfg)
        if spec.uses_kernel or spec.uses_divergence or spec.reference != "live":
            raise ValueError("vs_trl compares plain DPO with a live reference")
        self.state, self.train_step = run_lib.compile_train_step(self.prepared, spec, None, tx)
        self._flops: dict = {}

    def _device_batch(self, batch: dict) -> dict:
        from dpok_jax.host_device import to_global

        if "_pack" in batch:
            from dpok_jax.data.packing import apply_packing

            batch = apply_packing(batch)
        return to_global(batch, self.prepared.batch_sharding)

    def step(self, batch: dict, check: bool = False) -> tuple[float, dict]:
        import jax

        t0 = time.perf_counter()
        self.state, m = self.train_step(self.state, self.prepared.init_params, self._device_batch(batch))
        jax.block_until_ready(m["loss"])
        seconds = time.perf_counter() - t0
        keys = ("loss", "logps/chosen", "logps/rejected", "grad_norm") if check else ()
        return seconds, {k: float(m[k]) for k in keys}

    def _packed(self, batch: dict) -> dict:
        if "_pack" not in batch:
            return batch
        from dpok_jax.data.packing import apply_packing

        return apply_packing(batch)

    def signature(self, batch: dict) -> tuple:
        return tuple(sorted((k, np.shape(v)) for k, v in self._packed(batch).items()))

    def padded_tokens(self, batch: dict) -> int:
        """Token positions the step computes on: [R, P] packed, [2b, L] padded."""
        b = self._packed(batch)
        if "packed_input_ids" in b:
            return int(np.prod(b["packed_input_ids"].shape))
        return 2 * int(np.prod(b["chosen_input_ids"].shape))

    def flops(self, batch: dict) -> float:
        """XLA's cost analysis of the compiled step for this batch's shapes."""
        key = self.signature(batch)
        if key not in self._flops:
            compiled = self.train_step.lower(self.state, self.prepared.init_params,
                                             self._device_batch(batch)).compile()
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, (list, tuple)) else cost
            self._flops[key] = float(cost.get("flops", float("nan")))
        return self._flops[key]


# ----------------------------------------------------------------------------------------------
# TRL's side: DPOTrainer's own step on the same ids

class Trl:
    def __init__(self, folder: str, tokenizer, cfg, args, examples: list[dict]):
        import datasets
        import torch
        from transformers import LlamaForCausalLM
        from trl import DPOConfig, DPOTrainer

        model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
        ref_model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
        hf_tok = _hf_byte_tokenizer(tokenizer)
        # DPOTrainer 1.16 tokenizes text datasets itself (it does not take ids); the constructor gets
        # a few pairs spelled in the byte tokenizer's token names, and the timed steps get our ids
        # through TRL's own collator, which is what its dataloader feeds `training_step`.
        text = datasets.Dataset.from_list([
            {k: " ".join(hf_tok.convert_ids_to_tokens(e[f"{k}_ids"])) + (" " if k == "prompt" else "")
             for k in ("prompt", "chosen", "rejected")} for e in examples])
        targs = DPOConfig(
            output_dir=tempfile.mkdtemp(prefix="vs_trl_"), per_device_train_batch_size=len(examples),
            gradient_accumulation_steps=1, learning_rate=args.learning_rate, lr_scheduler_type="constant",
            warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0,
            beta=cfg.loss.beta, loss_type=["sigmoid"], max_length=None, precompute_ref_log_probs=False,
            use_cpu=True, report_to=[], logging_steps=10 ** 9, save_strategy="no", bf16=False, fp16=False,
            dataloader_num_workers=0, seed=cfg.train.seed, disable_tqdm=True)
        self.trainer = DPOTrainer(model=model, ref_model=ref_model, args=targs, train_dataset=text,
                                  processing_class=hf_tok)
        tr = self.trainer
        tr.create_optimizer_and_scheduler(num_training_steps=10_000)
        tr.current_gradient_accumulation_steps = 1  # what Trainer's inner loop sets before a step
        self.model = tr.model
        self.model.train()
        self.collate = tr.data_collator
        # TRL's own tokenization of the spelled-out pairs gives our ids (plus an EOS that it appends
        # to a response our max_length cut).
        for mine, theirs in zip(examples, tr.train_dataset):
            for k in ("prompt_ids", "chosen_ids", "rejected_ids"):
                if theirs[k][:len(mine[k])] != mine[k]:
                    raise RuntimeError(f"TRL tokenized {k} differently from ours")

    def step(self, examples: list[dict], check: bool = False) -> tuple[float, dict]:
        """One optimizer step as `transformers.Trainer`'s inner loop takes it; (seconds, metrics)."""
        tr = self.trainer
        t0 = time.perf_counter()
        inputs = self.collate(examples)
        loss = tr.training_step(self.model, inputs)
        grad_norm = tr.accelerator.clip_grad_norm_(self.model.parameters(), tr.args.max_grad_norm)
        tr.optimizer.step()
        tr.lr_scheduler.step()
        self.model.zero_grad()
        loss = float(loss)
        seconds = time.perf_counter() - t0
        if not check:
            return seconds, {}
        logged = tr._metrics["train"]
        return seconds, {"loss": loss, "logps/chosen": logged["logps/chosen"][-1],
                         "logps/rejected": logged["logps/rejected"][-1], "grad_norm": float(grad_norm)}


def _hf_byte_tokenizer(tokenizer):
    """A `transformers` tokenizer with the ByteTokenizer's ids (one token name per id, split on
    spaces): what DPOTrainer needs for its pad/EOS ids and its own tokenization of text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = {tokenizer.pad_token_id: tokenizer.pad_token, tokenizer.bos_token_id: tokenizer.bos_token,
               tokenizer.eos_token_id: tokenizer.eos_token}
    vocab = {special.get(i, f"<0x{i:02X}>"): i for i in range(len(tokenizer))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token=tokenizer.pad_token))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token=tokenizer.pad_token,
                                   bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token,
                                   unk_token=tokenizer.pad_token)


if __name__ == "__main__":
    main()
