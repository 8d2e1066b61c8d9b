"""The single-lane reference trainer: one model, a plain loop, torch.optim.AdamW + torch.optim.Muon with nanochat's
settings. This is how grids were trained before fractal-vmap, one process a cell (a `finetune` run is one cell);
every lane of a grid must reproduce it (README "Fidelity").
"""

import math
import time
from collections.abc import Callable

import torch

from fractal_vmap import lora
from fractal_vmap.model import GROUPS, LORA_SCALE, GPTConfig, forward, param_group, rotary_cos_sin
from fractal_vmap.optim import lr_multiplier_scalar
from fractal_vmap.options import FinetuneConfig
from fractal_vmap.recipe import (
    ADAMW_BETAS,
    ADAMW_EPS,
    MUON_MOMENTUM,
    CellResult,
    autocast_dtype,
    cell_result,
    group_lrs,
    trainable_groups,
    validate,
)


class ReferenceModel:
    """One model as `finetune` trains it: its own copy of every weight, torch.optim AdamW on the embedding groups and
    torch.optim Muon on the matrices with nanochat's settings, only cfg's trainable groups trained. Its `loss` and
    `update` are the one single-model training step: the reference trainer runs them, bench's sequential mode times
    them and the GPU projection traces them (perf/roofline.py). foreach: AdamW's foreach path (None: torch's default
    for the device; the projection asks for CUDA's, True, while it traces on fake CPU tensors). With cfg.lora_rank > 0
    every base weight is frozen and only the LoRA adapters train, with torch.optim.AdamW (lora.py)."""

    def __init__(
        self,
        cfg: FinetuneConfig,
        config: GPTConfig,
        params: dict[str, torch.Tensor],
        device: torch.device,
        foreach: bool | None = None,
    ):
        groups, lrs = trainable_groups(cfg), group_lrs(cfg, config)
        self.cfg, self.config, self.device = cfg, config, device
        self.params = {k: v.detach().clone().to(device) for k, v in params.items()}
        self.cos_sin = rotary_cos_sin(config, device)
        self.amp = autocast_dtype(cfg, device)
        if cfg.lora_rank > 0:  # only the adapters train (lora.py), with AdamW at the matrix lr
            adapters = [p.requires_grad_(True) for p in self.add_adapters().values()]
            group = {"params": adapters, "lr": lrs["matrix"], "initial_lr": lrs["matrix"]}
            self.optimizers = [
                torch.optim.AdamW(
                    [group], betas=ADAMW_BETAS, eps=ADAMW_EPS, weight_decay=cfg.weight_decay, foreach=foreach
                )
            ]
            return
        by_group: dict[str, list[torch.Tensor]] = {g: [] for g in GROUPS}
        for name, p in self.params.items():
            if param_group(name) in groups:
                by_group[param_group(name)].append(p.requires_grad_(True))
        adamw = [
            {"params": by_group[g], "lr": lrs[g], "initial_lr": lrs[g]}
            for g in ("embedding", "unembedding")
            if g in groups
        ]
        self.optimizers: list[torch.optim.Optimizer] = []
        if adamw:
            self.optimizers.append(
                torch.optim.AdamW(
                    adamw, betas=ADAMW_BETAS, eps=ADAMW_EPS, weight_decay=cfg.weight_decay, foreach=foreach
                )
            )
        if "matrix" in groups:
            muon = {"params": by_group["matrix"], "lr": lrs["matrix"], "initial_lr": lrs["matrix"]}
            self.optimizers.append(torch.optim.Muon([muon], momentum=MUON_MOMENTUM, nesterov=True, weight_decay=0.0))

    def add_adapters(self) -> dict[str, torch.Tensor]:
        """The run's LoRA adapters at step 0 (lora.init_adapters) and their scale, put into self.params on the
        device; returns the adapters."""
        cfg = self.cfg
        adapters = {
            k: v.to(self.device)
            for k, v in lora.init_adapters(self.config, cfg.lora_rank, cfg.lora_targets, cfg.seed).items()
        }
        self.params.update(adapters)
        self.params[LORA_SCALE] = torch.tensor(lora.scale(cfg.lora_rank, cfg.lora_alpha), device=self.device)
        return {k: self.params[k] for k in adapters}

    def loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The forward: the mean loss of the batch (before this step's update), under the recipe's autocast."""
        with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            return forward(self.params, inputs, self.config, self.cos_sin, targets)

    def update(self, step: int, steps: int, loss: torch.Tensor) -> float:
        """The backward and every optimizer's step at step `step` of `steps` of the schedule; returns the lr
        multiplier."""
        loss.backward()
        mult = lr_multiplier_scalar(step, steps, self.cfg.warmup_frac, self.cfg.final_lr_frac)
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * mult
            opt.step()
            opt.zero_grad(set_to_none=True)
        return mult


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

    `log(step, metrics)` is called every step (W&B, the live view). Losses are the loss before each step's update.
    A non-finite loss ends the run."""
    validate(cfg)
    device = torch.device(device)
    model = ReferenceModel(cfg, config, params, device)
    losses: list[float] = []
    tokens_seen = 0
    t0 = time.perf_counter()
    for step in range(steps):
        inputs, targets = (t.to(device) for t in batches(step))
        loss = model.loss(inputs, targets)
        losses.append(loss.item())  # one sync per step is fine here: this is the debug/reference path
        tokens_seen += int((targets != -1).sum())
        if not math.isfinite(losses[-1]):
            break
        mult = model.update(step, steps, loss)
        metrics = {"train/loss": losses[-1], "train/lr_mult": mult, "train/tokens_seen": tokens_seen}
        if val_batches is not None and cfg.eval_every > 0 and (step + 1) % cfg.eval_every == 0:
            metrics["val/loss"] = evaluate(model.params, config, val_batches, cfg.eval_batches, device, model.amp)
        if log is not None:
            log(step, metrics)
    result = cell_result(cfg, losses, steps, tokens_seen, time.perf_counter() - t0)
    return result, {k: v.detach() for k, v in model.params.items()}


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
