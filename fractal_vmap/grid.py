"""The grid: two hyperparameter axes, one vmapped row of lanes per grid row, a resumable run directory.

`run_grid` is three steps: `plan_grid` (every check and load, before the run dir is touched), `run_rows` (train the
rows not yet done, each row's file written as it finishes) and `finish_grid` (the table, the pictures, W&B).
"""

import json
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from fractal_vmap.axes import (
    DEFAULT_AXES,
    Axis,
    cell_config,
    cell_lrs,
    check_overrides,
    lr_sources,
    make_axis,
    parse_axes,
    unused_fields,
)
from fractal_vmap.compiled import resolve_compile
from fractal_vmap.errors import UserError
from fractal_vmap.files import file_sha256, finite_or_none
from fractal_vmap.engine import padded_lanes
from fractal_vmap.kernels import resolve as resolve_kernels
from fractal_vmap.lanes import Levers, train_lanes
from fractal_vmap.lock import run_dir_lock
from fractal_vmap.options import GridConfig, TrainConfig
from fractal_vmap.plan import HEADROOM, MemoryPlan, estimate_memory, parse_bytes, parse_levers, plan_levers
from fractal_vmap.progress import GridProgress
from fractal_vmap.recipe import FinetuneConfig, autocast_dtype, group_lrs, resolve_device, validate
from fractal_vmap.report import dimension_note, write_report
from fractal_vmap.rundir import check_run_dir, default_run_dir, open_run_dir, read_row, row_path, write_row
from fractal_vmap.sft import lane_batches, make_stream, model_dir, render_split, total_steps

# fields that change neither the numbers nor the picture: left out of the spec a resumed run must match
RUN_ONLY_FIELDS = (
    "run_dir",
    "lane_chunk",
    "workers",
    "memory_budget",
    "levers",
    "run_name",
    "wandb",
    "wandb_project",
    "wandb_entity",
)
# settings that change the numbers but joined the spec later: left out at these defaults, so older run dirs resume
LATER_FIELDS = {
    "micro_batches": 1,
    "momentum_dtype": "float32",
    "master_dtype": "float32",
    "task": "nanochat-sft",
    "refine": 0,
}
PAPER_FIELDS = {
    "width": 8,
    "activation": "tanh",
    "phase_space": "lr_vs_lr",
    "data_multiple": 1.0,
}  # paper-mlp only (paper_task.py)
CPU_LANE_CHUNK = 8
console = Console()


@dataclass
class GridPlan:
    """Everything a grid needs, checked and loaded, before its run dir is touched."""

    cfg: GridConfig
    row: Axis
    col: Axis
    device: torch.device
    kernels: str  # "torch" or "triton", resolved
    model: tuple  # (GPTConfig, params, tokenizer)
    examples: list
    dropped: int
    cells: list[list[FinetuneConfig]]  # [rows][cols]
    spec: dict
    run_dir: Path
    compile: bool = False  # --compile, resolved: the row step under torch.compile (compiled.py)


def grid_axes(cfg: GridConfig) -> tuple[Axis, Axis]:
    rows_axis, cols_axis = parse_axes(cfg.axes)
    return (
        make_axis(rows_axis, cfg.rows, cfg.row_min, cfg.row_max, cfg.row_scale, "rows"),
        make_axis(cols_axis, cfg.cols, cfg.col_min, cfg.col_max, cfg.col_scale, "cols"),
    )


def base_config(cfg: GridConfig) -> FinetuneConfig:
    """The grid's settings as one cell's `finetune` settings (before the axis values go in; finetune-only ones default)."""
    return FinetuneConfig(**{f.name: getattr(cfg, f.name) for f in fields(TrainConfig)})


def source_id(source: str, path: Path | None) -> dict:
    """A model or dataset id for the spec: the source string plus a content hash where there is a local file."""
    from fractal_vmap.checkpoint import last_step, model_files_dir

    if path is None or not path.exists():
        return {"source": source}
    if path.is_file():
        return {"source": source, "sha256": file_sha256(path)}
    step = last_step(path)
    return {"source": source, "step": step, "sha256": file_sha256(model_files_dir(path) / f"model_{step:06d}.pt")}


def autocast_name(cfg: TrainConfig, device: torch.device) -> str:
    """The forward's dtype as resolved: bfloat16 (autocast) or float32."""
    return str(autocast_dtype(cfg, device) or torch.float32).removeprefix("torch.")


def make_spec(
    cfg: GridConfig, row: Axis, col: Axis, model_path: Path, device: torch.device, kernels: str, compile: bool = False
) -> dict:
    """What the numbers depend on. Device, dtype, kernels and compile as resolved (auto on a CPU machine is cpu, float32,
    torch, off).
    Settings no cell reads (an axis sets them, or another setting wins) are null; group_lrs says where each group's lr
    comes from."""
    unused = unused_fields(cfg, row, col)
    settings = {
        k: None if k in unused else v
        for k, v in asdict(cfg).items()
        if k not in RUN_ONLY_FIELDS and k not in PAPER_FIELDS and not (k in LATER_FIELDS and v == LATER_FIELDS[k])
    }
    settings["device"] = device.type
    settings["dtype"] = autocast_name(cfg, device)
    settings["kernels"] = kernels
    del settings["compile"]  # as resolved, and only when on (it moves the numbers slightly), so older run dirs resume
    if compile:
        settings["compile"] = "on"
    return {
        "axes": {"rows": asdict(row), "cols": asdict(col)},
        "settings": settings,
        "group_lrs": lr_sources(cfg, row, col),
        "model": source_id(cfg.model, model_path),
        "dataset": source_id(cfg.dataset, Path(cfg.dataset) if cfg.dataset != "default" else None),
    }


def plan_grid(cfg: GridConfig, axes: tuple[Axis, Axis] | None = None, parent: dict | None = None) -> GridPlan:
    """Every check and load a grid needs, each bad input one clear line, all before the run dir is created."""
    from fractal_vmap.tracking import check_wandb

    validate(cfg)
    check_wandb(cfg)
    cfg.axes = cfg.axes or DEFAULT_AXES  # as the spec has always recorded it
    for name, default in PAPER_FIELDS.items():
        if getattr(cfg, name) != default:
            raise UserError(
                f"--{name} is a setting of --task paper-mlp: leave it out of a nanochat grid, or add --task paper-mlp"
            )
    if cfg.lane_chunk < 0:
        raise UserError(f"--lane_chunk is {cfg.lane_chunk}: use 0 (auto) or a positive number of lanes")
    if cfg.perturb_ulp < 0:
        raise UserError(f"--perturb_ulp is {cfg.perturb_ulp}: use 0 (no nudge) or a positive number of ulps")
    row, col = axes or grid_axes(cfg)  # a zoom (zoom.py) brings exact axis values
    # refuses a flag an axis overrides; warns of one that pins part of an axis
    for line in check_overrides(cfg, row, col):
        console.print(f"[yellow]warning:[/yellow] {line}", highlight=False, soft_wrap=True)
    device = resolve_device(cfg.device)
    kernels = resolve_kernels(cfg.kernels, device)
    if kernels == "triton" and device.type == "cpu":
        console.print(
            "[yellow]--kernels triton on CPU: Triton's interpreter runs the kernels, very slowly (for tests and debugging)[/yellow]"
        )
    if kernels == "triton" and "bfloat16" in (cfg.momentum_dtype, cfg.master_dtype):
        raise UserError(
            "--momentum_dtype/--master_dtype bfloat16 run on the torch optimizer steps only: add --kernels torch"
        )
    parse_levers(cfg.levers, cfg.micro_batches, cfg.momentum_dtype, cfg.master_dtype, autocast_name(cfg, device))
    if cfg.memory_budget is not None:
        parse_bytes(cfg.memory_budget)
    if cfg.device_batch_size % cfg.micro_batches:
        raise UserError(
            f"--device_batch_size {cfg.device_batch_size} does not split into {cfg.micro_batches} micro-batches: pick a divisor"
        )
    compile = resolve_compile(cfg.compile, device)
    if cfg.compile == "on" and "remat" in cfg.levers.split(","):
        raise UserError(
            "--compile on does not take the remat lever (its recomputation does not trace): drop remat from --levers, or use --compile off"
        )
    directory = model_dir(cfg.model)  # resolved once: an hf:/wandb: source is looked up a single time
    from fractal_vmap.checkpoint import load_model

    config, params, tokenizer = load_model(str(directory), cfg.tokenizer, device)
    params = {k: nudged(v, cfg.perturb_ulp) for k, v in params.items()}
    base = base_config(cfg)
    cells = [
        [cell_config(base, row, col, i, j, cfg.run_name or "grid") for j in range(len(col.values))]
        for i in range(len(row.values))
    ]
    for c in (c for r in cells for c in r):
        validate(c)  # e.g. an lr axis reaching a non-positive value on a linear scale
        group_lrs(c, config)  # e.g. a matrix_lr axis doing the same
    examples, dropped = render_split(cfg, tokenizer, config, "train")  # dataset errors, too
    spec = make_spec(cfg, row, col, directory, device, kernels, compile)
    if parent is not None:
        spec["parent"] = parent  # the run this grid zooms into, and the box
    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(spec, row.name, col.name)
    check_run_dir(run_dir, spec)
    return GridPlan(
        cfg, row, col, device, kernels, (config, params, tokenizer), examples, dropped, cells, spec, run_dir, compile
    )


def nudged(t: torch.Tensor, ulps: int) -> torch.Tensor:
    """Every entry moved up by `ulps` representable floats (towards +inf)."""
    for _ in range(ulps):
        t = torch.nextafter(t, torch.full_like(t, torch.inf))
    return t


def is_out_of_memory(e: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError."""
    return isinstance(e, torch.OutOfMemoryError) or "DefaultCPUAllocator: can't allocate memory" in str(e)


def memory_budget(plan: GridPlan) -> int | None:
    """The bytes a lane chunk may use: --memory_budget, else on CUDA what is free plus what torch holds now (the base
    model, which the memory plan counts), else None (no limit on CPU)."""
    if plan.cfg.memory_budget is not None:
        return parse_bytes(plan.cfg.memory_budget)
    if plan.device.type == "cuda":
        return torch.cuda.mem_get_info(plan.device)[0] + torch.cuda.memory_allocated(plan.device)
    return None


def chunk_cap(plan: GridPlan, lanes: int) -> int:
    """The most lanes a chunk takes whatever the memory: --lane_chunk, else a whole row on CUDA and 8 lanes on CPU."""
    # on CPU, chunks of 8 lanes train fastest: a 16-lane row of the default model took 23.4 s as 2 x 8, 25 s as 1 x 16,
    # 26 s as 4 x 4 (2 cores): bigger batched matmuls against activations that outgrow the cache
    return min(lanes, plan.cfg.lane_chunk or (lanes if plan.device.type == "cuda" else CPU_LANE_CHUNK))


def chunk_size(plan: GridPlan, lanes: int) -> tuple[int, Levers, MemoryPlan | None]:
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
    if levers is None:
        memory = plan_levers(config, cap, budget, *shape, dtype, cfg.trainable_param_groups, base)
    else:
        memory = estimate_memory(config, *shape, dtype, cfg.trainable_param_groups, levers)
    fit = memory.lanes_that_fit(budget)
    if fit == 0:
        raise UserError(
            f"a lane chunk needs about {memory.peak(1) / HEADROOM / 2**30:.2f} GiB (estimated) but the memory budget is "
            f"{budget / 2**30:.2f} GiB: raise --memory_budget, or use --levers auto or --micro_batches"
        )
    return min(cap, fit), Levers(**memory.levers), memory


def measured_fit(memory: MemoryPlan, budget: int, lanes: int, peak: int) -> int:
    """Lanes per chunk from a chunk of `lanes` lanes that peaked at `peak` bytes: the estimate's fixed bytes, and per
    lane what the measurement leaves, extrapolated against the budget with HEADROOM."""
    per_lane = max(1, (peak - memory.fixed) / padded_lanes(lanes))
    return max(1, int((budget * HEADROOM - memory.fixed) // per_lane))


def train_row(plan: GridPlan, cell_cfgs: list[FinetuneConfig], progress=None) -> tuple[list[dict], int]:
    """Train one row in lane chunks sized by memory (chunk_size; on CUDA refined by the first chunk's measured peak);
    halve the chunk on out-of-memory. Returns the lanes' results and the chunk size that ran last (a lane's numbers do
    not depend on it: engine.py)."""
    config, params, tokenizer = plan.model
    pad_id = tokenizer.special_id("<|assistant_end|>")
    streams = {s: make_stream(cell_cfgs[0], tokenizer, plan.examples, s) for s in sorted({c.seed for c in cell_cfgs})}
    steps = [total_steps(c, streams[c.seed].batch(0)[1]) for c in cell_cfgs]
    chunk, levers, memory = chunk_size(plan, len(cell_cfgs))
    cuda = plan.device.type == "cuda"
    while True:
        try:
            results = []
            while len(results) < len(cell_cfgs):
                lanes = list(range(len(results), min(len(results) + chunk, len(cell_cfgs))))
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
                results += [c.to_dict() for c in cells]
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


def cell_steps(plan: GridPlan) -> list[list[int]]:
    """Every cell's step count, as train_row will find it (from the first batch of its seed's stream): the ETA's work."""
    tokenizer = plan.model[2]
    seeds = sorted({c.seed for row in plan.cells for c in row})
    first = {s: make_stream(plan.cells[0][0], tokenizer, plan.examples, s).batch(0)[1] for s in seeds}
    return [[total_steps(c, first[c.seed]) for c in row] for row in plan.cells]


def run_rows(
    plan: GridPlan, digest: str, wandb_run=None, rows: Iterable[int] | None = None, progress=None, rank: int = 0
) -> list[dict]:
    """Train every row (or the rows `rows` yields: a worker's claims, shard.py) without a finished file of this spec;
    returns the lanes of those rows, in the order gone through. `rank` (the worker's) is recorded in each row file."""
    row, col = plan.row, plan.col
    done = [read_row(row_path(plan.run_dir, i), len(col.values), digest) for i in range(len(plan.cells))]
    lanes: list[dict] = []
    with progress or GridProgress(console, cell_steps(plan)) as progress:
        for i in (i for i, d in enumerate(done) if d is not None):
            progress.row_skipped(i)
        for i in range(len(plan.cells)) if rows is None else rows:
            if done[i] is None:
                t0 = time.perf_counter()
                progress.row_started(i, f"{row.name}={row.values[i]:g}", len(plan.cells[i]))
                results, chunk = train_row(plan, plan.cells[i], progress)
                for j, r in enumerate(results):
                    r.update(grid_i=i, grid_j=j)
                write_row(row_path(plan.run_dir, i), i, digest, results, time.perf_counter() - t0, chunk, rank)
                done[i] = json.loads(json.dumps(finite_or_none(results)))  # as a resumed run reads it back: NaN is null
                progress.row_finished(i)
                if wandb_run is not None:  # step = the row: monotone across resumes, which continue the same W&B run
                    wandb_run.log(
                        {
                            "row": i,
                            "row/converged_frac": float(np.mean([r["converged"] for r in done[i]])),
                            "row/stable_frac": float(np.mean([r["stable"] for r in done[i]])),
                            "row/seconds": time.perf_counter() - t0,
                        },
                        step=i,
                    )
            lanes += done[i]
    return lanes


def finish_grid(plan: GridPlan, lanes: list[dict], wandb_run=None) -> dict:
    """The table, fractal.json and pictures; the W&B summary; the closing lines."""
    lrs = [[cell_lrs(c) for c in row] for row in plan.cells]  # the lrs each cell trained with (cells.parquet)
    out = write_report(plan.run_dir, lanes, plan.row, plan.col, lrs)
    if wandb_run is not None:
        import wandb

        run_dir, cells = plan.run_dir, out["cells"]
        # NaN -> None: the table's JSON stays strict
        table = wandb.Table(dataframe=cells.astype(object).where(cells.notna(), None))
        wandb_run.log(
            {
                "trainability": wandb.Image(str(run_dir / "trainability.png")),
                "panels": wandb.Image(str(run_dir / "panels.png")),
                "cells": table,
            },
            step=len(plan.cells),
        )
        wandb_run.summary.update(
            finite_or_none(
                {
                    "fractal_dimension": out["fractal"]["dimension"],
                    "trainable_fraction": out["fractal"]["trainable_fraction"],
                }
            )
        )
    f = out["fractal"]
    console.print(
        f"trainable {f['trainable_fraction']:.0%} of {len(lanes)} cells; {dimension_note(f)}",
        highlight=False,
        soft_wrap=True,
        style="yellow" if f["caveat"] else None,
    )
    console.print(
        f"pictures: [bold]{plan.run_dir / 'trainability.png'}[/bold] and [bold]{plan.run_dir / 'panels.png'}[/bold]; cells: {plan.run_dir / 'cells.parquet'}",
        soft_wrap=True,
    )
    return out


def open_grid(plan: GridPlan) -> tuple[str, object]:
    """The writer's start (the single process, or rank 0), with the run dir's lock held: grid.json and the W&B run.
    Returns the spec's digest and the W&B run (None when disabled)."""
    from fractal_vmap.tracking import start_run

    cfg = plan.cfg
    # again, under the lock: another grid may have created it since plan_grid looked
    check_run_dir(plan.run_dir, plan.spec)
    digest = open_run_dir(
        plan.run_dir, plan.spec, plan.device, {"train_examples": len(plan.examples), "dropped_examples": plan.dropped}
    )
    # one W&B run per grid: its id is kept in the run dir, and every resume continues it
    wandb_run = start_run(
        cfg.wandb,
        cfg.wandb_project,
        cfg.wandb_entity,
        cfg.run_name or plan.run_dir.name,
        {"spec": plan.spec},
        plan.run_dir,
        "grid",
        keep_id=True,
    )
    console.print(
        f"grid {plan.row.name} ({len(plan.row.values)} rows) x {plan.col.name} ({len(plan.col.values)} lanes a row) on {plan.device}, run dir [bold]{plan.run_dir}[/bold]"
    )
    console.print(
        f"{len(plan.examples)} training examples ({plan.dropped} dropped: no supervised token within max_seq_len)"
    )
    return digest, wandb_run


def run_grid(cfg: GridConfig, axes: tuple[Axis, Axis] | None = None, parent: dict | None = None) -> Path:
    """The `grid` command in one process: plan, train every row (resuming finished ones), then write the tables and
    pictures. Many workers: shard.py."""
    from fractal_vmap.tracking import closing_run

    plan = plan_grid(cfg, axes, parent)
    cfg.run_dir = str(plan.run_dir)  # what an interrupted run's resume command names (cli.py)
    with run_dir_lock(plan.run_dir):
        digest, wandb_run = open_grid(plan)
        with closing_run(wandb_run, plan.run_dir / "wandb"):
            lanes = run_rows(plan, digest, wandb_run)
            finish_grid(plan, lanes, wandb_run)
    return plan.run_dir
