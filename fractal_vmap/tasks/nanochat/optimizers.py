"""A nanochat row's optimizers: BatchedAdamW for each embedding group and BatchedMuon for the matrices (optim.py, or
the fused Triton steps; under LoRA one BatchedAdamW over the adapters), each lane with its own learning rates and
schedule (LaneSettings, from the recipe's rules), stepped after the backward or, with the step_in_backward lever
(row.Levers), layer by layer as gradients arrive."""

from dataclasses import dataclass

import torch

from fractal_vmap.model import GPTConfig, param_group
from fractal_vmap.optim import BatchedAdamW, BatchedMuon, lr_multiplier
from fractal_vmap.options import FinetuneConfig
from fractal_vmap.recipe import ADAMW_BETAS, ADAMW_EPS, MUON_MOMENTUM, group_lrs
from fractal_vmap.tasks.nanochat.levers import Levers


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
        lora: bool = False,
    ):
        self.stacked, self.settings, self.levers = stacked, settings, levers
        names = {g: [k for k in stacked if param_group(k) == g] for g in groups}
        if lora:  # the stacked tensors are LoRA adapters: one AdamW at the matrix lr (README "LoRA")
            names = {"lora": list(stacked)}
            groups = ["lora"]
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
        else:  # an AdamW group; the adapters (group "lora") take the matrix lr
            lr = self.lrs["matrix" if group == "lora" else group]
            optimizer.step(lr, self.settings.weight_decay, self.active)

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
