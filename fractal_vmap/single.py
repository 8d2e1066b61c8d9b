"""The single-lane reference: one model, a plain loop, torch.optim.AdamW + torch.optim.Muon with nanochat's settings.

This is what the seed project's `src.finetune` did for one grid cell; every lane of a grid must reproduce it.
"""

import math
import time
from collections.abc import Callable

import torch

from fractal_vmap.model import GROUPS, GPTConfig, forward, param_group, rotary_cos_sin
from fractal_vmap.optim import lr_multiplier_scalar
from fractal_vmap.recipe import (
    ADAMW_BETAS,
    ADAMW_EPS,
    MUON_MOMENTUM,
    CellResult,
    FinetuneConfig,
    autocast_dtype,
    cell_result,
    group_lrs,
    trainable_groups,
    validate,
)


def train_single(
    cfg: FinetuneConfig,
    config: GPTConfig,
    params: dict[str, torch.Tensor],
    batches,
    steps: int,
    device: torch.device | str,
    log: Callable[[int, dict], None] | None = None,
    val_batches=None,
) -> tuple[CellResult, dict[str, torch.Tensor]]:
    """Train one model for `steps` steps on `batches(step) -> (inputs, targets)`; return its result and final params.

    `log(step, metrics)` is called every step (W&B, the live view). Losses are the loss before each step's update."""
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
    adamw_groups = [
        {"params": by_group[g], "lr": lrs[g], "initial_lr": lrs[g]} for g in ("embedding", "unembedding") if g in groups
    ]
    optimizers = []
    if adamw_groups:
        optimizers.append(
            torch.optim.AdamW(adamw_groups, betas=ADAMW_BETAS, eps=ADAMW_EPS, weight_decay=cfg.weight_decay)
        )
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
    result = cell_result(cfg, losses, steps, tokens_seen, time.perf_counter() - t0)
    return result, {k: v.detach() for k, v in params.items()}


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
