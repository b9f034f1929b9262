"""Typed, frozen run configuration.

YAML files hold only differences from these defaults; dotted command-line overrides
(`loss.beta=0.2`) are applied last. OmegaConf does the merging and type checking, so an unknown key
or a value of the wrong type is an error naming the key.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

# The registries' keys (dpok_jax.losses.registry), in their order; plain tuples so that loading a
# config never imports JAX (tests/test_sweep.py checks they are equal).
KERNELS = ("none", "polynomial", "rbf", "spectral", "mahalanobis", "mixture", "hmk")
DIVERGENCES = (
    "none", "kl", "js", "squared_hellinger", "renyi", "bhattacharyya", "wasserstein", "f",
)
LINKS = ("sigmoid", "hinge", "ipo")
REWARDS = ("reverse_kl", "forward_kl", "js", "alpha")
EMBEDDINGS = ("reference", "policy", "dataset", "encoder")


@dataclass(frozen=True)
class ModelSection:
    """Which Llama. `path` (a local Hugging Face folder) wins over `preset`."""

    preset: str = "tiny"  # tiny | smollm2_135m | llama3_2_1b | llama3_1_8b
    path: Optional[str] = None
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat: str = "none"
    # Optional size overrides of the preset (None keeps the preset's value).
    hidden_size: Optional[int] = None
    intermediate_size: Optional[int] = None
    num_layers: Optional[int] = None
    num_heads: Optional[int] = None
    num_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None


@dataclass(frozen=True)
class DataSection:
    source: str = "synthetic"  # "synthetic", a local file/folder, or a hub name when online
    format: str = "auto"  # auto | explicit | implicit | conversational
    train_split: str = "train"
    eval_split: str = "test"
    eval_source: Optional[str] = None  # a separate file for held-out pairs
    tokenizer: str = "byte"  # "byte" or a local tokenizer folder (defaults to model.path)
    max_prompt_length: int = 64
    max_length: int = 128
    buckets: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048, 4096)
    strict: bool = False
    seed: int = 0
    synthetic_train_per_task: int = 300
    synthetic_eval_per_task: int = 60
    max_eval_examples: Optional[int] = None
    # Share of a single-file source's usable pairs held out for evaluation (at least 1 pair, at most
    # max_eval_examples or 1000); ignored with eval_source or a folder that has an eval_split.
    eval_fraction: float = 0.05
    # Padding-free packed pairs (dpok_jax.data.packing) in the DPO-Kernels step, the reference pass
    # and evaluation: the same results without computing on padding. The SFT warm-up stays padded.
    packing: bool = True
    # Packed row length: the smallest bucket >= max(the batch's longest sequence, pack_length); 0 uses
    # the batch's bucket. Longer rows hold more sequences (less padding) at a longer attention span.
    pack_length: int = 0
    # Prefix sharing in packed rows: a pair's prompt is computed once and both responses branch off
    # it (attention masked per branch), so a pair costs n_x + n_y+ + n_y- + 1 positions, not 2 n_x +
    # n_y+ + n_y-. The same results; the row length then holds the batch's longest pair.
    pack_share_prompt: bool = True
    # Packed row shapes: "bucket" (rows of the bucket length, as many as first-fit needs), "tight"
    # (one row per batch device and micro-batch, as long as its pairs need, rounded up to a few
    # sizes: the least padding, but on GPU/TPU attention kernels cover a row's whole causal
    # triangle, so only the CPU's tiled attention, which skips other segments' keys, gains), or
    # "auto": tight on CPU, bucket elsewhere.
    pack_rows: str = "auto"


@dataclass(frozen=True)
class RenyiParams:
    """`loss.divergence=renyi`: D_a = 1/(a-1) log sum p^a q^(1-a)."""

    order: float = 0.5


@dataclass(frozen=True)
class FParams:
    """`loss.divergence=f`: sum q f(p/q) with f named from the losses' F_REGISTRY."""

    name: str = "chi2"


@dataclass(frozen=True)
class WassersteinParams:
    """`loss.divergence=wasserstein`: entropic OT (Sinkhorn) on top-k supports."""

    epsilon: float = 0.1
    # Top-k truncation error against exact OT (bench/wasserstein_topk_error.py, docs/math.md): top-8
    # lost 5-9% of the transport cost at V=40-50 (entropy ~2.3 nats), top-16 2-3%.
    top_k: int = 16


@dataclass(frozen=True)
class AlphaRewardParams:
    """`loss.reward=alpha`: the alpha-divergence implicit reward beta (1 - u^(-a)) / a."""

    alpha: float = 0.5


@dataclass(frozen=True)
class LossSection:
    """SPEC §1–8 hyperparameters. Each variant's own hyperparameters sit in one nested section named
    after it (`loss.renyi.order`, `loss.f.name`, `loss.wasserstein.epsilon`, `loss.wasserstein.top_k`,
    `loss.alpha_reward.alpha`), which the losses registry reads (`registry.keyword_params`)."""

    beta: float = 0.1
    link: str = "sigmoid"
    label_smoothing: float = 0.0  # the sigmoid link's (cDPO / TRL's label_smoothing)
    reward: str = "reverse_kl"  # implicit reward (SPEC §7); reverse_kl is DPO
    logp_reduction: str = "sum"
    gamma: float = 0.0  # embedding-score weight
    kernel: str = "none"
    embeddings: str = "policy"
    # embeddings=encoder: a sentence-transformers BERT folder (e.g. all-MiniLM-L6-v2); the pairs' texts
    # are embedded once before training (cached) and used as dataset embeddings.
    encoder_path: Optional[str] = None
    eta: float = 0.0  # HMK / mixture entropy weight
    alpha: float = 0.0  # divergence weight
    divergence: str = "none"
    sft_weight: float = 0.0
    chunk_size: int = 64
    # Per-variant hyperparameters (read only when that divergence / reward is selected).
    renyi: RenyiParams = field(default_factory=RenyiParams)
    f: FParams = field(default_factory=FParams)
    wasserstein: WassersteinParams = field(default_factory=WassersteinParams)
    alpha_reward: AlphaRewardParams = field(default_factory=AlphaRewardParams)


# Flat keys of earlier versions -> their nested place; loading one is an error that names the new key.
RENAMED_KEYS = {
    "loss.renyi_order": "loss.renyi.order",
    "loss.f_name": "loss.f.name",
    "loss.wasserstein_epsilon": "loss.wasserstein.epsilon",
    "loss.wasserstein_top_k": "loss.wasserstein.top_k",
    "loss.reward_alpha": "loss.alpha_reward.alpha",
}


@dataclass(frozen=True)
class ReferenceSection:
    mode: str = "live"  # live | precomputed
    top_k: int = 16  # stored reference top-k log-probs (precomputed mode, divergences)
    cache_dir: Optional[str] = None  # default: RUN_DIR/../.reference_cache


@dataclass(frozen=True)
class OptimSection:
    learning_rate: float = 1e-3
    kernel_learning_rate: float = 5e-2  # HMK / mixture weights
    warmup_steps: int = 10
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.95
    clip_norm: float = 1.0
    grad_accum: int = 1


@dataclass(frozen=True)
class SFTSection:
    """Optional supervised warm-up that turns the initial model into the reference."""

    steps: int = 0
    learning_rate: float = 3e-3
    batch_size: int = 32
    # "chosen": the usual recipe (the reference imitates preferred responses); "both": a reference
    # that knows the format but prefers neither response.
    responses: str = "chosen"


@dataclass(frozen=True)
class TrainSection:
    steps: int = 200
    batch_size: int = 32
    log_every: int = 10
    eval_every: int = 100
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    max_nonfinite: int = 5  # this many non-finite losses in a row stop the run
    seed: int = 0
    progress: bool = True
    compare_with_dpo: bool = False  # also train plain DPO from the same reference and tabulate


@dataclass(frozen=True)
class MeshSection:
    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    distributed: bool = False  # call jax.distributed.initialize() (multi-host)
    # Only where JAX cannot detect the cluster (TPU pods and SLURM are detected automatically).
    coordinator_address: Optional[str] = None
    num_processes: Optional[int] = None
    process_id: Optional[int] = None


@dataclass(frozen=True)
class SelectionSection:
    """Thresholds of the data-driven selection rules (SPEC §9; `dpok select`, `kernel: auto`)."""

    kernel_eps1: float = 0.5  # RBF: PNAV > eps1
    kernel_eps2: float = 0.3  # RBF: TAT < eps2
    kernel_eps3: float = 0.2  # Mahalanobis: PNAV < eps3
    kernel_eps4: float = 0.7  # spectral: TAT > eps4
    kernel_eps5: float = 0.1  # spectral: PND < eps5
    approx_tol: float = 0.05  # polynomial: |NAG| and |log PND| below this count as 0
    div_eps1: float = 0.6  # Bhattacharyya: support overlap > eps1
    div_eps2: float = 0.3  # Wasserstein: drift > eps2
    div_eps3: float = 3.0  # Renyi: kurtosis > eps3
    overlap_low: float = 0.3  # JS: overlap below this (and kurtosis low)
    kurtosis_low: float = 3.0  # JS / Hellinger: kurtosis below this (a normal law's is 3)
    smoothness_low: float = 0.1  # Hellinger: smoothness below this (and kurtosis low)
    max_pairs: int = 512  # training pairs the metrics are computed on
    top_k: int = 32  # reference next-token probabilities kept per position
    nucleus: float = 0.95  # support overlap: nucleus mass
    smoothness_positions: int = 256  # consecutive-position pairs in the smoothness mean
    smoothness_epsilon: float = 0.01  # Sinkhorn epsilon of the smoothness W1 (cost units)


@dataclass(frozen=True)
class Config:
    run_dir: str = "runs/default"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    loss: LossSection = field(default_factory=LossSection)
    reference: ReferenceSection = field(default_factory=ReferenceSection)
    optim: OptimSection = field(default_factory=OptimSection)
    sft: SFTSection = field(default_factory=SFTSection)
    train: TrainSection = field(default_factory=TrainSection)
    mesh: MeshSection = field(default_factory=MeshSection)
    selection: SelectionSection = field(default_factory=SelectionSection)


def _check_choice(value: str, choices: tuple[str, ...], key: str) -> None:
    if value not in choices:
        raise ValueError(f"config {key}={value!r}: expected one of {', '.join(choices)}")


def validate(cfg: Config) -> Config:
    """Range and choice checks that types alone cannot express; errors name the key."""
    _check_choice(cfg.loss.kernel, KERNELS + ("auto",), "loss.kernel")  # auto: SPEC §9 rule
    _check_choice(cfg.loss.divergence, DIVERGENCES + ("auto",), "loss.divergence")
    _check_choice(cfg.loss.link, LINKS, "loss.link")
    _check_choice(cfg.loss.reward, REWARDS, "loss.reward")
    _check_choice(cfg.loss.embeddings, EMBEDDINGS, "loss.embeddings")
    if cfg.loss.embeddings == "encoder" and not cfg.loss.encoder_path:
        raise ValueError("config loss.embeddings=encoder needs loss.encoder_path (a sentence-transformers folder)")
    _check_choice(cfg.loss.logp_reduction, ("sum", "mean"), "loss.logp_reduction")
    if cfg.loss.link == "ipo" and cfg.loss.logp_reduction == "sum":
        warnings.warn("config loss.link=ipo with loss.logp_reduction=sum: IPO's target margin 1/(2β) is "
                      "meant for length-normalized log-probs (TRL's IPO averages them); set "
                      "loss.logp_reduction=mean unless summed log-probs are intended", UserWarning,
                      stacklevel=2)
    _check_choice(cfg.reference.mode, ("live", "precomputed"), "reference.mode")
    _check_choice(cfg.sft.responses, ("chosen", "both"), "sft.responses")
    positive = {
        "loss.beta": cfg.loss.beta,
        "train.batch_size": cfg.train.batch_size,
        "optim.learning_rate": cfg.optim.learning_rate,
        "optim.grad_accum": cfg.optim.grad_accum,
        "loss.chunk_size": cfg.loss.chunk_size,
        "data.max_length": cfg.data.max_length,
        "data.max_prompt_length": cfg.data.max_prompt_length,
    }
    for key, value in positive.items():
        if not value > 0:
            raise ValueError(f"config {key}={value!r}: must be > 0")
    nonneg = {
        "loss.gamma": cfg.loss.gamma, "loss.alpha": cfg.loss.alpha, "loss.eta": cfg.loss.eta,
        "loss.sft_weight": cfg.loss.sft_weight, "train.steps": cfg.train.steps,
        "sft.steps": cfg.sft.steps,
    }
    for key, value in nonneg.items():
        if value < 0:
            raise ValueError(f"config {key}={value!r}: must be >= 0")
    _check_run_settings(cfg)
    if not 0.0 <= cfg.loss.label_smoothing < 0.5:
        raise ValueError(f"config loss.label_smoothing={cfg.loss.label_smoothing}: must be in [0, 0.5)")
    if cfg.train.batch_size % cfg.optim.grad_accum:
        raise ValueError(
            f"config train.batch_size={cfg.train.batch_size} is not divisible by "
            f"optim.grad_accum={cfg.optim.grad_accum}"
        )
    if cfg.loss.gamma > 0 and cfg.loss.kernel == "none":
        raise ValueError("config loss.gamma > 0 needs a loss.kernel (e.g. hmk)")
    if cfg.loss.eta > 0 and cfg.loss.kernel not in ("hmk", "mixture", "auto"):
        raise ValueError(f"config loss.eta={cfg.loss.eta} (the mixture-entropy weight) needs "
                         f"loss.kernel=hmk or mixture, got loss.kernel={cfg.loss.kernel!r}; set "
                         "loss.eta=0")
    if cfg.loss.alpha > 0 and cfg.loss.divergence == "none":
        raise ValueError("config loss.alpha > 0 needs a loss.divergence (e.g. kl)")
    if cfg.loss.divergence == "wasserstein" and cfg.loss.alpha > 0 \
            and cfg.reference.mode == "precomputed":
        raise ValueError("config loss.divergence=wasserstein needs reference.mode=live (a precomputed "
                         "reference stores only top-k log-probs, not the full distribution)")
    if cfg.data.max_prompt_length >= cfg.data.max_length:
        raise ValueError(
            f"config data.max_prompt_length={cfg.data.max_prompt_length} must be smaller than "
            f"data.max_length={cfg.data.max_length}"
        )
    if not cfg.data.buckets or min(cfg.data.buckets) < 1:
        raise ValueError(f"config data.buckets={list(cfg.data.buckets)}: needs at least one positive length "
                         f"(the padded lengths; the largest >= data.max_length={cfg.data.max_length})")
    if not 0.0 < cfg.data.eval_fraction < 1.0:
        raise ValueError(f"config data.eval_fraction={cfg.data.eval_fraction}: must be in (0, 1)")
    if cfg.data.max_eval_examples is not None and cfg.data.max_eval_examples < 1:
        raise ValueError(f"config data.max_eval_examples={cfg.data.max_eval_examples}: must be >= 1 (or null)")
    if cfg.data.pack_length < 0 or cfg.data.pack_length > max(cfg.data.buckets):
        raise ValueError(f"config data.pack_length={cfg.data.pack_length}: must be in [0, the largest "
                         f"bucket {max(cfg.data.buckets)}] (0 packs into the batch's bucket length)")
    if cfg.data.pack_rows not in ("auto", "bucket", "tight"):
        raise ValueError(f"config data.pack_rows={cfg.data.pack_rows!r}: must be auto, bucket or tight")
    if max(cfg.data.buckets) < cfg.data.max_length:
        raise ValueError(
            f"config data.buckets={cfg.data.buckets}: the largest bucket must be >= "
            f"data.max_length={cfg.data.max_length}"
        )
    return cfg


def _finite_floats(obj, prefix: str = ""):
    """(dotted key, value) of every float field, nested sections included."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from _finite_floats(value, key + ".")
        elif isinstance(value, float):
            yield key, value


def _check_run_settings(cfg: Config) -> None:
    """Loop, optimizer and checkpoint settings that would fail (or silently misbehave) later."""
    import math

    for key, value in _finite_floats(cfg):
        if not math.isfinite(value):
            raise ValueError(f"config {key}={value!r}: must be a finite number")
    at_least_one = {
        "train.log_every": cfg.train.log_every,
        "train.max_nonfinite": cfg.train.max_nonfinite,
        "train.keep_checkpoints": cfg.train.keep_checkpoints,
        "sft.batch_size": cfg.sft.batch_size,
        "reference.top_k": cfg.reference.top_k,
    }
    for key, value in at_least_one.items():
        if value < 1:
            raise ValueError(f"config {key}={value!r}: must be >= 1")
    zero_means_off = {
        "train.checkpoint_every": (cfg.train.checkpoint_every, "0 turns periodic checkpoints off"),
        "train.eval_every": (cfg.train.eval_every, "0 evaluates only at the end"),
        "optim.warmup_steps": (cfg.optim.warmup_steps, "0 means no warm-up"),
        "optim.clip_norm": (cfg.optim.clip_norm, "0 turns clipping off"),
        "optim.weight_decay": (cfg.optim.weight_decay, "0 means none"),
        "optim.kernel_learning_rate": (cfg.optim.kernel_learning_rate, "0 freezes the kernel weights"),
        "sft.learning_rate": (cfg.sft.learning_rate, "used only when sft.steps > 0"),
    }
    for key, (value, meaning) in zero_means_off.items():
        if value < 0:
            raise ValueError(f"config {key}={value!r}: must be >= 0 ({meaning})")
    for key, value in (("optim.b1", cfg.optim.b1), ("optim.b2", cfg.optim.b2)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"config {key}={value!r}: must be in [0, 1)")


def _dotted_keys(tree, prefix: str = "") -> list[str]:
    """Every key of a nested mapping as a dotted path (`loss.renyi.order`), sections included."""
    if not isinstance(tree, dict):
        return []
    keys = []
    for k, v in tree.items():
        keys.append(f"{prefix}{k}")
        keys += _dotted_keys(v, f"{prefix}{k}.")
    return keys


def _check_renamed(keys, where: str) -> None:
    for key in keys:
        if key in RENAMED_KEYS:
            raise ValueError(f"config key {key}{where} has moved: use {RENAMED_KEYS[key]} (each variant's "
                             "hyperparameters now live in one nested section)")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file (differences only), then `key=value` overrides.

    >>> cfg = load_config(None, ["loss.beta=0.5", "train.steps=3"])
    >>> cfg.loss.beta, cfg.train.steps
    (0.5, 3)
    """
    layers = [OmegaConf.structured(Config)]
    try:
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise FileNotFoundError(f"config file not found: {path}")
            layers.append(OmegaConf.load(path))
            _check_renamed(_dotted_keys(OmegaConf.to_container(layers[-1])), f" in {path}")
        for item in overrides:
            if "=" not in item:
                raise ValueError(f"override {item!r} is not of the form key=value")
        _check_renamed([item.split("=", 1)[0].lstrip("+~") for item in overrides], " (command-line override)")
        layers.append(OmegaConf.from_dotlist(list(overrides)))
        cfg = OmegaConf.to_object(OmegaConf.merge(*layers))
    except OmegaConfBaseException as err:
        where = f" in {path}" if path is not None else ""
        raise ValueError(f"bad configuration{where}: {str(err).splitlines()[0]}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"malformed YAML in {path}{line}: {problem}") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"config file {path} is not UTF-8 text ({err.reason})") from None
    return validate(cfg)


def to_dict(cfg: Config) -> dict:
    """Plain nested dict (for config.yaml in the run folder and for fingerprints)."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
