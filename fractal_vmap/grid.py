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

from fractal_vmap.axes import Axis, cell_config, make_axis, parse_axes
from fractal_vmap.errors import UserError
from fractal_vmap.files import file_sha256, finite_or_none
from fractal_vmap.lanes import train_lanes
from fractal_vmap.lock import run_dir_lock
from fractal_vmap.progress import GridProgress
from fractal_vmap.recipe import FinetuneConfig, autocast_dtype, group_lrs, resolve_device, validate
from fractal_vmap.report import write_report
from fractal_vmap.rundir import check_run_dir, default_run_dir, open_run_dir, read_row, row_path, write_row
from fractal_vmap.sft import lane_batches, load_source, make_stream, model_dir, render_split, total_steps

# fields that change neither the numbers nor the picture: left out of the spec a resumed run must match
RUN_ONLY_FIELDS = ("run_dir", "lane_chunk", "workers", "out", "run_name", "wandb", "wandb_project", "wandb_entity", "eval_every", "eval_batches")
CPU_LANE_CHUNK = 8
console = Console()


@dataclass
class GridConfig(FinetuneConfig):
    """A grid of fine-tuning runs: every `finetune` knob, plus the two axes and their ranges."""

    axes: str = "num_tokens,lr"  # rows axis, cols axis; from: num_tokens, lr, matrix_lr, unembedding_lr, embedding_lr, weight_decay, warmup_frac, final_lr_frac, seed
    rows: int = 6
    cols: int = 16
    row_min: float | None = None  # rows-axis range (default: the axis' own range)
    row_max: float | None = None
    col_min: float | None = None
    col_max: float | None = None
    row_scale: str = "auto"  # log, linear, or auto (the axis' default)
    col_scale: str = "auto"
    run_dir: str | None = None  # default: runs/grid-<axes>-<hash of the spec>
    lane_chunk: int = 0  # most lanes trained at once (0 = auto: a whole row on CUDA, 8 on CPU); halves itself on out-of-memory
    perturb_ulp: int = 0  # nudge every base weight up by this many float32 ulps: the twin of a grid, for `compare` (noise floor)
    workers: int = 1  # processes sharing the rows on this node (one per GPU; on CPU each gets cores / N threads), started by torch's elastic launcher


@dataclass
class GridPlan:
    """Everything a grid needs, checked and loaded, before its run dir is touched."""

    cfg: GridConfig
    row: Axis
    col: Axis
    device: torch.device
    model: tuple  # (GPTConfig, params, tokenizer)
    examples: list
    dropped: int
    cells: list[list[FinetuneConfig]]  # [rows][cols]
    spec: dict
    run_dir: Path


def grid_axes(cfg: GridConfig) -> tuple[Axis, Axis]:
    rows_axis, cols_axis = parse_axes(cfg.axes)
    return (make_axis(rows_axis, cfg.rows, cfg.row_min, cfg.row_max, cfg.row_scale, "rows"),
            make_axis(cols_axis, cfg.cols, cfg.col_min, cfg.col_max, cfg.col_scale, "cols"))


def base_config(cfg: GridConfig) -> FinetuneConfig:
    """The grid's settings as one cell's `finetune` settings (before the axis values go in)."""
    return FinetuneConfig(**{f.name: getattr(cfg, f.name) for f in fields(FinetuneConfig)})


def source_id(source: str, path: Path | None) -> dict:
    """A model or dataset id for the spec: the source string plus a content hash where there is a local file."""
    from fractal_vmap.checkpoint import last_step, model_files_dir

    if path is None or not path.exists():
        return {"source": source}
    if path.is_file():
        return {"source": source, "sha256": file_sha256(path)}
    step = last_step(path)
    return {"source": source, "step": step, "sha256": file_sha256(model_files_dir(path) / f"model_{step:06d}.pt")}


def make_spec(cfg: GridConfig, row: Axis, col: Axis, model_path: Path, device: torch.device) -> dict:
    """What the numbers depend on. Device and dtype as resolved (auto on a CPU machine is cpu and float32)."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in RUN_ONLY_FIELDS}
    settings["device"] = device.type
    settings["dtype"] = str(autocast_dtype(cfg, device) or torch.float32).removeprefix("torch.")
    return {
        "axes": {"rows": asdict(row), "cols": asdict(col)},
        "settings": settings,
        "model": source_id(cfg.model, model_path),
        "dataset": source_id(cfg.dataset, Path(cfg.dataset) if cfg.dataset != "default" else None),
    }


def plan_grid(cfg: GridConfig) -> GridPlan:
    """Every check and load a grid needs, each bad input one clear line, all before the run dir is created."""
    validate(cfg)
    if cfg.lane_chunk < 0:
        raise UserError(f"--lane_chunk is {cfg.lane_chunk}: use 0 (auto) or a positive number of lanes")
    if cfg.perturb_ulp < 0:
        raise UserError(f"--perturb_ulp is {cfg.perturb_ulp}: use 0 (no nudge) or a positive number of ulps")
    row, col = grid_axes(cfg)
    device = resolve_device(cfg.device)
    directory = model_dir(cfg.model)  # resolved once: an hf:/wandb: source is looked up a single time
    from fractal_vmap.checkpoint import load_model

    config, params, tokenizer = load_model(str(directory), cfg.tokenizer, device)
    params = {k: nudged(v, cfg.perturb_ulp) for k, v in params.items()}
    base = base_config(cfg)
    cells = [[cell_config(base, row, col, i, j, cfg.run_name or "grid") for j in range(len(col.values))] for i in range(len(row.values))]
    for c in (c for r in cells for c in r):
        validate(c)  # e.g. an lr axis reaching a non-positive value on a linear scale
        group_lrs(c, config)  # e.g. a matrix_lr axis doing the same
    examples, dropped = render_split(cfg, tokenizer, config, "train")  # dataset errors, too
    spec = make_spec(cfg, row, col, directory, device)
    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(spec, row.name, col.name)
    check_run_dir(run_dir, spec)
    return GridPlan(cfg, row, col, device, (config, params, tokenizer), examples, dropped, cells, spec, run_dir)


def nudged(t: torch.Tensor, ulps: int) -> torch.Tensor:
    """Every entry moved up by `ulps` representable floats (towards +inf)."""
    for _ in range(ulps):
        t = torch.nextafter(t, torch.full_like(t, torch.inf))
    return t


def is_out_of_memory(e: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError."""
    return isinstance(e, torch.OutOfMemoryError) or "DefaultCPUAllocator: can't allocate memory" in str(e)


def train_row(plan: GridPlan, cell_cfgs: list[FinetuneConfig], progress=None) -> tuple[list[dict], int]:
    """Train one row in lane chunks (all lanes at once unless --lane_chunk); halve the chunk on out-of-memory.
    Returns the lanes' results and the chunk size that ran (a lane's numbers do not depend on it: engine.py)."""
    config, params, tokenizer = plan.model
    pad_id = tokenizer.special_id("<|assistant_end|>")
    streams = {s: make_stream(cell_cfgs[0], tokenizer, plan.examples, s) for s in sorted({c.seed for c in cell_cfgs})}
    steps = [total_steps(c, streams[c.seed].batch(0)[1]) for c in cell_cfgs]
    # on CPU, chunks of 8 lanes train fastest: a 16-lane row of the default model took 23.4 s as 2 x 8, 25 s as 1 x 16,
    # 26 s as 4 x 4 (2 cores): bigger batched matmuls against activations that outgrow the cache
    chunk = plan.cfg.lane_chunk or (len(cell_cfgs) if plan.device.type == "cuda" else CPU_LANE_CHUNK)
    while True:
        try:
            results = []
            for start in range(0, len(cell_cfgs), chunk):
                lanes = list(range(start, min(start + chunk, len(cell_cfgs))))
                batches = lane_batches([cell_cfgs[i].seed for i in lanes], streams, pad_id)
                cells = train_lanes([cell_cfgs[i] for i in lanes], config, params, batches, [steps[i] for i in lanes], plan.device, progress)
                results += [c.to_dict() for c in cells]
            return results, chunk
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not is_out_of_memory(e) or chunk == 1:
                raise
            chunk //= 2
            if plan.device.type == "cuda":
                torch.cuda.empty_cache()
            console.print(f"[yellow]out of memory: retrying the row with {chunk} lanes at a time[/yellow]")


def run_rows(plan: GridPlan, digest: str, wandb_run=None, rows: Iterable[int] | None = None, progress=None, rank: int = 0) -> list[dict]:
    """Train every row (or the rows `rows` yields: a worker's claims, shard.py) without a finished file of this spec;
    returns the lanes of those rows, in the order gone through. `rank` (the worker's) is recorded in each row file."""
    row, col = plan.row, plan.col
    lanes: list[dict] = []
    with progress or GridProgress(console, len(row.values)) as progress:
        for i in range(len(row.values)) if rows is None else rows:
            row_cfgs = plan.cells[i]
            path = row_path(plan.run_dir, i)
            done = read_row(path, len(col.values), digest)
            if done is not None:
                progress.row_skipped(i)
            else:
                t0 = time.perf_counter()
                progress.row_started(i, f"{row.name}={row.values[i]:g}", len(row_cfgs))
                results, chunk = train_row(plan, row_cfgs, progress.steps)
                for j, r in enumerate(results):
                    r.update(grid_i=i, grid_j=j)
                write_row(path, i, digest, results, time.perf_counter() - t0, chunk, rank)
                done = json.loads(json.dumps(finite_or_none(results)))  # as a resumed run reads it back: NaN is null
                progress.row_finished(i)
                if wandb_run is not None:
                    wandb_run.log({"row": i, "row/converged_frac": float(np.mean([r["converged"] for r in done])),
                                   "row/stable_frac": float(np.mean([r["stable"] for r in done])), "row/seconds": time.perf_counter() - t0})
            lanes += done
    return lanes


def finish_grid(plan: GridPlan, lanes: list[dict], wandb_run=None) -> dict:
    """The table, fractal.json and pictures; the W&B summary; the closing lines."""
    out = write_report(plan.run_dir, lanes, plan.row, plan.col)
    if wandb_run is not None:
        import wandb

        run_dir = plan.run_dir
        wandb_run.log({"trainability": wandb.Image(str(run_dir / "trainability.png")), "panels": wandb.Image(str(run_dir / "panels.png")),
                       "cells": wandb.Table(dataframe=out["cells"].astype({"error": str}))})
        wandb_run.summary.update(finite_or_none({"fractal_dimension": out["fractal"]["dimension"], "trainable_fraction": out["fractal"]["trainable_fraction"]}))
    f = out["fractal"]
    console.print(f"trainable {f['trainable_fraction']:.0%} of {len(lanes)} cells; boundary box-counting dimension {f['dimension']:.3f} "
                  f"(median local slope {f['dimension_median_local']:.3f}, {f['edge_pixel_count']} edge pixels)")
    console.print(f"pictures: [bold]{plan.run_dir / 'trainability.png'}[/bold] and [bold]{plan.run_dir / 'panels.png'}[/bold]; cells: {plan.run_dir / 'cells.parquet'}")
    return out


def open_grid(plan: GridPlan) -> tuple[str, object]:
    """The writer's start (the single process, or rank 0), with the run dir's lock held: grid.json and the W&B run.
    Returns the spec's digest and the W&B run (None when disabled)."""
    from fractal_vmap.tracking import start_run

    cfg = plan.cfg
    check_run_dir(plan.run_dir, plan.spec)  # again, under the lock: another grid may have created it since plan_grid looked
    digest = open_run_dir(plan.run_dir, plan.spec, plan.device, {"train_examples": len(plan.examples), "dropped_examples": plan.dropped})
    wandb_run = start_run(cfg.wandb, cfg.wandb_project, cfg.wandb_entity, plan.run_dir.name, {"spec": plan.spec}, plan.run_dir, "grid")
    console.print(f"grid {plan.row.name} ({len(plan.row.values)} rows) x {plan.col.name} ({len(plan.col.values)} lanes a row) on {plan.device}, run dir [bold]{plan.run_dir}[/bold]")
    console.print(f"{len(plan.examples)} training examples ({plan.dropped} dropped: no supervised token within max_seq_len)")
    return digest, wandb_run


def run_grid(cfg: GridConfig) -> Path:
    """The `grid` command in one process: plan, train every row (resuming finished ones), then write the tables and
    pictures. Many workers: shard.py."""
    plan = plan_grid(cfg)
    cfg.run_dir = str(plan.run_dir)  # what an interrupted run's resume command names (cli.py)
    with run_dir_lock(plan.run_dir):
        digest, wandb_run = open_grid(plan)
        try:
            lanes = run_rows(plan, digest, wandb_run)
            finish_grid(plan, lanes, wandb_run)
        finally:
            if wandb_run is not None:
                wandb_run.finish()
    return plan.run_dir
