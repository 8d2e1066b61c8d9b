"""The lane engine, task-agnostic: L copies of a model's trainable weights stacked on a leading dim ("lanes"), trained
at once. `lanes_step` is one training step of every lane, the unit that a compiler, a kernel or a benchmark plugs
into; `run` trains a row of lanes to its end. Every task's lanes train here: nanochat SFT (tasks/nanochat/row.py:
vmapped forward, autograd backward, per-lane AdamW and Muon) and the paper's MLP (tasks/paper/mlp.py: hand-derived
lane gradients, per-lane gradient descent).

A task gives the engine a `LaneModel`: its stacked weights, the lanes' losses of a batch (the forward), the update
of the active lanes (backward and optimizer steps), and a way to keep a subset of its lanes. The engine keeps the
rest, the same for every task: which lanes are active (a non-finite loss ends a lane, as in the single-lane trainer;
so does running all its steps), each lane's loss log and tokens seen, the host syncs, dead-lane compaction and the
padding below. Per-lane losses stay on the device; the host reads them every `sync_every` steps and at the end.

Chunk invariance: a lane's numbers must not depend on how many lanes train beside it. Every op of a lane model is per
lane or elementwise, except batched matmuls. A BLAS computes each item of a batched matmul alike whatever the batch
count (2, 3 or 8 items: observed on AMD EPYC and Intel Xeon), but with one item it calls its plain matmul, which sums
in another order on some CPUs (Intel with MKL). So a chunk never runs with fewer than MIN_LANES lanes: a 1-lane chunk
gets a second, idle lane (no steps, its result dropped).

Dead lanes cost nothing: at the host syncs, once lanes have diverged or run all their steps, `run` drops them from
the lane model (its `select`), keeping a dead lane as idle padding where fewer than MIN_LANES would be left (a
compiled row keeps a few fixed lane counts, `LaneModel.lane_counts`: each count is a compile). By the argument above
the living lanes' numbers do not change; the dead lanes' results are what they were when they stopped.
"""

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

MIN_LANES = 2  # see the module docstring: a batch of one takes another matmul path than a batch of two or more

# batches(step) -> (inputs, targets): shared by every lane, or with a leading lane dim (see Row.data_dim)
Batches = Callable[[int], tuple[torch.Tensor, torch.Tensor]]
Progress = Callable[[int, int, int], None]  # (steps done, steps of the chunk, tokens processed by its lanes)


def padded_lanes(n: int) -> int:
    """How many lanes a chunk of n real lanes runs with."""
    return max(n, MIN_LANES)


def stack(params: dict[str, torch.Tensor], lanes: int, device: torch.device) -> dict[str, torch.Tensor]:
    """`lanes` copies of each tensor, stacked [lanes, ...] as leaves that require grad."""
    return {k: v.to(device).expand(lanes, *v.shape).clone().requires_grad_(True) for k, v in params.items()}


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host batch to the device without a host sync: a pageable-memory copy would block until the GPU catches up."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class LaneModel(Protocol):
    """What a task trains on the engine: its lanes' weights and how one step changes them."""

    params: dict[str, torch.Tensor]  # the stacked trained weights [L, ...] (read for memory accounting)
    log_dtype: torch.dtype  # the loss log's dtype (float32 for nanochat, float64 for the paper's MLP)

    def losses(self, step: int, inputs: torch.Tensor, targets: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Every lane's loss [L] on the batch (a graph kept for `update` where it needs one)."""

    def update(self, step: int, losses: torch.Tensor, active: torch.Tensor) -> None:
        """The backward and the optimizer steps of the lanes where `active` [L] is true; the others stay as they are."""

    def select(self, index: torch.Tensor) -> None:
        """Keep only the lanes at `index`, in this order (weights, optimizer state, per-lane settings)."""

    def supervised(self, targets: torch.Tensor) -> torch.Tensor | int:
        """Tokens a lane trains on in this batch: one count for all lanes, or one a lane [L]."""

    def lane_counts(self, alive: int) -> int:
        """The lanes a compacted row keeps for `alive` living lanes (padded_lanes, or a few fixed counts)."""


@dataclass
class Row:
    """A chunk of lanes in training: the task's lane model and the engine's bookkeeping. Lanes at index >= `real` are
    idle padding."""

    model: LaneModel
    total_steps: torch.Tensor  # int64 [L]: lane i trains total_steps[i] steps (0 for an idle lane)
    real: int  # lanes that are real cells (the rest are padding)
    data_dim: int | None = None  # 0: batches carry one stream per lane [L, ...]; None: one batch shared by all lanes
    # the longest lane's steps, when the task knows it (else read from total_steps: a sync)
    max_steps: int | None = None

    def __post_init__(self):
        device = self.total_steps.device
        L = self.total_steps.shape[0]
        self.active = self.total_steps > 0
        self.max_steps = int(self.total_steps.max()) if self.max_steps is None else self.max_steps
        self.loss_log = torch.full((self.max_steps, L), math.nan, dtype=self.model.log_dtype, device=device)
        self.tokens_seen = torch.zeros(L, dtype=torch.int64, device=device)

    @property
    def device(self) -> torch.device:
        return self.total_steps.device

    def compact(self, keep: list[int]) -> None:
        """Keep only these lanes (indices into the current lanes, in this order): the task's state, then the
        engine's."""
        index = torch.tensor(keep, device=self.device)
        self.model.select(index)
        self.total_steps, self.active, self.tokens_seen = (
            t[index] for t in (self.total_steps, self.active, self.tokens_seen)
        )
        self.loss_log = self.loss_log[:, index]


def lanes_step(row: Row, step: int, inputs: torch.Tensor, targets: torch.Tensor) -> None:
    """One training step of every lane of the row: forward, loss bookkeeping, backward and update. No host sync."""
    losses = row.model.losses(step, inputs, targets, row.active)
    row.tokens_seen += row.model.supervised(targets) * row.active
    detached = losses.detach()
    row.loss_log[step] = torch.where(row.active, detached.to(row.loss_log.dtype), math.nan)
    row.active &= torch.isfinite(detached)  # a non-finite loss ends that lane, as in the single-lane trainer
    row.model.update(step, losses, row.active)
    row.active &= row.total_steps > step + 1  # lanes that ran all their steps stop


def run(
    row: Row, batches: Batches, progress: Progress | None = None, sync_every: int = 10, compact: bool = True
) -> float:
    """Train the row to its longest lane's end (or until no lane is active). Returns the wall seconds.

    `progress(steps_done, max_steps, tokens_processed)` is called after every step with host values only (a step
    count and token counts from shapes), so it costs no sync; on CUDA "done" means queued, at most `sync_every` steps
    ahead of the device. Every `sync_every` steps the host reads which lanes are still active: the only host sync in
    the loop. There, with `compact`, lanes that are done are dropped from the row. Afterwards `row.loss_log` and
    `row.tokens_seen` hold every lane the row started with, in its order."""
    processed = 0  # tokens pushed through the model by the real lanes (host-side, from shapes)
    log, seen = row.loss_log, row.tokens_seen  # every lane the row started with
    cols = list(range(len(seen)))  # the row's current lanes -> their columns in log and seen
    t0 = time.perf_counter()
    for step in range(row.max_steps):
        inputs, targets = batches(step)
        if row.data_dim == 0 and len(cols) < len(seen):  # per-lane data of the lanes left
            inputs, targets = inputs[cols], targets[cols]
        inputs, targets = to_device(inputs, row.device), to_device(targets, row.device)
        processed += inputs.numel() * row.real if row.data_dim is None else inputs[: row.real].numel()
        lanes_step(row, step, inputs, targets)
        if progress is not None:
            progress(step + 1, row.max_steps, processed)
        if (step + 1) % sync_every == 0:
            alive = row.active.nonzero().flatten().tolist()
            if not alive:  # every lane diverged or finished: the rest would be NaN padding
                break
            kept = row.model.lane_counts(len(alive))
            if compact and kept < len(cols):
                if row.loss_log is not log:
                    log[:, cols], seen[cols] = row.loss_log, row.tokens_seen
                dead = [k for k in range(len(cols)) if k not in alive]
                keep = alive + dead[: kept - len(alive)]  # dead lanes stay as idle padding
                row.compact(keep)
                row.real, cols = len(alive), [cols[k] for k in keep]
    if row.loss_log is not log:
        log[:, cols], seen[cols] = row.loss_log, row.tokens_seen
        row.loss_log, row.tokens_seen = log, seen
    return time.perf_counter() - t0
