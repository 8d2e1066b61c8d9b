"""The planner's choice: the fastest configuration that fits, by projected lane-steps per second, not the most lanes.

More lanes per chunk is not faster by itself: at d20 a step of 8 x 1024 tokens is already compute-bound, and the
lever that fits the most lanes (remat) recomputes every block's forward in the backward, about a third more FLOPs.
So each rung of the memory ladder (memory.LEVER_LADDER: none, step_in_backward, remat, both; with the asked
number-changing settings) is traced for memory on the path CUDA runs (kernels "triton"), run with as many lanes as it
fits (at most the lanes asked), and projected on the datasheet GPU (roofline.py); the most lane-steps per second
wins. A rung that fits no more lanes than a cheaper rung already weighed is not projected: its levers only add work
(recomputation, or Muon stepped layer by layer in more, smaller launches). Micro-batches are not varied: they change
the numbers, so they are used only as asked. LoRA lanes (lora_rank > 0) climb the same ladder, traced as LoRA steps.
Every figure is a projection (roofline.py's assumptions).
"""

from dataclasses import dataclass, replace

from fractal_vmap.model import GPTConfig
from fractal_vmap.perf.roofline import LAUNCH_US, Projection, project_runtime
from fractal_vmap.tasks.nanochat.levers import Levers
from fractal_vmap.tasks.nanochat.memory import LEVER_LADDER, MemoryPlan, estimate_memory


@dataclass
class Choice:
    """One configuration weighed: its levers, memory plan, the lanes it runs and (unless pruned) its projection."""

    levers: Levers
    memory: MemoryPlan
    lanes: int  # min(lanes asked, lanes that fit); 0 if not even the smallest chunk fits
    projection: Projection | None = None
    note: str = ""  # why it was not projected

    @property
    def lane_steps_per_s(self) -> float:
        return self.lanes / self.projection.row_s if self.projection else 0.0

    def summary(self) -> dict:
        p = self.projection
        return {
            "levers": [k for k in ("step_in_backward", "remat") if getattr(self.levers, k)],
            "lanes": self.lanes,
            "peak_bytes": self.memory.peak(self.lanes) if self.lanes else None,
            "row_s": p.row_s if p else None,
            "lane_steps_per_s": self.lane_steps_per_s if p else None,
            "model_flops_per_s": p.model_flops / p.row_s if p else None,
            "note": self.note,
        }


def weigh(
    config: GPTConfig,
    lanes: int,
    memory: int,
    gpu: str = "h100",
    batch: int = 8,
    seq: int = 1024,
    dtype: str = "bfloat16",
    groups: str = "matrix,unembedding",
    base: Levers = Levers(),
    launch_us: float = LAUNCH_US,
    lora_rank: int = 0,
    lora_targets: str = "all",
) -> tuple[Choice, list[Choice]]:
    """(the fastest configuration that fits `memory` bytes, every configuration weighed); with none fitting, the one
    that fits the most (the smallest chunk would not fit: the caller says so). lora_rank > 0: LoRA lanes, weighed
    the same way."""
    weighed: list[Choice] = []
    for rung in LEVER_LADDER:
        levers = replace(base, step_in_backward=rung.step_in_backward, remat=rung.remat)
        if levers.micro_batches > 1 and levers.step_in_backward:
            continue
        plan = estimate_memory(config, batch, seq, dtype, groups, levers, "triton", lora_rank, lora_targets)
        choice = Choice(levers, plan, min(lanes, plan.lanes_that_fit(memory)))
        cheaper = [c for c in weighed if c.projection and lever_subset(c.levers, levers)]
        if not choice.lanes:
            choice.note = "does not fit"
        elif any(c.lanes >= choice.lanes for c in cheaper):
            choice.note = "no more lanes than fewer levers: not projected"
        else:
            choice.projection = project_runtime(
                config, choice.lanes, gpu, batch, seq, levers, groups, launch_us, lora_rank, lora_targets
            )
        weighed.append(choice)
    projected = [c for c in weighed if c.projection]
    best = max(projected, key=lambda c: c.lane_steps_per_s) if projected else max(weighed, key=lambda c: c.lanes)
    return best, weighed


def lever_subset(a: Levers, b: Levers) -> bool:
    """Whether a's memory levers are among b's."""
    return (not a.step_in_backward or b.step_in_backward) and (not a.remat or b.remat)
