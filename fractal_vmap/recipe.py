"""The fine-tuning recipe one grid cell follows: its knobs, its group learning rates, the optimizer constants, the
autocast rule, and the typed result of a cell. Both trainers read this: `reference.py` (one model, torch.optim, the
reference) and `lanes.py` (a vmapped row of lanes), so they cannot drift apart.
"""

import math
from dataclasses import asdict, dataclass

import torch

from fractal_vmap import lora
from fractal_vmap.analysis.labels import label_run
from fractal_vmap.errors import UserError
from fractal_vmap.model import GROUPS, GPTConfig
from fractal_vmap.options import FinetuneConfig, TrainConfig  # the knobs live in a light module (fast --help)

ADAMW_BETAS = (0.8, 0.95)
ADAMW_EPS = 1e-10
MUON_MOMENTUM = 0.95


def trainable_groups(cfg: TrainConfig) -> list[str]:
    """The trained groups, in GROUPS order; `all` (the classic fine-tuning script's spelling) means all three. Under
    LoRA only the matrices train, through their adapters (README "LoRA": the lm_head and embedding stay frozen)."""
    if cfg.lora_rank > 0:
        return ["matrix"]
    groups = [g.strip() for g in cfg.trainable_param_groups.split(",") if g.strip()]
    if groups == ["all"]:
        return list(GROUPS)
    unknown = [g for g in groups if g not in GROUPS]
    if unknown or not groups:
        raise UserError(
            f"unknown trainable_param_groups {unknown or cfg.trainable_param_groups!r}: use all or a comma list of "
            f"{', '.join(GROUPS)}"
        )
    return [g for g in GROUPS if g in groups]


LR_FLAGS = {
    "matrix": "matrix_lr",
    "embedding": "embedding_lr",
    "unembedding": "unembedding_lr",
}  # a group's own lr flag
LR_MULTS = {
    "embedding": "embedding_lr_mult",
    "unembedding": "unembedding_lr_mult",
}  # a group's multiple of learning_rate
ADAMW_GROUPS = ("embedding", "unembedding")  # AdamW's groups: scaled by (n_embd/768)^-0.5, with weight decay


def lr_source(cfg: TrainConfig, group: str) -> tuple[str, float]:
    """Where a group's learning rate comes from, the one rule: (its own flag, 1) when that flag is set, else
    ("learning_rate", the group's multiple of it: 1 for the matrices, --embedding_lr_mult, --unembedding_lr_mult)."""
    if getattr(cfg, LR_FLAGS[group]) is not None:
        return LR_FLAGS[group], 1.0
    return "learning_rate", getattr(cfg, LR_MULTS[group]) if group in LR_MULTS else 1.0


def flag_lr(cfg: TrainConfig, group: str) -> float:
    """A group's learning rate as the flags set it (before the AdamW scale and init_lr_frac)."""
    name, mult = lr_source(cfg, group)
    return getattr(cfg, name) * mult


def group_lrs(cfg: TrainConfig, config: GPTConfig) -> dict[str, float]:
    """The base lr of each group, as nanochat's setup_optimizers uses them (AdamW groups scaled by
    (n_embd/768)^-0.5)."""
    adamw_scale = (config.n_embd / 768) ** -0.5
    lrs = {g: flag_lr(cfg, g) * (adamw_scale if g in ADAMW_GROUPS else 1.0) for g in LR_FLAGS}
    for group in trainable_groups(cfg):
        if not 0 < lrs[group] < math.inf:
            raise UserError(f"the {group} learning rate is {lrs[group]}: learning rates must be positive and finite")
    return {g: lr * cfg.init_lr_frac for g, lr in lrs.items()}


def validate(cfg: TrainConfig) -> None:
    """One clear line for each bad setting, before anything is loaded."""
    lora.check(cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    if cfg.lora_rank > 0 and cfg.trainable_param_groups != "matrix,unembedding":
        raise UserError(
            f"--trainable_param_groups {cfg.trainable_param_groups} with --lora_rank {cfg.lora_rank}: under LoRA only "
            "the adapters on the matrices train (the lm_head and embedding stay frozen): drop --trainable_param_groups"
        )
    trainable_groups(cfg)
    for name in ("learning_rate", "matrix_lr", "embedding_lr", "unembedding_lr", "init_lr_frac"):
        value = getattr(cfg, name)
        if value is not None and not 0 < value < math.inf:
            raise UserError(f"--{name} is {value}: it must be positive and finite")
    for name in ("embedding_lr_mult", "unembedding_lr_mult", "weight_decay", "warmup_frac", "final_lr_frac"):
        value = getattr(cfg, name)
        if not 0 <= value < math.inf:
            raise UserError(f"--{name} is {value}: it must be a finite number >= 0")
    if cfg.warmup_frac > 1:
        raise UserError(f"--warmup_frac is {cfg.warmup_frac}: it is a fraction of the steps, at most 1")
    if cfg.num_iterations is None and cfg.num_tokens < 1:
        raise UserError(f"--num_tokens is {cfg.num_tokens}: it must be at least 1 (or set --num_iterations)")
    if cfg.num_iterations is not None and cfg.num_iterations < 1:
        raise UserError(f"--num_iterations is {cfg.num_iterations}: it must be at least 1")
    if cfg.device_batch_size < 1:
        raise UserError(f"--device_batch_size is {cfg.device_batch_size}: it must be at least 1")
    if cfg.max_seq_len < 2:
        raise UserError(f"--max_seq_len is {cfg.max_seq_len}: it must be at least 2")
    if cfg.dtype not in ("auto", "float32", "bfloat16"):
        raise UserError(f"--dtype {cfg.dtype!r} is not one of auto, float32, bfloat16")
    if cfg.trainable_window_steps < 1:
        raise UserError(f"--trainable_window_steps is {cfg.trainable_window_steps}: it must be at least 1")
    if not 0 < cfg.trainable_loss_ratio_threshold < math.inf:
        raise UserError(
            f"--trainable_loss_ratio_threshold is {cfg.trainable_loss_ratio_threshold}: it must be positive and finite"
        )
    if isinstance(cfg, FinetuneConfig) and cfg.eval_every < 0:
        raise UserError(f"--eval_every is {cfg.eval_every}: use 0 (evaluate at the end only) or a positive step count")
    if isinstance(cfg, FinetuneConfig) and cfg.eval_batches < 1:
        raise UserError(f"--eval_batches is {cfg.eval_batches}: it must be at least 1")
    if cfg.wandb not in ("auto", "online", "offline", "disabled"):
        raise UserError(f"--wandb {cfg.wandb!r} is not one of auto, online, offline, disabled")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name} asked for but CUDA is not available: use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device: use auto, cpu or cuda[:N]") from None


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """nanochat autocasts to bfloat16 on CUDA only; CPU runs in float32."""
    if cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


@dataclass
class CellResult:
    """The result of one cell, with the field names of the classic one-run-per-cell fine-tuning script's result (plus
    the measure and the loss curve). Labels come from the losses actually run: the curve stops at the first non-finite
    loss."""

    run_name: str | None
    learning_rate: float
    num_tokens_target: int
    tokens_seen: int
    avg_loss: float
    final_loss: float
    trainable_loss0: float
    trainable_mean_last_k: float
    trainable_ratio: float
    stable: bool
    converged: bool
    steps: int
    total_steps: int
    runtime_s: float
    seed: int
    error: str | None
    measure: float
    losses: list[float]
    grid_i: int | None = None
    grid_j: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def cell_result(cfg: FinetuneConfig, losses: list[float], steps: int, tokens_seen: int, runtime_s: float) -> CellResult:
    """A cell's result from its loss before each step (NaN padding after a non-finite loss is cut off)."""
    labels = label_run(losses, steps, cfg.trainable_window_steps, cfg.trainable_loss_ratio_threshold)
    return CellResult(
        run_name=cfg.run_name,
        learning_rate=cfg.learning_rate,
        num_tokens_target=cfg.num_tokens,
        tokens_seen=tokens_seen,
        **labels,
        total_steps=steps,
        runtime_s=runtime_s,
        seed=cfg.seed,
        error=None if labels["stable"] else f"non-finite loss at step {labels['steps'] - 1}",
    )


def autocast_name(cfg: TrainConfig, device: torch.device) -> str:
    """The forward's dtype as resolved: bfloat16 (autocast) or float32."""
    return str(autocast_dtype(cfg, device) or torch.float32).removeprefix("torch.")
