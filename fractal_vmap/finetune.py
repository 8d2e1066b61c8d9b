"""The single-lane reference: one model, a plain loop, torch.optim.AdamW + torch.optim.Muon with nanochat's settings.

This is what the seed project's `src.finetune` did for one grid cell; every lane of a grid must reproduce it.
"""

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from fractal_vmap.checkpoint import load_model
from fractal_vmap.data import SFTStream, load_conversations, render_examples, steps_for_tokens
from fractal_vmap.errors import UserError
from fractal_vmap.fractal import convergence_measure, trainability
from fractal_vmap.model import GROUPS, GPTConfig, forward, param_group, rotary_cos_sin
from fractal_vmap.optim import lr_multiplier_scalar
from fractal_vmap.tokenizer import Tokenizer

ADAMW_BETAS = (0.8, 0.95)
ADAMW_EPS = 1e-10
MUON_MOMENTUM = 0.95


@dataclass
class FinetuneConfig:
    """Every knob of the seed project's `src.finetune`."""

    model: str = "default"  # checkpoint dir, hf:<owner>/<repo>[@rev], wandb:<entity>/<project>/<name>:<v>, or "default"
    tokenizer: str | None = None  # tokenizer dir, when it is not in or beside the model dir
    dataset: str = "default"  # JSONL file of {"messages": [...]}, a hub dataset id, or "default" (synthetic doc-QA)
    val_dataset: str | None = None  # JSONL/hub id for eval; the default dataset brings its own validation split
    learning_rate: float = 0.02  # the base lr: matrix_lr = lr, embedding_lr = lr * 10, unembedding_lr = lr * 0.2
    matrix_lr: float | None = None  # Muon lr; overrides learning_rate for the matrix group
    embedding_lr: float | None = None  # AdamW lr of wte (before the (n_embd/768)^-0.5 scale)
    unembedding_lr: float | None = None  # AdamW lr of lm_head (before the (n_embd/768)^-0.5 scale)
    embedding_lr_mult: float = 10.0
    unembedding_lr_mult: float = 0.2
    trainable_param_groups: str = "matrix,unembedding"  # comma list of matrix, embedding, unembedding
    weight_decay: float = 0.1  # decoupled, AdamW groups only
    init_lr_frac: float = 1.0
    warmup_frac: float = 0.06
    final_lr_frac: float = 0.0
    num_tokens: int = 20_000  # supervised tokens to train on; steps = ceil(num_tokens / supervised tokens of batch 0)
    num_iterations: int | None = None  # fixed step count (overrides num_tokens)
    device_batch_size: int = 8
    max_seq_len: int = 1024
    dtype: str = "auto"  # auto = bfloat16 autocast on CUDA, float32 on CPU; or float32 / bfloat16
    device: str = "auto"  # auto = cuda if available else cpu
    seed: int = 999
    eval_every: int = 0  # eval on the validation set every N steps (0: only at the end, if there is one)
    eval_batches: int = 4
    trainable_window_steps: int = 20  # K of "mean of the last K losses"
    trainable_loss_ratio_threshold: float = 1.0
    run_name: str | None = None
    out: str | None = None  # result JSON path (default: runs/finetune/<run_name>.json)
    wandb: str = "auto"  # auto (online with credentials, else offline), online, offline, disabled
    wandb_project: str = "fractal-vmap"
    wandb_entity: str | None = None


def trainable_groups(cfg: FinetuneConfig) -> list[str]:
    groups = [g.strip() for g in cfg.trainable_param_groups.split(",") if g.strip()]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown or not groups:
        raise UserError(f"unknown trainable_param_groups {unknown or cfg.trainable_param_groups!r}: use a comma list of {', '.join(GROUPS)}")
    return groups


def group_lrs(cfg: FinetuneConfig, config: GPTConfig) -> dict[str, float]:
    """The base lr of each group, as nanochat's setup_optimizers uses them (AdamW groups scaled by (n_embd/768)^-0.5)."""
    adamw_scale = (config.n_embd / 768) ** -0.5
    lrs = {
        "matrix": cfg.matrix_lr if cfg.matrix_lr is not None else cfg.learning_rate,
        "embedding": (cfg.embedding_lr if cfg.embedding_lr is not None else cfg.learning_rate * cfg.embedding_lr_mult) * adamw_scale,
        "unembedding": (cfg.unembedding_lr if cfg.unembedding_lr is not None else cfg.learning_rate * cfg.unembedding_lr_mult) * adamw_scale,
    }
    for group in trainable_groups(cfg):
        if not lrs[group] > 0:
            raise UserError(f"the {group} learning rate is {lrs[group]}: learning rates must be positive")
    return {g: lr * cfg.init_lr_frac for g, lr in lrs.items()}


def validate(cfg: FinetuneConfig) -> None:
    """One clear line for each bad setting, before anything is loaded."""
    trainable_groups(cfg)
    if not cfg.learning_rate > 0:
        raise UserError(f"learning_rate is {cfg.learning_rate}: it must be positive")
    if cfg.num_iterations is None and cfg.num_tokens < 1:
        raise UserError(f"num_tokens is {cfg.num_tokens}: it must be at least 1 (or set num_iterations)")
    if cfg.num_iterations is not None and cfg.num_iterations < 1:
        raise UserError(f"num_iterations is {cfg.num_iterations}: it must be at least 1")
    if cfg.device_batch_size < 1 or cfg.max_seq_len < 2:
        raise UserError("device_batch_size must be >= 1 and max_seq_len >= 2")
    if cfg.dtype not in ("auto", "float32", "bfloat16"):
        raise UserError(f"dtype {cfg.dtype!r} is not one of auto, float32, bfloat16")
    if cfg.trainable_window_steps < 1:
        raise UserError("trainable_window_steps must be at least 1")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name} asked for but CUDA is not available: use --device cpu")
    return torch.device(name)


def autocast_dtype(cfg: FinetuneConfig, device: torch.device) -> torch.dtype | None:
    """nanochat autocasts to bfloat16 on CUDA only; CPU runs in float32."""
    if cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def load_source(cfg: FinetuneConfig, device: torch.device) -> tuple[GPTConfig, dict[str, torch.Tensor], Tokenizer]:
    if cfg.model == "default":
        from fractal_vmap.default import default_model_dir

        return load_model(str(default_model_dir()), device=device)
    return load_model(cfg.model, cfg.tokenizer, device)


def conversations(source: str, split: str) -> list[dict]:
    if source == "default":
        from fractal_vmap.synth import doc_qa_conversations

        return doc_qa_conversations(4000 if split == "train" else 400, seed=0, split=split)
    return load_conversations(source, split)


def render_split(cfg: FinetuneConfig, tokenizer: Tokenizer, config: GPTConfig, split: str) -> tuple[list, int]:
    """The rendered examples of a dataset split and how many were dropped for having no supervised token."""
    if cfg.max_seq_len > config.sequence_len * 10:  # nanochat precomputes rotary for 10x its sequence_len
        raise UserError(f"max_seq_len {cfg.max_seq_len} exceeds the model's rotary table ({config.sequence_len * 10}): lower it")
    source = cfg.dataset if split == "train" else (cfg.val_dataset or cfg.dataset)
    return render_examples(conversations(source, split), tokenizer, cfg.max_seq_len)


def make_stream(cfg: FinetuneConfig, tokenizer: Tokenizer, examples: list, seed: int) -> SFTStream:
    """SFT batches padded with <|assistant_end|>, in an order drawn from the seed."""
    return SFTStream(examples, cfg.device_batch_size, seed, tokenizer.special_id("<|assistant_end|>"))


def total_steps(cfg: FinetuneConfig, first_targets: torch.Tensor) -> int:
    return cfg.num_iterations if cfg.num_iterations is not None else steps_for_tokens(cfg.num_tokens, first_targets)


def result_fields(cfg: FinetuneConfig, losses: list[float], steps: int, tokens_seen: int, runtime_s: float) -> dict:
    """The result of one cell, with the field names of `src.finetune` (labels from the losses actually run)."""
    run = losses[: next((i + 1 for i, x in enumerate(losses) if not math.isfinite(x)), len(losses))]
    labels = trainability(run, cfg.trainable_window_steps, cfg.trainable_loss_ratio_threshold)
    padded = run + [math.nan] * (steps - len(run))  # a run that stopped early is diverged for the measure
    finite = [x for x in run if math.isfinite(x)]
    return {
        "run_name": cfg.run_name,
        "learning_rate": cfg.learning_rate,
        "num_tokens_target": cfg.num_tokens,
        "tokens_seen": tokens_seen,
        "avg_loss": sum(finite) / len(finite) if finite else math.nan,
        "final_loss": run[-1] if run else math.nan,
        **labels,
        "steps": len(run),
        "total_steps": steps,
        "runtime_s": runtime_s,
        "seed": cfg.seed,
        "error": None if labels["stable"] else f"non-finite loss at step {len(run) - 1}",
        "grid_i": None,
        "grid_j": None,
        "measure": float(convergence_measure(np.array(padded))),
        "losses": run,
    }


def train_single(
    cfg: FinetuneConfig,
    config: GPTConfig,
    params: dict[str, torch.Tensor],
    batches,
    steps: int,
    device: torch.device | str,
    log=None,
    val_batches=None,
) -> dict:
    """Train one model for `steps` steps on `batches(step) -> (inputs, targets)`; return the result fields.

    `log(step, metrics)` is called every step (W&B). Losses are the loss before each step's update."""
    validate(cfg)
    device = torch.device(device)
    groups = trainable_groups(cfg)
    lrs = group_lrs(cfg, config)
    params = {k: v.detach().clone().to(device) for k, v in params.items()}
    by_group: dict[str, list[torch.Tensor]] = {g: [] for g in GROUPS}
    for name, p in params.items():
        if param_group(name) in groups:
            p.requires_grad_(True)
            by_group[param_group(name)].append(p)
    adamw_groups = [{"params": by_group[g], "lr": lrs[g], "initial_lr": lrs[g]} for g in ("embedding", "unembedding") if g in groups]
    optimizers = []
    if adamw_groups:
        optimizers.append(torch.optim.AdamW(adamw_groups, betas=ADAMW_BETAS, eps=ADAMW_EPS, weight_decay=cfg.weight_decay))
    if "matrix" in groups:
        muon_group = {"params": by_group["matrix"], "lr": lrs["matrix"], "initial_lr": lrs["matrix"]}
        optimizers.append(torch.optim.Muon([muon_group], momentum=MUON_MOMENTUM, nesterov=True, weight_decay=0.0))
    cos_sin = rotary_cos_sin(config, device)
    amp = autocast_dtype(cfg, device)
    losses: list[float] = []
    tokens_seen = 0
    t0 = time.perf_counter()
    for step in range(steps):
        inputs, targets = (t.to(device) for t in batches(step))
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = forward(params, inputs, config, cos_sin, targets)
        losses.append(loss.item())  # one sync per step is fine here: this is the debug/reference path
        tokens_seen += int((targets != -1).sum())
        if not math.isfinite(losses[-1]):
            break
        loss.backward()
        mult = lr_multiplier_scalar(step, steps, cfg.warmup_frac, cfg.final_lr_frac)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * mult
            opt.step()
            opt.zero_grad(set_to_none=True)
        metrics = {"train/loss": losses[-1], "train/lr_mult": mult, "train/tokens_seen": tokens_seen}
        if val_batches is not None and cfg.eval_every > 0 and (step + 1) % cfg.eval_every == 0:
            metrics["val/loss"] = evaluate(params, config, val_batches, cfg.eval_batches, device, amp)
        if log is not None:
            log(step, metrics)
    result = result_fields(cfg, losses, steps, tokens_seen, time.perf_counter() - t0)
    if val_batches is not None and result["stable"]:
        result["val_loss"] = evaluate(params, config, val_batches, cfg.eval_batches, device, amp)
    result["params"] = {k: v.detach() for k, v in params.items()}
    return result


@torch.no_grad()
def evaluate(params, config: GPTConfig, batches, n: int, device: torch.device, amp: torch.dtype | None) -> float:
    """Mean loss over the first n validation batches."""
    cos_sin = rotary_cos_sin(config, device)
    total = 0.0
    for i in range(n):
        inputs, targets = (t.to(device) for t in batches(i))
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            total += forward(params, inputs, config, cos_sin, targets).item()
    return total / n


def run_finetune(cfg: FinetuneConfig) -> dict:
    """The `finetune` command: load model and data, train one lane, write the result JSON, log to W&B."""
    from fractal_vmap.tracking import start_run

    validate(cfg)
    device = resolve_device(cfg.device)
    config, params, tokenizer = load_source(cfg, device)
    examples, dropped = render_split(cfg, tokenizer, config, "train")
    stream = make_stream(cfg, tokenizer, examples, cfg.seed)
    has_val = cfg.dataset == "default" or cfg.val_dataset is not None
    val = make_stream(cfg, tokenizer, render_split(cfg, tokenizer, config, "validation")[0], cfg.seed) if has_val else None
    steps = total_steps(cfg, stream.batch(0)[1])
    cfg.run_name = cfg.run_name or f"finetune-lr{cfg.learning_rate:g}-tok{cfg.num_tokens}-seed{cfg.seed}"
    out = Path(cfg.out or f"runs/finetune/{cfg.run_name}.json")
    wandb_run = start_run(cfg.wandb, cfg.wandb_project, cfg.wandb_entity, cfg.run_name, asdict(cfg), out.parent, "finetune")
    log = (lambda step, metrics: wandb_run.log(metrics, step=step)) if wandb_run is not None else None
    result = train_single(cfg, config, params, stream.batch, steps, device, log, val.batch if val else None)
    result.pop("params")
    result["dropped_examples"] = dropped
    if wandb_run is not None:
        wandb_run.summary.update({k: v for k, v in result.items() if k != "losses"})
        wandb_run.finish()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    result["out"] = str(out)
    return result
