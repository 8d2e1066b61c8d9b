"""The lane engine, task-agnostic: L copies of a model's trainable weights stacked on a leading dim ("lanes"), trained
at once. A task brings a loss function of one lane, the stacked weights, an update (its optimizers) and per-lane step
counts; `lanes_step` is one training step of every lane, the unit that a compiler, a kernel or a benchmark plugs into.

The forward is the task's loss under `torch.func.vmap` over the stacked weights; the backward is plain autograd on the
stacked leaves (`losses.sum().backward()`: lane i's loss only reaches lane i's weights). A lane whose loss goes
non-finite, or that has run all its steps, stops updating. Per-lane losses stay on the device; the host reads them
every `sync_every` steps ("all lanes done") and at the end.

Chunk invariance: a lane's numbers must not depend on how many lanes train beside it. Every op here is per lane or
elementwise, except the batched matmuls that vmap makes of the task's matmuls. A BLAS computes each item of a
batched matmul alike whatever the batch count (2, 3 or 8 items: observed on AMD EPYC and Intel Xeon), but with one
item it calls its plain matmul, which sums in another order on some CPUs (Intel with MKL). So a chunk never runs
with fewer than MIN_LANES lanes: a 1-lane chunk gets a second, idle lane (no steps, its result dropped).

Dead lanes cost nothing: at the host syncs, once lanes have diverged or run all their steps, `run` drops them from the
stacked tensors (`Row.compact`, through the task's `select`), keeping a dead lane as idle padding where fewer than
MIN_LANES would be left (a compiled row keeps a few fixed lane counts, `Row.lane_counts`: each count is a compile). By the argument above the living lanes' numbers do not change; the dead lanes' results are
what they were when they stopped.
"""

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.func import vmap

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


@dataclass
class Row:
    """A chunk of lanes in training: what `lanes_step` reads and updates. Lanes at index >= `real` are idle padding."""

    loss: Callable[[dict[str, torch.Tensor], torch.Tensor, torch.Tensor], torch.Tensor]  # one lane's scalar loss
    params: dict[str, torch.Tensor]  # the stacked trainable leaves [L, ...]
    update: Callable[[int, torch.Tensor], None]  # (step, active [L]) -> the optimizer steps, for active lanes only
    total_steps: torch.Tensor  # int64 [L]: lane i trains total_steps[i] steps (0 for an idle lane)
    real: int  # lanes that are real cells (the rest are padding)
    data_dim: int | None = None  # 0: batches carry one stream per lane [L, ...]; None: one batch shared by all lanes
    amp: torch.dtype | None = None  # autocast dtype of the forward
    # targets -> supervised-token count (per lane or shared)
    supervised: Callable[[torch.Tensor], torch.Tensor] | None = None
    # the longest lane's steps, when the task knows it (else read from total_steps: a host sync)
    max_steps: int | None = None
    # (step, active) before the backward: for a task whose update runs in backward hooks
    prepare: Callable[[int, torch.Tensor], None] | None = None
    # lanes to keep -> the task's state narrowed to them, its new params
    select: Callable[[torch.Tensor], dict[str, torch.Tensor]] | None = None
    # >1: each step's batch in this many parts, gradients accumulated (changes the sum order: see micro_batched_step)
    micro_batches: int = 1
    # (params, inputs, targets) -> losses [L]: a compiled vmap(loss) (compiled.py); None = vmap(loss)
    forward: Callable[[dict, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    # living lanes -> the lanes a compacted row keeps (a compiled row: a few fixed counts)
    lane_counts: Callable[[int], int] = padded_lanes

    def __post_init__(self):
        device = self.total_steps.device
        L = self.total_steps.shape[0]
        self.active = self.total_steps > 0
        self.max_steps = int(self.total_steps.max()) if self.max_steps is None else self.max_steps
        self.loss_log = torch.full((self.max_steps, L), math.nan, dtype=torch.float32, device=device)
        self.tokens_seen = torch.zeros(L, dtype=torch.int64, device=device)

    @property
    def device(self) -> torch.device:
        return self.total_steps.device

    def compact(self, keep: list[int]) -> None:
        """Keep only these lanes (indices into the current lanes, in this order): the task's state, then the engine's."""
        index = torch.tensor(keep, device=self.device)
        self.params = self.select(index)
        self.total_steps, self.active, self.tokens_seen = (
            t[index] for t in (self.total_steps, self.active, self.tokens_seen)
        )
        self.loss_log = self.loss_log[:, index]


def lanes_step(row: Row, step: int, inputs: torch.Tensor, targets: torch.Tensor) -> None:
    """One training step of every lane of the row: forward, loss bookkeeping, backward, update. No host sync."""
    if row.micro_batches > 1:
        return micro_batched_step(row, step, inputs, targets)
    device = row.device
    with torch.autocast(device.type, dtype=row.amp or torch.float32, enabled=row.amp is not None):
        forward = row.forward or vmap(row.loss, in_dims=(0, row.data_dim, row.data_dim))
        losses = forward(row.params, inputs, targets)
    if row.supervised is not None:
        row.tokens_seen += row.supervised(targets) * row.active
    row.loss_log[step] = torch.where(row.active, losses.detach().float(), math.nan)
    row.active &= torch.isfinite(losses.detach())  # a non-finite loss ends that lane, as in the single-lane trainer
    if row.prepare is not None:
        row.prepare(step, row.active)
    torch.where(row.active, losses, 0.0).sum().backward()
    row.update(step, row.active)
    for p in row.params.values():
        p.grad = None
    row.active &= row.total_steps > step + 1  # lanes that ran all their steps stop


def micro_batched_step(row: Row, step: int, inputs: torch.Tensor, targets: torch.Tensor) -> None:
    """lanes_step with the batch split in `row.micro_batches` parts along its batch dim, one forward and backward a
    part, gradients accumulated. A part's loss (a mean over its supervised tokens) is weighted by its share of the
    batch's supervised tokens, so the parts add up to the batch's loss; but the sums run in another order, so the
    numbers drift from the one-pass step (measured: benchmarks/README.md). Every part needs a supervised token in
    every lane: SFT batches have one in every sequence (sft.py drops the others)."""
    device, dim = row.device, 0 if row.data_dim is None else 1
    total = row.supervised(targets)
    losses = torch.zeros_like(row.loss_log[step])
    forward = row.forward or vmap(row.loss, in_dims=(0, row.data_dim, row.data_dim))
    for x, y in zip(inputs.chunk(row.micro_batches, dim), targets.chunk(row.micro_batches, dim)):
        with torch.autocast(device.type, dtype=row.amp or torch.float32, enabled=row.amp is not None):
            part = forward(row.params, x, y) * (row.supervised(y) / total)
        losses += part.detach().float()
        torch.where(row.active & torch.isfinite(part.detach()), part, 0.0).sum().backward()
    row.tokens_seen += total * row.active
    row.loss_log[step] = torch.where(row.active, losses, math.nan)
    row.active &= torch.isfinite(losses)
    row.update(step, row.active)
    for p in row.params.values():
        p.grad = None
    row.active &= row.total_steps > step + 1


def run(
    row: Row, batches: Batches, progress: Progress | None = None, sync_every: int = 10, compact: bool = True
) -> float:
    """Train the row to its longest lane's end (or until no lane is active). Returns the wall seconds.

    `progress(steps_done, max_steps, tokens_processed)` is called after every step with host values only (a step
    count and token counts from shapes), so it costs no sync; on CUDA "done" means queued, at most `sync_every` steps
    ahead of the device. Every `sync_every` steps the host reads which lanes are still active: the only host sync in
    the loop. There, with `compact` and a task that can `select`, lanes that are done are dropped from the row.
    Afterwards `row.loss_log` and `row.tokens_seen` hold every lane the row started with, in its order."""
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
            if compact and row.select is not None and row.lane_counts(len(alive)) < len(cols):
                if row.loss_log is not log:
                    log[:, cols], seen[cols] = row.loss_log, row.tokens_seen
                dead = [k for k in range(len(cols)) if k not in alive]
                keep = alive + dead[: row.lane_counts(len(alive)) - len(alive)]  # dead lanes stay as idle padding
                row.compact(keep)
                row.real, cols = len(alive), [cols[k] for k in keep]
    if row.loss_log is not log:
        log[:, cols], seen[cols] = row.loss_log, row.tokens_seen
        row.loss_log, row.tokens_seen = log, seen
    return time.perf_counter() - t0
