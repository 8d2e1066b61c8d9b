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
from fractal_vmap.model import GPTConfig, Head, forward, lanes_attention, param_group, rotary_cos_sin
from fractal_vmap.optim import BatchedAdamW, BatchedMuon, lr_multiplier
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
)


@dataclass
class LaneSettings:
    """Per-lane scalars as device tensors [L] (float64), read by the optimizers and the schedule each step."""

    lrs: dict[str, torch.Tensor]  # group -> base lr (init_lr_frac and the AdamW scale included)
    weight_decay: torch.Tensor
    warmup_frac: torch.Tensor
    final_lr_frac: torch.Tensor
    total_steps: torch.Tensor

    @classmethod
    def from_configs(
        cls, cfgs: list[FinetuneConfig], config: GPTConfig, steps: list[int], device: torch.device
    ) -> "LaneSettings":
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

    def select(self, index: torch.Tensor) -> "LaneSettings":
        """The settings of the lanes at `index`."""
        return LaneSettings(
            {g: lr[index] for g, lr in self.lrs.items()},
            *(getattr(self, f)[index] for f in ("weight_decay", "warmup_frac", "final_lr_frac", "total_steps")),
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


@dataclass(frozen=True)
class Levers:
    """How a row trades time for memory. The first two change no number (bit for bit: tests/test_memory.py); the
    last two do, and are used only when asked for (their drift: benchmarks/README.md)."""

    # each layer's optimizer step as soon as its gradients are in: full gradients never all alive
    step_in_backward: bool = False
    remat: bool = False  # recompute each block's activations in the backward, keeping only its input (model.py)
    # each step's batch in this many parts, gradients accumulated (the sums run in another order)
    micro_batches: int = 1
    momentum_dtype: str = "float32"  # "bfloat16": Muon's momentum buffers in half the memory, rounded every step
    # "bfloat16": the trained weights (so their gradients, AdamW moments) in half; needs bf16 autocast
    master_dtype: str = "float32"

    def __post_init__(self):
        if self.micro_batches > 1 and self.step_in_backward:
            raise ValueError(
                "micro-batches keep the gradients between parts: they do not combine with stepping in the backward"
            )


class RowOptimizers:
    """The optimizers of a row's lanes, with each lane's lrs and schedule: one BatchedAdamW per AdamW group, BatchedMuon
    over the matrices: one for all, or with `step_in_backward` one per layer, stepped from a post-accumulate-grad hook
    when the layer's last gradient is in (Newton-Schulz then batches the lanes of one layer), its gradients freed."""

    def __init__(
        self,
        stacked: dict[str, torch.Tensor],
        groups: list[str],
        settings: LaneSettings,
        levers: Levers,
        kernels: str = "torch",
    ):
        self.stacked, self.settings, self.levers = stacked, settings, levers
        names = {g: [k for k in stacked if param_group(k) == g] for g in groups}
        # (optimizer, its group, the names of its params): one AdamW per AdamW group (their lrs differ)
        self.owners = [
            (
                BatchedAdamW([stacked[k] for k in names[g]], betas=ADAMW_BETAS, eps=ADAMW_EPS, kernels=kernels),
                g,
                names[g],
            )
            for g in groups
            if g != "matrix"
        ]
        layers: dict[str, list[str]] = {}
        for k in names.get("matrix", []):
            layers.setdefault(k.split(".")[2] if levers.step_in_backward else "all", []).append(k)  # transformer.h.{i}.
        momentum_dtype = getattr(torch, levers.momentum_dtype)
        self.owners += [
            (
                BatchedMuon(
                    [stacked[k] for k in ks],
                    momentum=MUON_MOMENTUM,
                    nesterov=True,
                    kernels=kernels,
                    momentum_dtype=momentum_dtype,
                ),
                "matrix",
                ks,
            )
            for ks in layers.values()
        ]
        self.handles = []
        if levers.step_in_backward:
            self.hook()

    def prepare(self, step: int, active: torch.Tensor) -> None:
        """This step's per-lane lrs and active lanes, before the backward."""
        mult = lr_multiplier(step, self.settings.total_steps, self.settings.warmup_frac, self.settings.final_lr_frac)
        self.lrs = {g: lr * mult for g, lr in self.settings.lrs.items()}
        self.active = active

    def step(self, optimizer: BatchedAdamW | BatchedMuon, group: str) -> None:
        if group == "matrix":
            optimizer.step(self.lrs[group], self.active)
        else:
            optimizer.step(self.lrs[group], self.settings.weight_decay, self.active)

    def update(self, step: int, active: torch.Tensor) -> None:
        """After the backward: every optimizer's step (unless they ran in the backward)."""
        if not self.levers.step_in_backward:
            self.prepare(step, active)
            for optimizer, group, _ in self.owners:
                self.step(optimizer, group)

    def hook(self) -> None:
        """A post-accumulate-grad hook on every stacked leaf: the last of an optimizer's gradients steps it."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
        for optimizer, group, _ in self.owners:
            pending = {"left": len(optimizer.params)}

            def arrived(p, optimizer=optimizer, group=group, pending=pending):
                pending["left"] -= 1
                if pending["left"] == 0:
                    self.step(optimizer, group)
                    for q in optimizer.params:
                        q.grad = None
                    pending["left"] = len(optimizer.params)

            self.handles += [p.register_post_accumulate_grad_hook(arrived) for p in optimizer.params]

    def select(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """Keep the lanes at `index`: new stacked leaves (each old one freed as its new one is made), the optimizers'
        state and the lanes' settings. Returns the stacked leaves."""
        for optimizer, _, names in self.owners:
            for i, k in enumerate(names):
                self.stacked[k] = optimizer.params[i] = self.stacked[k].detach()[index].requires_grad_(True)
            optimizer.select(index)
        self.settings = self.settings.select(index)
        if self.levers.step_in_backward:
            self.hook()
        return self.stacked


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
    head: another lanes' head in its place (plan.py notes what it keeps); levers: memory for time (Levers).
    compile: the forward and backward under torch.compile (compiled.py: its own attention and head, `head` unused;
    compaction keeps powers of two lanes, so that it compiles few shapes). With levers.remat the row runs eagerly
    all the same: the recomputation's Function has a vmap rule, which dynamo does not honour (compiled.py)."""
    groups = check_row(cfgs)
    if levers.master_dtype != "float32" and autocast_dtype(cfgs[0], device) is None:
        raise ValueError("bfloat16 master weights need the bfloat16 autocast (dtype bfloat16)")
    n, L = len(cfgs), padded_lanes(len(cfgs))
    settings = LaneSettings.from_configs(cfgs + [cfgs[-1]] * (L - n), config, steps + [0] * (L - n), device)
    master = getattr(torch, levers.master_dtype)
    stacked = engine.stack({k: v.to(master) for k, v in params.items() if param_group(k) in groups}, L, device)
    frozen = {k: v.to(device) for k, v in params.items() if param_group(k) not in groups}
    optimizers = RowOptimizers(stacked, groups, settings, levers, kernels)
    cos_sin = rotary_cos_sin(config, device)
    head = head or partial(lanes_head_loss, kernels=kernels)

    def lane_loss(lane_params, inputs, targets):
        return forward(
            {**frozen, **lane_params},
            inputs,
            config,
            cos_sin,
            targets,
            attend=lanes_attention,
            head=head,
            remat=levers.remat,
        )

    compiled, lane_counts = None, padded_lanes
    if compile and not levers.remat:
        from fractal_vmap.compiled import (
            compiled_forward,
            lane_counts,
        )  # imports torch.compile's stack on first use: only when asked

        compiled = compiled_forward(config, frozen, cos_sin, data_dim, kernels)
    total = torch.tensor(steps + [0] * (L - n), dtype=torch.int64, device=device)
    return Row(
        lane_loss,
        stacked,
        optimizers.update,
        total,
        real=n,
        data_dim=data_dim,
        amp=autocast_dtype(cfgs[0], device),
        supervised=supervised_tokens,
        max_steps=max(steps),
        prepare=optimizers.prepare if levers.step_in_backward else None,
        select=optimizers.select,
        micro_batches=levers.micro_batches,
        forward=compiled,
        lane_counts=lane_counts,
    )


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
    compact: drop lanes that are done from the stacked tensors at the host syncs (engine.run); False only to compare."""
    first = batches(0)  # its shape says whether the lanes share the data

    def fetched(step: int) -> tuple[torch.Tensor, torch.Tensor]:  # each batch fetched once
        return first if step == 0 else batches(step)

    data_dim = 0 if first[0].dim() == 3 else None
    row = nanochat_row(cfgs, config, params, steps, device, data_dim, kernels, levers=levers, compile=compile)
    L = row.total_steps.shape[0]
    runtime = engine.run(
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
