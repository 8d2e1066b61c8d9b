"""A nanochat row trained in lane chunks sized by memory: the memory model (memory.py) picks the lanes per chunk and
the levers under the budget (--memory_budget, else the GPU's free memory; no limit on CPU, where 8 lanes train
fastest), the first chunk's measured peak refines it on CUDA, and an out-of-memory error halves the chunk and retries
the row. A lane's numbers do not depend on its chunk (lanes.py), so none of this changes a number.
"""

import torch

from fractal_vmap.console import console
from fractal_vmap.data import lane_batches, make_stream, total_steps
from fractal_vmap.errors import UserError
from fractal_vmap.lanes import padded_lanes
from fractal_vmap.machine import is_out_of_memory
from fractal_vmap.options import FinetuneConfig
from fractal_vmap.recipe import autocast_name
from fractal_vmap.tasks.nanochat.levers import Levers
from fractal_vmap.tasks.nanochat.memory import (
    HEADROOM,
    MemoryPlan,
    estimate_memory,
    parse_bytes,
    parse_levers,
    plan_levers,
)
from fractal_vmap.tasks.nanochat.row import train_lanes

# on CPU, chunks of 8 lanes train fastest: a 16-lane row of the default model took 23.4 s as 2 x 8, 25 s as 1 x 16,
# 26 s as 4 x 4 (2 cores): bigger batched matmuls against activations that outgrow the cache
CPU_LANE_CHUNK = 8


def memory_budget(plan) -> int | None:
    """The bytes a lane chunk may use: --memory_budget, else on CUDA what is free plus what torch holds now (the base
    model, which the memory plan counts), else None (no limit on CPU)."""
    if plan.cfg.memory_budget is not None:
        return parse_bytes(plan.cfg.memory_budget)
    if plan.device.type == "cuda":
        return torch.cuda.mem_get_info(plan.device)[0] + torch.cuda.memory_allocated(plan.device)
    return None


def chunk_cap(plan, lanes: int) -> int:
    """The most lanes a chunk takes whatever the memory: --lane_chunk, else a whole row on CUDA and 8 lanes on CPU."""
    # on CPU, chunks of 8 lanes train fastest: a 16-lane row of the default model took 23.4 s as 2 x 8, 25 s as 1 x 16,
    # 26 s as 4 x 4 (2 cores): bigger batched matmuls against activations that outgrow the cache
    return min(lanes, plan.cfg.lane_chunk or (lanes if plan.device.type == "cuda" else CPU_LANE_CHUNK))


def chunk_size(plan, lanes: int, lora_rank: int = 0) -> tuple[int, Levers, MemoryPlan | None]:
    """Lanes per chunk, the levers to train them with, and the memory plan that chose them (None without a budget:
    then the chunk is --lane_chunk or the default, as fast as can be)."""
    cfg, cap = plan.cfg, chunk_cap(plan, lanes)
    dtype = autocast_name(cfg, plan.device)
    levers = parse_levers(cfg.levers, cfg.micro_batches, cfg.momentum_dtype, cfg.master_dtype, dtype)
    base = Levers(micro_batches=cfg.micro_batches, momentum_dtype=cfg.momentum_dtype, master_dtype=cfg.master_dtype)
    budget = memory_budget(plan)
    if budget is None:
        return cap, levers or base, None
    config = plan.model[0]
    shape = (cfg.device_batch_size, min(cfg.max_seq_len, config.sequence_len * 10))  # the longest batch a step can get
    lora = dict(lora_rank=lora_rank, lora_targets=cfg.lora_targets)  # a LoRA row is sized at its largest rank
    if levers is None:
        memory = plan_levers(config, cap, budget, *shape, dtype, cfg.trainable_param_groups, base, **lora)
    else:
        memory = estimate_memory(config, *shape, dtype, cfg.trainable_param_groups, levers, **lora)
    fit = memory.lanes_that_fit(budget)
    if fit == 0:
        raise UserError(
            f"a lane chunk needs about {memory.peak(1) / HEADROOM / 2**30:.2f} GiB (estimated) but the memory budget "
            "is "
            f"{budget / 2**30:.2f} GiB: raise --memory_budget, or use --levers auto or --micro_batches"
        )
    return min(cap, fit), Levers(**memory.levers), memory


def measured_fit(memory: MemoryPlan, budget: int, lanes: int, peak: int) -> int:
    """Lanes per chunk from a chunk of `lanes` lanes that peaked at `peak` bytes: the estimate's fixed bytes, and per
    lane what the measurement leaves, extrapolated against the budget with HEADROOM."""
    per_lane = max(1, (peak - memory.fixed) / padded_lanes(lanes))
    return max(1, int((budget * HEADROOM - memory.fixed) // per_lane))


def by_rank(cfgs: list[FinetuneConfig]) -> list[int]:
    """The row's lanes in training order: grouped by LoRA rank (ranks in order of first appearance, lanes in row order
    within a rank), so that no chunk mixes ranks and a lane's adapters are never padded to a neighbour's rank: its
    numbers depend on its own settings only. Without LoRA (or with one rank), the row's own order."""
    first = {}
    for c in cfgs:
        first.setdefault(c.lora_rank, len(first))
    return sorted(range(len(cfgs)), key=lambda i: first[cfgs[i].lora_rank])


def next_chunk(order: list[int], done: int, chunk: int, cfgs: list[FinetuneConfig]) -> list[int]:
    """The next chunk's lanes: up to `chunk` lanes of `order` from `done` on, all of one LoRA rank."""
    rank = cfgs[order[done]].lora_rank
    return [i for i in order[done : done + chunk] if cfgs[i].lora_rank == rank]  # a prefix: ranks are grouped


def train_row(plan, cell_cfgs: list[FinetuneConfig], progress=None) -> tuple[list[dict], int]:
    """Train one row in lane chunks sized by memory (chunk_size; on CUDA refined by the first chunk's measured peak);
    halve the chunk on out-of-memory. Returns the lanes' results and the chunk size that ran last (a lane's numbers do
    not depend on it: lanes.py)."""
    config, params, tokenizer = plan.model
    pad_id = tokenizer.special_id("<|assistant_end|>")
    streams = {s: make_stream(cell_cfgs[0], tokenizer, plan.examples, s) for s in sorted({c.seed for c in cell_cfgs})}
    steps = [total_steps(c, streams[c.seed].batch(0)[1]) for c in cell_cfgs]
    chunk, levers, memory = chunk_size(plan, len(cell_cfgs), max(c.lora_rank for c in cell_cfgs))
    cuda = plan.device.type == "cuda"
    order = by_rank(cell_cfgs)
    while True:
        try:
            results: list[dict] = [{}] * len(cell_cfgs)
            done = 0  # lanes of `order` trained
            while done < len(order):
                lanes = next_chunk(order, done, chunk, cell_cfgs)
                done += len(lanes)
                batches = lane_batches([cell_cfgs[i].seed for i in lanes], streams, pad_id)
                if cuda:
                    torch.cuda.reset_peak_memory_stats(plan.device)
                callback = progress.chunk(lanes, [steps[i] for i in lanes]) if progress is not None else None
                cells = train_lanes(
                    [cell_cfgs[i] for i in lanes],
                    config,
                    params,
                    batches,
                    [steps[i] for i in lanes],
                    plan.device,
                    callback,
                    kernels=plan.kernels,
                    levers=levers,
                    compile=plan.compile,
                )
                for i, c in zip(lanes, cells):
                    results[i] = c.to_dict()
                # a full chunk's measured peak sizes the next ones
                if cuda and memory is not None and len(lanes) == chunk:
                    fit = measured_fit(
                        memory, memory_budget(plan), len(lanes), torch.cuda.max_memory_allocated(plan.device)
                    )
                    chunk = min(fit, chunk_cap(plan, len(cell_cfgs)))
            return results, chunk
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not is_out_of_memory(e) or chunk == 1:
                raise
            chunk //= 2
            if plan.device.type == "cuda":
                torch.cuda.empty_cache()
            console.print(f"[yellow]out of memory: retrying the row with {chunk} lanes at a time[/yellow]")
