"""The grid: two hyperparameter axes, one vmapped row of lanes per grid row, a resumable run directory.

Run dir: grid.json (the spec), rows/row_XXXX.json (one per finished row, written atomically), cells.parquet,
trainability.png, panels.png, fractal.json. Rerunning the same command resumes; another spec is refused.
"""

import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from fractal_vmap.errors import UserError
from fractal_vmap.checkpoint import load_model
from fractal_vmap.finetune import FinetuneConfig, group_lrs, make_stream, render_split, resolve_device, total_steps, validate
from fractal_vmap.lanes import train_lanes

# axis name -> (FinetuneConfig field, default (min, max), default scale)
AXES = {
    "num_tokens": ("num_tokens", (1000.0, 8000.0), "log"),
    "lr": ("learning_rate", (1e-2, 1e2), "log"),
    "matrix_lr": ("matrix_lr", (1e-3, 1e2), "log"),
    "unembedding_lr": ("unembedding_lr", (1e-4, 1e1), "log"),
    "embedding_lr": ("embedding_lr", (1e-3, 1e2), "log"),
    "weight_decay": ("weight_decay", (0.0, 1.0), "linear"),
    "warmup_frac": ("warmup_frac", (0.0, 0.5), "linear"),
    "final_lr_frac": ("final_lr_frac", (0.0, 1.0), "linear"),
    "seed": ("seed", (0.0, 7.0), "linear"),
}
INTEGER_AXES = ("num_tokens", "seed")
# fields that change neither the numbers nor the picture: left out of the spec a resumed run must match
RUN_ONLY_FIELDS = ("run_dir", "lane_chunk", "out", "run_name", "wandb", "wandb_project", "wandb_entity", "eval_every", "eval_batches")

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


@dataclass
class Axis:
    name: str
    values: list[float]
    scale: str

    @property
    def field(self) -> str:
        return AXES[self.name][0]


def make_axis(name: str, n: int, lo: float | None, hi: float | None, scale: str, which: str) -> Axis:
    if name not in AXES:
        raise UserError(f"unknown {which} axis {name!r}: choose from {', '.join(AXES)}")
    if n < 1:
        raise UserError(f"--{which} is {n}: a grid needs at least one {which[:-1]}")
    _, (dlo, dhi), dscale = AXES[name]
    lo, hi = (dlo if lo is None else lo), (dhi if hi is None else hi)
    scale = dscale if scale == "auto" else scale
    if scale not in ("log", "linear"):
        raise UserError(f"--{which[:-1]}_scale {scale!r}: use log, linear or auto")
    if lo > hi:
        raise UserError(f"{which} axis {name}: min {lo:g} > max {hi:g}: swap them")
    if scale == "log" and lo <= 0:
        raise UserError(f"{which} axis {name} is log-spaced but its min is {lo:g}: give a positive min or --{which[:-1]}_scale linear")
    values = np.geomspace(lo, hi, n) if scale == "log" else np.linspace(lo, hi, n)
    if name in INTEGER_AXES:
        values = np.round(values)
    return Axis(name, [float(v) for v in values], scale)


def grid_axes(cfg: GridConfig) -> tuple[Axis, Axis]:
    names = [a.strip() for a in cfg.axes.split(",")]
    if len(names) != 2 or names[0] == names[1]:
        raise UserError(f"--axes {cfg.axes!r}: give two different axes, rows first, e.g. --axes num_tokens,lr")
    return (
        make_axis(names[0], cfg.rows, cfg.row_min, cfg.row_max, cfg.row_scale, "rows"),
        make_axis(names[1], cfg.cols, cfg.col_min, cfg.col_max, cfg.col_scale, "cols"),
    )


def cell_config(cfg: GridConfig, row: Axis, col: Axis, i: int, j: int) -> FinetuneConfig:
    """The `finetune` settings of cell (i, j): the base settings with both axis values put in."""
    base = {k: v for k, v in asdict(cfg).items() if k in FinetuneConfig.__dataclass_fields__}
    values = {}
    for axis, k in ((row, i), (col, j)):
        values[axis.field] = int(axis.values[k]) if axis.name in INTEGER_AXES else axis.values[k]
    return replace(FinetuneConfig(**base), **values, run_name=f"{cfg.run_name or 'grid'}-r{i}-c{j}")


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def source_id(source: str, directory: Path | None) -> dict:
    """A model or dataset id for the spec: the source string plus a content hash where there is a local file."""
    if directory is None or not directory.exists():
        return {"source": source}
    if directory.is_file():
        return {"source": source, "sha256": file_sha256(directory)}
    from fractal_vmap.checkpoint import last_step, model_files_dir

    step = last_step(directory)
    return {"source": source, "step": step, "sha256": file_sha256(model_files_dir(directory) / f"model_{step:06d}.pt")}


def model_dir(source: str) -> Path:
    from fractal_vmap.checkpoint import resolve_source
    from fractal_vmap.default import default_model_dir

    return default_model_dir() if source == "default" else resolve_source(source)


def make_spec(cfg: GridConfig, row: Axis, col: Axis, model_path: Path) -> dict:
    settings = {k: v for k, v in asdict(cfg).items() if k not in RUN_ONLY_FIELDS}
    dataset_path = Path(cfg.dataset) if cfg.dataset != "default" else None
    return {
        "axes": {"rows": asdict(row), "cols": asdict(col)},
        "settings": settings,
        "model": source_id(cfg.model, model_path),
        "dataset": source_id(cfg.dataset, dataset_path),
    }


def environment(device: torch.device) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("fractal-vmap")
    except PackageNotFoundError:  # run from a checkout on PYTHONPATH (the GPU machines)
        ours = "checkout"
    return {
        "fractal_vmap": ours, "torch": torch.__version__, "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def write_atomic(path: Path, text: str) -> None:
    """Write to a temp file beside `path`, then rename: a reader never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def open_run_dir(cfg: GridConfig, spec: dict, device: torch.device, data: dict) -> Path:
    """Create the run dir with grid.json, or reopen it when its spec matches; refuse another spec."""
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    run_dir = Path(cfg.run_dir or f"runs/grid-{spec['axes']['rows']['name']}-{spec['axes']['cols']['name']}-{digest}")
    grid_json = run_dir / "grid.json"
    if grid_json.exists():
        old = json.loads(grid_json.read_text())
        if old["spec"] != json.loads(json.dumps(spec)):
            changed = sorted(k for k in set(old["spec"]) | set(spec) if old["spec"].get(k) != json.loads(json.dumps(spec)).get(k))
            raise UserError(f"{run_dir} holds a grid with another spec (differs in {', '.join(changed)}): pass a new --run_dir or rerun the same command")
    else:
        (run_dir / "rows").mkdir(parents=True, exist_ok=True)
        write_atomic(grid_json, json.dumps({"spec": spec, "environment": environment(device), "data": data}, indent=2))
    (run_dir / "rows").mkdir(exist_ok=True)
    return run_dir


def read_row(path: Path, cols: int) -> list[dict] | None:
    """A finished row's lanes, or None if the file is missing, torn or incomplete (then the row is run again)."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        console.print(f"[yellow]{path} is torn: running that row again[/yellow]")
        return None
    if not data.get("complete") or len(data.get("lanes", [])) != cols:
        return None
    return data["lanes"]


def train_row(cfg: GridConfig, cell_cfgs: list[FinetuneConfig], config, params, tokenizer, examples, device, progress) -> list[dict]:
    """Train one row in lane chunks (all lanes at once unless --lane_chunk); halve the chunk on out-of-memory."""
    seeds = sorted({c.seed for c in cell_cfgs})
    streams = {s: make_stream(cell_cfgs[0], tokenizer, examples, s) for s in seeds}
    steps = [total_steps(c, streams[c.seed].batch(0)[1]) for c in cell_cfgs]
    # on CPU, chunks of 8 lanes train fastest: a 16-lane row of the default model took 23.4 s as 2 x 8, 25 s as 1 x 16,
    # 26 s as 4 x 4 (2 cores): bigger batched matmuls against activations that outgrow the cache
    chunk = cfg.lane_chunk or (len(cell_cfgs) if device.type == "cuda" else CPU_LANE_CHUNK)
    while True:
        try:
            results = []
            for start in range(0, len(cell_cfgs), chunk):
                lanes = list(range(start, min(start + chunk, len(cell_cfgs))))
                batches = lane_batches([cell_cfgs[i].seed for i in lanes], streams, tokenizer)
                results += train_lanes([cell_cfgs[i] for i in lanes], config, params, batches, [steps[i] for i in lanes], device, progress)
            return results
        except torch.OutOfMemoryError:
            if chunk == 1:
                raise
            chunk //= 2
            torch.cuda.empty_cache()
            console.print(f"[yellow]out of memory: retrying the row with {chunk} lanes at a time[/yellow]")


def lane_batches(seeds: list[int], streams: dict, tokenizer):
    """Shared batches when every lane has the same seed, else one stream per lane stacked to [L, B, T]."""
    if len(set(seeds)) == 1:
        return streams[seeds[0]].batch
    pad_id = tokenizer.special_id("<|assistant_end|>")

    def batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [streams[s].batch(step) for s in seeds]
        T = max(x.shape[1] for x, _ in pairs)  # right-padding more columns changes no loss (causal, targets -1)
        inputs = torch.stack([torch.nn.functional.pad(x, (0, T - x.shape[1]), value=pad_id) for x, _ in pairs])
        targets = torch.stack([torch.nn.functional.pad(y, (0, T - y.shape[1]), value=-1) for _, y in pairs])
        return inputs, targets

    return batches


def cells_frame(lanes: list[dict], row: Axis, col: Axis):
    import pandas as pd

    columns = ["row", "col", row.name, col.name, "stable", "converged", "trainable_ratio", "final_loss", "avg_loss", "measure",
               "trainable_loss0", "trainable_mean_last_k", "tokens_seen", "steps", "total_steps", "learning_rate", "num_tokens_target", "seed", "error"]
    records = [{**lane, "row": lane["grid_i"], "col": lane["grid_j"]} for lane in lanes]
    return pd.DataFrame.from_records(records)[list(dict.fromkeys(columns))]  # an axis named like a result field (seed) once


def finish(run_dir: Path, lanes: list[dict], row: Axis, col: Axis) -> dict:
    """cells.parquet, fractal.json and both pictures from the finished rows."""
    from fractal_vmap.fractal import fractal_dimension
    from fractal_vmap.plot import panels, paper_image

    cells = cells_frame(lanes, row, col)
    cells.to_parquet(run_dir / "cells.parquet", index=False)
    measure = np.full((len(row.values), len(col.values)), np.nan)
    measure[cells["row"].to_numpy(), cells["col"].to_numpy()] = cells["measure"].to_numpy()
    fractal = {**fractal_dimension(measure), "rows_axis": row.name, "cols_axis": col.name,
               "trainable_fraction": float(cells["converged"].mean())}
    write_atomic(run_dir / "fractal.json", json.dumps(fractal, indent=2))
    log_rows, log_cols = row.scale == "log", col.scale == "log"
    title = f"trainable (blue) vs not (red): {row.name} x {col.name}"
    paper_image(measure, row.values, col.values, row.name, col.name, run_dir / "trainability.png", log_rows, log_cols, title)
    panels(cells, row.name, col.name, run_dir / "panels.png", log_rows, log_cols)
    return {"cells": cells, "fractal": fractal}


def run_grid(cfg: GridConfig) -> Path:
    """The `grid` command: train every row (resuming finished ones), then write the tables and pictures."""
    from fractal_vmap.tracking import start_run

    validate(cfg)
    row, col = grid_axes(cfg)
    device = resolve_device(cfg.device)
    directory = model_dir(cfg.model)  # resolved once: an hf:/wandb: source is looked up a single time
    config, params, tokenizer = load_model(str(directory), cfg.tokenizer, device)
    cell_cfgs = [[cell_config(cfg, row, col, i, j) for j in range(len(col.values))] for i in range(len(row.values))]
    for c in (c for r in cell_cfgs for c in r):  # before the run dir exists, so the corrected command can use the same dir
        validate(c)  # e.g. an lr axis reaching a non-positive value on a linear scale
        group_lrs(c, config)  # e.g. a matrix_lr axis doing the same
    examples, dropped = render_split(cfg, tokenizer, config, "train")  # dataset errors, too, before the run dir exists
    spec = make_spec(cfg, row, col, directory)
    run_dir = open_run_dir(cfg, spec, device, {"train_examples": len(examples), "dropped_examples": dropped})
    wandb_run = start_run(cfg.wandb, cfg.wandb_project, cfg.wandb_entity, run_dir.name, {"spec": spec}, run_dir, "grid")
    console.print(f"grid {row.name} ({len(row.values)} rows) x {col.name} ({len(col.values)} lanes a row) on {device}, run dir [bold]{run_dir}[/bold]")
    console.print(f"{len(examples)} training examples ({dropped} dropped: no supervised token within max_seq_len)")
    lanes: list[dict] = []
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console) as bar:
        rows_task = bar.add_task("rows", total=len(row.values), info="")
        steps_task = bar.add_task("steps", total=1, info="")
        for i, row_cfgs in enumerate(cell_cfgs):
            path = run_dir / "rows" / f"row_{i:04d}.json"
            done = read_row(path, len(col.values))
            if done is None:
                t0 = time.perf_counter()
                bar.reset(steps_task, total=None, description=f"row {i} ({row.name}={row.values[i]:g}) steps", info="")

                def progress(step: int, max_steps: int, processed: int) -> None:
                    rate = processed / max(time.perf_counter() - t0, 1e-9)
                    bar.update(steps_task, completed=step, total=max_steps, info=f"{rate:,.0f} tok/s")

                results = train_row(cfg, row_cfgs, config, params, tokenizer, examples, device, progress)
                for j, r in enumerate(results):
                    r.update(grid_i=i, grid_j=j, **{row.name: row.values[i], col.name: col.values[j]})
                write_atomic(path, json.dumps({"row": i, "complete": True, "seconds": time.perf_counter() - t0, "lanes": results}))
                done = results
                if wandb_run is not None:
                    wandb_run.log({"row": i, "row/converged_frac": float(np.mean([r["converged"] for r in done])),
                                   "row/stable_frac": float(np.mean([r["stable"] for r in done])), "row/seconds": time.perf_counter() - t0})
            lanes += done
            bar.update(rows_task, advance=1)
    out = finish(run_dir, lanes, row, col)
    if wandb_run is not None:
        import wandb

        wandb_run.log({"trainability": wandb.Image(str(run_dir / "trainability.png")), "panels": wandb.Image(str(run_dir / "panels.png")),
                       "cells": wandb.Table(dataframe=out["cells"].astype({"error": str}))})
        wandb_run.summary.update({"fractal_dimension": out["fractal"]["dimension"], "trainable_fraction": out["fractal"]["trainable_fraction"]})
        wandb_run.finish()
    f = out["fractal"]
    console.print(f"trainable {f['trainable_fraction']:.0%} of {len(lanes)} cells; boundary box-counting dimension {f['dimension']:.3f} "
                  f"(median local slope {f['dimension_median_local']:.3f}, {f['edge_pixel_count']} edge pixels)")
    console.print(f"pictures: [bold]{run_dir / 'trainability.png'}[/bold] and [bold]{run_dir / 'panels.png'}[/bold]; cells: {run_dir / 'cells.parquet'}")
    return run_dir
