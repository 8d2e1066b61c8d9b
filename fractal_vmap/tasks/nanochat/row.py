"""A grid row of nanochat SFT runs as lanes of the lane engine (lanes.py): stacked trainable groups (frozen groups
shared by all lanes, never copied), BatchedAdamW for the embedding groups and BatchedMuon for the matrices with each
lane's own learning rates and schedule, the lanes' attention and head. Every lane follows `recipe.py`, as
`reference.py` does. A LoRA row (lora.py) stacks only the lanes' adapters, trained by one BatchedAdamW; every base
weight is shared.
"""

from functools import partial

import torch
from torch.func import vmap

from fractal_vmap import lora
from fractal_vmap.head import lanes_head_loss
from fractal_vmap.lanes import Batches, Progress, Row, padded_lanes, run, stack
from fractal_vmap.model import LORA_SCALE, GPTConfig, Head, forward, lanes_attention, param_group, rotary_cos_sin
from fractal_vmap.options import FinetuneConfig
from fractal_vmap.recipe import (
    CellResult,
    autocast_dtype,
    cell_result,
    trainable_groups,
)
from fractal_vmap.tasks.nanochat.levers import Levers
from fractal_vmap.tasks.nanochat.optimizers import LaneSettings, RowOptimizers


def check_row(cfgs: list[FinetuneConfig]) -> list[str]:
    """Lanes of one row may differ in per-lane scalars only; everything else must be shared. Returns the trainable
    groups."""
    groups = trainable_groups(cfgs[0])
    for c in cfgs[1:]:
        if trainable_groups(c) != groups or c.dtype != cfgs[0].dtype:
            raise ValueError("all lanes of a row must share trainable_param_groups and dtype")
        if (c.lora_rank, c.lora_targets) != (cfgs[0].lora_rank, cfgs[0].lora_targets):
            # a lane's adapters are never padded to a neighbour's rank: chunks.train_row groups the lanes by rank
            raise ValueError("all lanes of a row must share lora_rank and lora_targets")
    return groups


def supervised_tokens(targets: torch.Tensor) -> torch.Tensor:
    """Supervised tokens of a batch [B, T] (a scalar) or of per-lane batches [L, B, T] (one count a lane)."""
    return (targets != -1).flatten(-2).sum(-1)


class NanochatLanes:
    """A row of nanochat SFT lanes as the engine's lane model (lanes.LaneModel): the stacked trainable groups (the
    frozen ones shared, never copied), the lanes' forward (vmapped, or compiled: compiled.py) under the row's autocast,
    the backward of the active lanes' losses, and their optimizers (RowOptimizers)."""

    log_dtype = torch.float32

    def __init__(
        self,
        optimizers: RowOptimizers,
        forward,
        amp: torch.dtype | None,
        levers: Levers,
        data_dim: int | None,
        lane_counts=padded_lanes,
        settings: dict[str, torch.Tensor] | None = None,
    ):
        self.optimizers, self.forward, self.amp, self.levers, self.data_dim = optimizers, forward, amp, levers, data_dim
        self.lane_counts = lane_counts
        self.settings = settings or {}  # per-lane tensors [L] the forward reads and nothing trains (LoRA's scale)

    @property
    def params(self) -> dict[str, torch.Tensor]:
        return self.optimizers.stacked

    def lane_inputs(self) -> dict[str, torch.Tensor]:
        """What the lanes' forward takes: the stacked trained weights and the per-lane settings."""
        return {**self.params, **self.settings}

    def autocast(self):
        device = next(iter(self.params.values())).device
        return torch.autocast(device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None)

    def losses(self, step: int, inputs: torch.Tensor, targets: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        if self.levers.micro_batches == 1:
            with self.autocast():
                return self.forward(self.lane_inputs(), inputs, targets)
        return self.micro_batched(inputs, targets, active)

    def micro_batched(self, inputs: torch.Tensor, targets: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """The batch in `levers.micro_batches` parts along its batch dim, one forward and backward a part, gradients
        accumulated. A part's loss (a mean over its supervised tokens) is weighted by its share of the batch's
        supervised tokens, so the parts add up to the batch's loss; but the sums run in another order, so the numbers
        drift from the one-pass step (measured: benchmarks/README.md). Every part needs a supervised token in every
        lane: SFT batches have one in every sequence (data.render_examples drops the others)."""
        dim = 0 if self.data_dim is None else 1
        total = supervised_tokens(targets)
        losses = torch.zeros(active.shape[0], device=active.device)
        for x, y in zip(inputs.chunk(self.levers.micro_batches, dim), targets.chunk(self.levers.micro_batches, dim)):
            with self.autocast():
                part = self.forward(self.lane_inputs(), x, y) * (supervised_tokens(y) / total)
            losses += part.detach().float()
            torch.where(active & torch.isfinite(part.detach()), part, 0.0).sum().backward()
        return losses

    def update(self, step: int, losses: torch.Tensor, active: torch.Tensor) -> None:
        if self.levers.micro_batches == 1:  # micro-batches ran their backwards in `losses`
            if self.levers.step_in_backward:
                self.optimizers.prepare(step, active)  # the hooks step the optimizers during the backward
            torch.where(active, losses, 0.0).sum().backward()
        self.optimizers.update(step, active)
        for p in self.params.values():
            p.grad = None

    def select(self, index: torch.Tensor) -> None:
        self.optimizers.select(index)
        self.settings = {k: v[index] for k, v in self.settings.items()}

    def supervised(self, targets: torch.Tensor) -> torch.Tensor:
        return supervised_tokens(targets)


def nanochat_row(
    cfgs: list[FinetuneConfig],
    config: GPTConfig,
    params: dict[str, torch.Tensor],
    steps: list[int],
    device: torch.device,
    data_dim: int | None = None,
    kernels: str = "torch",
    head: Head | None = None,
    levers: Levers = Levers(),
    compile: bool = False,
) -> Row:
    """The engine's row for these cells, padded with idle lanes to the engine's minimum, all starting from `params`.
    kernels: "torch" (the references) or "triton" (fused optimizer steps and the lanes' head; kernels.resolve first);
    head: another lanes' head in its place (perf/plan.py notes what it keeps); levers: memory for time (Levers).
    compile: the forward and backward under torch.compile (compiled.py: its own attention and head, `head` unused;
    compaction keeps powers of two lanes, so that it compiles few shapes). With levers.remat the row runs eagerly
    all the same: the recomputation's Function has a vmap rule, which dynamo does not honour (compiled.py); so does a
    LoRA row (compiled.py's forward has no adapters yet)."""
    groups = check_row(cfgs)
    if levers.master_dtype != "float32" and autocast_dtype(cfgs[0], device) is None:
        raise ValueError("bfloat16 master weights need the bfloat16 autocast (dtype bfloat16)")
    n, L = len(cfgs), padded_lanes(len(cfgs))
    settings = LaneSettings.from_configs(cfgs + [cfgs[-1]] * (L - n), config, steps + [0] * (L - n), device)
    master = getattr(torch, levers.master_dtype)
    lanes = cfgs + [cfgs[-1]] * (L - n)
    if cfgs[0].lora_rank > 0:  # LoRA: every base weight frozen and shared; each lane its own adapters and scale
        stacked, frozen, per_lane = lora_lanes(lanes, config, params, device, master)
    else:
        stacked = stack({k: v.to(master) for k, v in params.items() if param_group(k) in groups}, L, device)
        frozen, per_lane = {k: v.to(device) for k, v in params.items() if param_group(k) not in groups}, {}
    optimizers = RowOptimizers(stacked, groups, settings, levers, kernels, lora=cfgs[0].lora_rank > 0)
    cos_sin = rotary_cos_sin(config, device)
    head = head or partial(lanes_head_loss, kernels=kernels)

    def lane_loss(lane_params, inputs, targets):
        merged = {**frozen, **lane_params}
        return forward(merged, inputs, config, cos_sin, targets, attend=lanes_attention, head=head, remat=levers.remat)

    lanes_forward, lane_counts = vmap(lane_loss, in_dims=(0, data_dim, data_dim)), padded_lanes
    if compile and not levers.remat and not per_lane:
        from fractal_vmap.tasks.nanochat import compiled  # imports torch.compile's stack: only when asked

        lanes_forward, lane_counts = (
            compiled.compiled_forward(config, frozen, cos_sin, data_dim, kernels),
            compiled.lane_counts,
        )
    amp = autocast_dtype(cfgs[0], device)
    model = NanochatLanes(optimizers, lanes_forward, amp, levers, data_dim, lane_counts, per_lane)
    total = torch.tensor(steps + [0] * (L - n), dtype=torch.int64, device=device)
    return Row(model, total, real=n, data_dim=data_dim, max_steps=max(steps))


def lora_lanes(cfgs: list[FinetuneConfig], config: GPTConfig, params: dict[str, torch.Tensor], device, dtype):
    """A LoRA row's tensors: each lane's adapters at step 0 (lora.init_adapters, from its seed) stacked [L, ...] as
    leaves that train, the base model (every weight, frozen: one copy for all lanes) and each lane's scale [L]."""
    per_lane = [lora.init_adapters(config, c.lora_rank, c.lora_targets, c.seed) for c in cfgs]
    stacked = {k: torch.stack([a[k] for a in per_lane]).to(device, dtype).requires_grad_(True) for k in per_lane[0]}
    frozen = {k: v.to(device) for k, v in params.items()}
    scales = torch.tensor([lora.scale(c.lora_rank, c.lora_alpha) for c in cfgs], device=device)
    return stacked, frozen, {LORA_SCALE: scales}


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
    levers: Levers = Levers(),
    compact: bool = True,
    compile: bool = False,
) -> list[CellResult]:
    """Train len(cfgs) lanes from the same base params; lane i runs steps[i] steps. One result a lane.
    compile, kernels, levers: see nanochat_row.

    `batches(step)` gives one batch [B, T] for every lane, or one per lane [L, B, T] (lanes with their own seed).
    compact: drop lanes that are done from the stacked tensors at the host syncs (lanes.run); False only to compare."""
    first = batches(0)  # its shape says whether the lanes share the data

    def fetched(step: int) -> tuple[torch.Tensor, torch.Tensor]:  # each batch fetched once
        return first if step == 0 else batches(step)

    data_dim = 0 if first[0].dim() == 3 else None
    row = nanochat_row(cfgs, config, params, steps, device, data_dim, kernels, levers=levers, compile=compile)
    L = row.total_steps.shape[0]
    runtime = run(
        row,
        fetched if data_dim is None or row.real == L else pad_lane_batches(fetched, L),
        progress,
        sync_every,
        compact,
    )
    log = row.loss_log.cpu().double()
    seen = row.tokens_seen.cpu().tolist()
    return [cell_result(cfg, log[: steps[i], i].tolist(), steps[i], seen[i], runtime) for i, cfg in enumerate(cfgs)]


def pad_lane_batches(batches: Batches, lanes: int) -> Batches:
    """Per-lane batches [n, B, T] repeated along the lane dim up to `lanes` (for idle padding lanes)."""

    def padded(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(torch.cat([t, t[-1:].expand(lanes - t.shape[0], *t.shape[1:])]) for t in batches(step))

    return padded
