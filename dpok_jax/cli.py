"""`dpok`: the command line.

    dpok train [--config FILE] [key=value ...]   train (no arguments: the embedded default)
    dpok export RUN_DIR OUT                      write the trained policy as a Hugging Face checkpoint
    dpok select [--config FILE | --data PATH [--model DIR]] [key=value ...]   kernel/divergence rule
    dpok eval RUN_DIR [--data FILE] [--step N]   accuracy/F1, margins, Davies-Bouldin, weighted alpha
    dpok report RUN_DIR [--out DIR]              PNG plots + report.md (headless)
    dpok sweep [--config FILE] [--out DIR] [--seeds 0,1] [key=value ...]   kernel x divergence grid
    dpok plan [--config FILE] [--devices N --device-kind v5e|v5p|h100|a100] [key=value ...]   memory plan
    dpok generate RUN_DIR|MODEL [...] --prompt TEXT [--prompt ...] [--out FILE.md]   side by side
    dpok embed SOURCE OUT --encoder DIR          add sentence-encoder embedding_* columns to a dataset
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _train(args: argparse.Namespace) -> int:
    from dpok_jax.config import load_config

    config_path = args.config
    if config_path is None:
        # Overrides without --config apply on top of the embedded default.
        config_path = default_config_path()
        print(f"No --config: the embedded default ({config_path}).", flush=True)
    cfg = load_config(config_path, args.overrides)  # bad config fails before JAX starts
    from dpok_jax.train.loop import TrainingDiverged
    from dpok_jax.train.run import run

    try:
        summary = run(cfg, allow_changes=tuple(args.allow_change))
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if summary.get("interrupted"):
        return int(summary.get("exit_status", 130))
    return 0


def _export(args: argparse.Namespace) -> int:
    from dpok_jax.train.export import export_run

    path = export_run(args.run_dir, Path(args.out))
    print(f"Exported the policy to {path}")
    return 0


def _select(args: argparse.Namespace) -> int:
    """`dpok select`: SPEC §9 metrics, thresholds, verdicts and choices; saved as JSON."""
    from dpok_jax.config import load_config

    overrides = list(args.overrides)
    if args.data is not None:
        overrides.append(f"data.source={args.data}")
    if args.model is not None:
        overrides.append(f"model.path={args.model}")
    if args.config is None and not any(o.startswith("run_dir=") for o in overrides):
        overrides.append("run_dir=runs/select")
    cfg = load_config(args.config or default_config_path(), overrides)
    from dpok_jax import selection
    from dpok_jax.train.run import host_blas_single_threaded, prepare

    with host_blas_single_threaded():
        report = selection.run_selection(prepare(cfg))
    print(report.table())
    out = report.save(args.out or Path(cfg.run_dir) / "selection.json")
    print(f"Selection report written to {out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    """`dpok eval`: accuracy/F1 (per task), reward margins, Davies-Bouldin, weighted alpha."""
    from dpok_jax.evaluation.run_eval import evaluate_run, format_eval, save_eval

    result = evaluate_run(args.run_dir, data=args.data, step=args.step, overrides=args.overrides)
    print(format_eval(result))
    out = save_eval(result, args.out or f"{str(args.run_dir).rstrip('/')}/eval.json")
    print(f"Evaluation written to {out}")
    return 0


def _report(args: argparse.Namespace) -> int:
    """`dpok report`: PNG plots of a run and a Markdown summary linking them."""
    from dpok_jax.report import write_report

    path = write_report(args.run_dir, args.out)
    print(f"Report written to {path}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    """`dpok sweep`: the kernel x divergence grid over seeds; resumable; CSV, heatmaps, sweep.md."""
    from dpok_jax import sweep
    from dpok_jax.config import load_config

    out = Path(args.out)
    overrides = list(args.overrides)
    if args.config is None:
        from dpok_jax.data.synthetic_hard import write_hard_tasks

        data = out / "data"
        if not (data / "test.jsonl").exists():
            write_hard_tasks(data, seed=0)
        overrides = [*sweep.SWEEP_DEFAULTS, f"data.source={data}", *overrides]
    cfg = load_config(args.config or default_config_path(), overrides)
    split = (lambda s: tuple(x for x in s.split(",") if x))  # noqa: E731
    pick = (lambda given, every: every if given is None else split(given))  # noqa: E731
    cells = sweep.grid(pick(args.kernels, sweep.KERNEL_ROWS), pick(args.divergences, sweep.DIVERGENCE_COLUMNS),
                       pick(args.rewards, sweep.IMPLICIT_REWARDS))
    seeds = tuple(int(s) for s in split(args.seeds))
    path = sweep.run_sweep(cfg, out, seeds=seeds, cells=cells)
    print(f"Sweep tables and heatmaps: {path}")
    return 0


def default_config_path() -> Path:
    return Path(__file__).parent / "configs" / "default.yaml"


def _plan(args: argparse.Namespace) -> int:
    from dpok_jax.plan import run_plan

    plan = run_plan(args.config, args.overrides, devices=args.devices, device_kind=args.device_kind,
                    hbm_gib=args.hbm_gib, headroom=args.headroom, as_json=args.json)
    return 0 if plan.fits in (True, None) else 3


def _load_for_generation(name: str):
    path = Path(name).expanduser()
    if path.is_dir() and (path / "config.yaml").is_file():  # a dpok run folder
        from dpok_jax.train.export import load_run_policy

        model, tokenizer, _ = load_run_policy(path)
        return model, tokenizer
    if path.suffix == ".gguf" or (path / "config.json").is_file():
        from dpok_jax.data import load_tokenizer
        from dpok_jax.models import load_llama

        return load_llama(path), load_tokenizer(str(path))
    raise FileNotFoundError(f"{path}: not a dpok run folder (config.yaml), a Hugging Face folder "
                            "(config.json) or a .gguf file")


def _generate(args: argparse.Namespace) -> int:
    """Continuations of each --prompt from each model (a run folder, a Hugging Face folder or a
    .gguf file), printed side by side per prompt; --out also writes them as Markdown."""
    from dpok_jax.models.generate import generate

    answers = {}
    for name in args.model:
        model, tokenizer = _load_for_generation(name)
        fmt = args.format or ("chat" if getattr(tokenizer, "chat_template", None) else "raw")
        answers[name] = generate(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                                 temperature=args.temperature, top_k=args.top_k, seed=args.seed,
                                 chat=fmt == "chat")
        del model
    lines = [f"# Generations (max_new_tokens={args.max_new_tokens}, temperature={args.temperature}, "
             f"format={args.format or 'auto'})", ""]
    for i, prompt in enumerate(args.prompt):
        lines += [f"## Prompt {i + 1}", "", "```", prompt.strip("\n"), "```", ""]
        for name in args.model:
            lines += [f"**{name}**", "", "```", answers[name][i].strip("\n") or "(empty)", "```", ""]
    text = "\n".join(lines)
    print(text, flush=True)
    if args.out is not None:
        Path(args.out).write_text(text)
        print(f"Written to {args.out}")
    return 0


def _embed(args: argparse.Namespace) -> int:
    """SOURCE's preference rows with embedding_{prompt,chosen,rejected} from a sentence encoder."""
    from dpok_jax.data import load_preference_dataset
    from dpok_jax.data.formats import BAD_ROW_COLUMN
    from dpok_jax.models.embed import add_embedding_columns
    from dpok_jax.models.encoder import SentenceEncoder

    out = Path(args.out)
    if out.suffix not in (".parquet", ".jsonl", ".json"):
        raise ValueError(f"OUT {out}: use a .parquet, .jsonl or .json file name")
    encoder = SentenceEncoder(args.encoder)
    ds = load_preference_dataset(args.source, split=args.split, format=args.format)
    ds = add_embedding_columns(ds, encoder, args.cache_dir)
    if BAD_ROW_COLUMN in ds.column_names:  # the loader finds them again when OUT is read
        ds = ds.remove_columns(BAD_ROW_COLUMN)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".parquet":
        ds.to_parquet(str(out))
    else:
        ds.to_json(str(out), lines=out.suffix == ".jsonl")
    print(f"{len(ds)} rows with {encoder.dim}-dim embedding_prompt/chosen/rejected written to {out}; "
          f"train on them with data.source={out} loss.embeddings=dataset")
    return 0


def main(argv: list[str] | None = None) -> int:
    from dpok_jax.xla_flags import ensure_cpu_collective_order

    ensure_cpu_collective_order()  # before any JAX backend exists (see dpok_jax/xla_flags.py)
    parser = argparse.ArgumentParser(prog="dpok", description="DPO-Kernels training in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a policy (no arguments: the embedded default)")
    train.add_argument("--config", type=Path, default=None,
                       help="YAML file of differences from the defaults (default: the embedded "
                            "tiny-CPU default)")
    train.add_argument("--allow-change", action="append", default=[], metavar="KEY",
                       help="on resume, accept a changed KEY (train.steps, data.max_eval_examples or "
                            "train.compare_with_dpo); repeatable")
    train.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. loss.beta=0.2")
    train.set_defaults(func=_train)
    export = sub.add_parser("export", help="export a run's policy as a Hugging Face checkpoint")
    export.add_argument("run_dir")
    export.add_argument("out")
    export.set_defaults(func=_export)
    select = sub.add_parser("select", help="choose kernel and divergence from the data (SPEC §9)")
    select.add_argument("--config", type=Path, default=None,
                        help="training YAML (its data, model, SFT warm-up and selection thresholds)")
    select.add_argument("--data", default=None, help="a preference data file or folder (data.source)")
    select.add_argument("--model", default=None, help="a local Hugging Face model folder (model.path)")
    select.add_argument("--out", type=Path, default=None, help="JSON report (default RUN_DIR/selection.json)")
    select.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. sft.steps=0")
    select.set_defaults(func=_select)
    ev = sub.add_parser("eval", help="held-out metrics of a trained run (SPEC §10)")
    ev.add_argument("run_dir")
    ev.add_argument("--data", default=None, help="held-out pairs to use instead of the run's (a file)")
    ev.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    ev.add_argument("--out", type=Path, default=None, help="JSON file (default RUN_DIR/eval.json)")
    ev.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. data.max_eval_examples=200")
    ev.set_defaults(func=_eval)
    rep = sub.add_parser("report", help="plots and a Markdown summary of a run (headless)")
    rep.add_argument("run_dir")
    rep.add_argument("--out", type=Path, default=None, help="output folder (default RUN_DIR/report)")
    rep.set_defaults(func=_report)
    sw = sub.add_parser("sweep", help="train the kernel x divergence grid over seeds (resumable)")
    sw.add_argument("--config", type=Path, default=None,
                    help="base YAML (default: the embedded default + the sweep's small budget on the "
                         "harder synthetic tasks)")
    sw.add_argument("--out", default="runs/sweep", help="sweep folder (results.csv, heatmaps, sweep.md)")
    sw.add_argument("--seeds", default="0,1", help="comma-separated training seeds")
    sw.add_argument("--kernels", default=None, help="comma-separated grid rows (default: dpo and every "
                                                    "registered kernel)")
    sw.add_argument("--divergences", default=None, help="grid columns (default: every divergence)")
    sw.add_argument("--rewards", default=None,
                    help="implicit f-DPO rewards trained as extra cells (default: all; '' for none)")
    sw.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=100")
    sw.set_defaults(func=_sweep)
    from dpok_jax.plan import add_arguments as add_plan_arguments

    plan = sub.add_parser("plan", help="will the config's train step fit its devices? (compiled ahead "
                                       "of time on fake CPU devices; exit 3 when it does not fit)")
    add_plan_arguments(plan)
    plan.set_defaults(func=_plan)
    gen = sub.add_parser("generate", help="sample from a run's policy, a Hugging Face folder or a .gguf file")
    gen.add_argument("model", nargs="+", help="dpok run folders, Hugging Face Llama folders or .gguf files "
                                              "(several: answers side by side)")
    gen.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable: one batch)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--format", choices=("chat", "raw"), default=None,
                     help="chat: the tokenizer's chat template (default when it has one); raw: BOS + text, "
                          "as training prompts are encoded")
    gen.add_argument("--out", default=None, help="also write the side-by-side answers to this Markdown file")
    gen.set_defaults(func=_generate)
    emb = sub.add_parser("embed", help="add sentence-encoder embedding columns to a preference dataset")
    emb.add_argument("source", help="a preference data file or folder (as data.source)")
    emb.add_argument("out", help="output .parquet, .jsonl or .json")
    emb.add_argument("--encoder", required=True, help="a BERT sentence-transformers folder (e.g. all-MiniLM-L6-v2)")
    emb.add_argument("--format", default="auto", help="data format (auto, explicit, implicit, conversational)")
    emb.add_argument("--split", default="train")
    emb.add_argument("--cache-dir", default=None, help="embedding cache folder (default: none)")
    emb.set_defaults(func=_embed)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
