"""Train a whole grid row at once: the trainable weights of L model copies ("lanes") stacked on a leading dim.

The forward is the functional model under `torch.func.vmap` over the stacked dict; the backward is plain
autograd on the stacked leaves (`losses.sum().backward()`: lane i's loss only reaches lane i's weights).
Frozen groups (embeddings by default) are shared by all lanes, never copied. Each lane has its own optimizer
state and learning rates; a lane whose loss goes non-finite, or that has run all its steps, stops updating.
Per-lane losses stay on the device; the host reads them every `sync_every` steps (progress) and at the end.
"""

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.func import vmap

from fractal_vmap.finetune import ADAMW_BETAS, ADAMW_EPS, MUON_MOMENTUM, FinetuneConfig, autocast_dtype, group_lrs, result_fields, trainable_groups
from fractal_vmap.model import GPTConfig, forward, param_group, rotary_cos_sin
from fractal_vmap.optim import BatchedAdamW, BatchedMuon, lr_multiplier

# batches(step) -> (inputs, targets): [B, T] shared by every lane, or [L, B, T] one stream per lane
Batches = Callable[[int], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class LaneSettings:
    """Per-lane scalars as device tensors [L] (float64), read by the optimizers and the schedule each step."""

    lrs: dict[str, torch.Tensor]  # group -> base lr (init_lr_frac and the AdamW scale included)
    weight_decay: torch.Tensor
    warmup_frac: torch.Tensor
    final_lr_frac: torch.Tensor
    total_steps: torch.Tensor

    @classmethod
    def from_configs(cls, cfgs: list[FinetuneConfig], config: GPTConfig, steps: list[int], device: torch.device) -> "LaneSettings":
        def vec(values) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float64, device=device)

        lrs = [group_lrs(c, config) for c in cfgs]
        return cls(
            lrs={g: vec([lr[g] for lr in lrs]) for g in lrs[0]},
            weight_decay=vec([c.weight_decay for c in cfgs]),
            warmup_frac=vec([c.warmup_frac for c in cfgs]),
            final_lr_frac=vec([c.final_lr_frac for c in cfgs]),
            total_steps=vec(steps),
        )


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host batch to the device without a host sync: a pageable-memory copy would block until the GPU catches up."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def check_row(cfgs: list[FinetuneConfig]) -> list[str]:
    """Lanes of one row may differ in per-lane scalars only; everything else must be shared. Returns the trainable groups."""
    groups = trainable_groups(cfgs[0])
    for c in cfgs[1:]:
        if trainable_groups(c) != groups or c.dtype != cfgs[0].dtype:
            raise ValueError("all lanes of a row must share trainable_param_groups and dtype")
    return groups


def train_lanes(
    cfgs: list[FinetuneConfig],
    config: GPTConfig,
    params: dict[str, torch.Tensor],
    batches: Batches,
    steps: list[int],
    device: torch.device,
    progress: Callable[[int, int, int], None] | None = None,
    sync_every: int = 10,
) -> list[dict]:
    """Train len(cfgs) lanes from the same base params; lane i runs steps[i] steps. One result dict per lane.

    `progress(steps_done, max_steps, tokens_processed)` is called every `sync_every` steps, when the host also checks
    whether any lane is still active (the only host sync in the loop)."""
    groups = check_row(cfgs)
    L, max_steps = len(cfgs), max(steps)
    settings = LaneSettings.from_configs(cfgs, config, steps, device)
    stacked = {k: v.to(device).expand(L, *v.shape).clone().requires_grad_(True) for k, v in params.items() if param_group(k) in groups}
    frozen = {k: v.to(device) for k, v in params.items() if param_group(k) not in groups}
    # one AdamW per AdamW group (their lrs differ), one Muon for every matrix
    adamws = {g: BatchedAdamW([v for k, v in stacked.items() if param_group(k) == g], betas=ADAMW_BETAS, eps=ADAMW_EPS) for g in groups if g != "matrix"}
    matrices = [v for k, v in stacked.items() if param_group(k) == "matrix"]
    muon = BatchedMuon(matrices, momentum=MUON_MOMENTUM, nesterov=True) if matrices else None
    cos_sin = rotary_cos_sin(config, device)
    amp = autocast_dtype(cfgs[0], device)

    def lane_loss(lane_params, inputs, targets):
        return forward({**frozen, **lane_params}, inputs, config, cos_sin, targets)

    active = torch.ones(L, dtype=torch.bool, device=device)
    loss_log = torch.full((max_steps, L), math.nan, dtype=torch.float32, device=device)
    tokens_seen = torch.zeros(L, dtype=torch.int64, device=device)
    processed = 0  # tokens pushed through the model, all lanes counted (host-side, from shapes)
    t0 = time.perf_counter()
    for step in range(max_steps):
        inputs, targets = (to_device(t, device) for t in batches(step))
        data_dim = 0 if inputs.dim() == 3 else None
        processed += inputs.numel() * (L if data_dim is None else 1)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            losses = vmap(lane_loss, in_dims=(0, data_dim, data_dim))(stacked, inputs, targets)
        n_supervised = (targets != -1).flatten(-2).sum(-1)  # scalar, or [L] with per-lane data
        tokens_seen += n_supervised * active
        loss_log[step] = torch.where(active, losses.detach().float(), math.nan)
        active = active & torch.isfinite(losses.detach())  # a non-finite loss ends that lane, as in finetune
        torch.where(active, losses, 0.0).sum().backward()
        mult = lr_multiplier(step, settings.total_steps, settings.warmup_frac, settings.final_lr_frac)
        for g, adamw in adamws.items():
            adamw.step(settings.lrs[g] * mult, settings.weight_decay, active)
        if muon is not None:
            muon.step(settings.lrs["matrix"] * mult, active)
        for p in stacked.values():
            p.grad = None
        active = active & (settings.total_steps > step + 1)  # lanes that ran all their steps stop
        if (step + 1) % sync_every == 0 or step + 1 == max_steps:
            if progress is not None:
                progress(step + 1, max_steps, processed)
            if not bool(active.any()):  # every lane diverged or finished: the rest would be NaN padding
                break
    runtime = time.perf_counter() - t0
    log = loss_log.cpu().double()
    seen = tokens_seen.cpu().tolist()
    results = []
    for i, cfg in enumerate(cfgs):
        results.append(result_fields(cfg, log[: steps[i], i].tolist(), steps[i], seen[i], runtime))  # cut at the first NaN there
    return results
