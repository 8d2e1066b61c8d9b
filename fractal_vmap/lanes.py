"""A grid row of nanochat SFT runs as lanes of the engine: stacked trainable groups (frozen groups shared by all
lanes, never copied), BatchedAdamW for the embedding groups and BatchedMuon for the matrices with each lane's own
learning rates and schedule, the lanes' attention and head. Every lane follows `recipe.py`, as `single.py` does.
"""

from dataclasses import dataclass
from functools import partial

import torch

from fractal_vmap import engine
from fractal_vmap.engine import Batches, Progress, Row, padded_lanes
from fractal_vmap.head import lanes_head_loss
from fractal_vmap.model import GPTConfig, forward, lanes_attention, param_group, rotary_cos_sin
from fractal_vmap.optim import BatchedAdamW, BatchedMuon, lr_multiplier
from fractal_vmap.recipe import ADAMW_BETAS, ADAMW_EPS, MUON_MOMENTUM, CellResult, FinetuneConfig, autocast_dtype, cell_result, group_lrs, trainable_groups


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


def check_row(cfgs: list[FinetuneConfig]) -> list[str]:
    """Lanes of one row may differ in per-lane scalars only; everything else must be shared. Returns the trainable groups."""
    groups = trainable_groups(cfgs[0])
    for c in cfgs[1:]:
        if trainable_groups(c) != groups or c.dtype != cfgs[0].dtype:
            raise ValueError("all lanes of a row must share trainable_param_groups and dtype")
    return groups


def supervised_tokens(targets: torch.Tensor) -> torch.Tensor:
    """Supervised tokens of a batch [B, T] (a scalar) or of per-lane batches [L, B, T] (one count a lane)."""
    return (targets != -1).flatten(-2).sum(-1)


def nanochat_row(
    cfgs: list[FinetuneConfig],
    config: GPTConfig,
    params: dict[str, torch.Tensor],
    steps: list[int],
    device: torch.device,
    data_dim: int | None = None,
    kernels: str = "torch",
) -> Row:
    """The engine's row for these cells, padded with idle lanes to the engine's minimum, all starting from `params`.
    kernels: "torch" (the references) or "triton" (fused optimizer steps and the lanes' head; kernels.resolve first)."""
    groups = check_row(cfgs)
    n, L = len(cfgs), padded_lanes(len(cfgs))
    settings = LaneSettings.from_configs(cfgs + [cfgs[-1]] * (L - n), config, steps + [0] * (L - n), device)
    stacked = engine.stack({k: v for k, v in params.items() if param_group(k) in groups}, L, device)
    frozen = {k: v.to(device) for k, v in params.items() if param_group(k) not in groups}
    # one AdamW per AdamW group (their lrs differ), one Muon for every matrix
    adamws = {g: BatchedAdamW([v for k, v in stacked.items() if param_group(k) == g], betas=ADAMW_BETAS, eps=ADAMW_EPS, kernels=kernels)
              for g in groups if g != "matrix"}
    matrices = [v for k, v in stacked.items() if param_group(k) == "matrix"]
    muon = BatchedMuon(matrices, momentum=MUON_MOMENTUM, nesterov=True, kernels=kernels) if matrices else None
    cos_sin = rotary_cos_sin(config, device)
    head = partial(lanes_head_loss, kernels=kernels)

    def lane_loss(lane_params, inputs, targets):
        return forward({**frozen, **lane_params}, inputs, config, cos_sin, targets, attend=lanes_attention, head=head)

    def update(step: int, active: torch.Tensor) -> None:
        mult = lr_multiplier(step, settings.total_steps, settings.warmup_frac, settings.final_lr_frac)
        for g, adamw in adamws.items():
            adamw.step(settings.lrs[g] * mult, settings.weight_decay, active)
        if muon is not None:
            muon.step(settings.lrs["matrix"] * mult, active)

    total = torch.tensor(steps + [0] * (L - n), dtype=torch.int64, device=device)
    return Row(lane_loss, stacked, update, total, real=n, data_dim=data_dim, amp=autocast_dtype(cfgs[0], device), supervised=supervised_tokens)


def train_lanes(
    cfgs: list[FinetuneConfig],
    config: GPTConfig,
    params: dict[str, torch.Tensor],
    batches: Batches,
    steps: list[int],
    device: torch.device,
    progress: Progress | None = None,
    sync_every: int = 10,
    kernels: str = "torch",
) -> list[CellResult]:
    """Train len(cfgs) lanes from the same base params; lane i runs steps[i] steps. One result a lane.

    `batches(step)` gives one batch [B, T] for every lane, or one per lane [L, B, T] (lanes with their own seed)."""
    first = batches(0)  # its shape says whether the lanes share the data

    def fetched(step: int) -> tuple[torch.Tensor, torch.Tensor]:  # each batch fetched once
        return first if step == 0 else batches(step)

    data_dim = 0 if first[0].dim() == 3 else None
    row = nanochat_row(cfgs, config, params, steps, device, data_dim, kernels)
    L = row.total_steps.shape[0]
    runtime = engine.run(row, fetched if data_dim is None or row.real == L else pad_lane_batches(fetched, L), progress, sync_every)
    log = row.loss_log.cpu().double()
    seen = row.tokens_seen.cpu().tolist()
    return [cell_result(cfg, log[: steps[i], i].tolist(), steps[i], seen[i], runtime) for i, cfg in enumerate(cfgs)]


def pad_lane_batches(batches: Batches, lanes: int) -> Batches:
    """Per-lane batches [n, B, T] repeated along the lane dim up to `lanes` (for idle padding lanes)."""

    def padded(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(torch.cat([t, t[-1:].expand(lanes - t.shape[0], *t.shape[1:])]) for t in batches(step))

    return padded
