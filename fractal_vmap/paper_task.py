"""`grid --task paper-mlp`: the paper's MLP (paper.py) as a grid with the same run dir as a nanochat grid: grid.json,
one row file a row (each lane's loss curve and labels), cells.parquet, fractal.json and both pictures, resumed row by
row, one writer at a time. A row is one `train_paper_lanes` call over the row's cells (its lanes' numbers do not
depend on their chunk: paper.py), labelled with the same measure and threshold as every grid (fractal.py).

The axes follow --phase_space: lr_vs_lr has rows = lr1 (output layer) and cols = lr0 (input layer), by default log10
lr in [-3, 6] on both (the notebook's first picture); offset_vs_lr has rows = lr (both layers) and cols = the offset
added to every initial W0 weight. A zoom (zoom.py) passes the parent's exact axis values instead of a range.
"""

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import track

from fractal_vmap.axes import Axis, make_axis
from fractal_vmap.errors import UserError
from fractal_vmap.files import finite_or_none
from fractal_vmap.fractal import convergence_measure, trainability
from fractal_vmap.lock import run_dir_lock
from fractal_vmap.options import GridConfig
from fractal_vmap.paper import (
    DEFAULT_VIEW,
    LANE_CHUNK,
    PHASE_SPACES,
    PaperConfig,
    check_config,
    num_params,
    num_points,
    train_paper_lanes,
)
from fractal_vmap.recipe import resolve_device
from fractal_vmap.report import dimension_note, write_report
from fractal_vmap.rundir import check_run_dir, default_run_dir, open_run_dir, read_row, row_path, write_row

TASKS = ("nanochat-sft", "paper-mlp")
DEFAULT_STEPS = 100  # gradient descent steps when --num_iterations is unset (the paper: 500 to 1000)
VIEW = (10 ** DEFAULT_VIEW[0], 10 ** DEFAULT_VIEW[1])
# axis name -> (what it sets, default (min, max), default scale); the offset's range is ours (the notebook's is not
# stated)
PAPER_AXES = {
    "lr0": ("lr0", VIEW, "log"),
    "lr1": ("lr1", VIEW, "log"),
    "lr": ("lr", VIEW, "log"),
    "offset": ("offset", (-2.0, 2.0), "linear"),
}
SPACE_AXES = {"lr_vs_lr": ("lr1", "lr0"), "offset_vs_lr": ("lr", "offset")}  # phase space -> (rows axis, cols axis)
# the grid options a paper-mlp grid reads (axes must be unset; the last four are checked where they are used: cli.py,
# tracking.refuse_wandb); every other one is nanochat's, refused when given (check_paper_fields)
PAPER_READS = (
    "task",
    "axes",
    "rows",
    "cols",
    "row_min",
    "row_max",
    "col_min",
    "col_max",
    "row_scale",
    "col_scale",
    "run_dir",
    "device",
    "dtype",
    "seed",
    "num_iterations",
    "trainable_window_steps",
    "trainable_loss_ratio_threshold",
    "refine",
    "phase_space",
    "width",
    "activation",
    "data_multiple",
    "workers",
    "wandb",
    "wandb_project",
    "wandb_entity",
)
console = Console()


def check_paper_fields(cfg: GridConfig) -> None:
    """Refuse, in one line, a nanochat setting on a paper-mlp grid, which would ignore it (the mirror of grid.py's
    refusal of a paper setting on a nanochat grid)."""
    from dataclasses import fields

    from fractal_vmap.axes import is_given

    if cfg.axes is not None:
        raise UserError(
            f"--axes {cfg.axes} is for nanochat grids: the paper task's axes follow --phase_space "
            f"({', '.join(PHASE_SPACES)})"
        )
    for f in fields(GridConfig):
        if f.name not in PAPER_READS and is_given(cfg, f.name):
            raise UserError(
                f"--{f.name} {getattr(cfg, f.name)} has no effect on a paper-mlp grid (the paper's MLP "
                "brings its own model, data and gradient descent; its learning rates are the axes, see "
                "--phase_space): drop it, or leave out --task paper-mlp"
            )


@dataclass
class PaperPlan:
    cfg: GridConfig
    paper: PaperConfig
    row: Axis
    col: Axis
    device: torch.device
    spec: dict
    run_dir: Path


def paper_config(cfg: GridConfig) -> PaperConfig:
    dtype = "float64" if cfg.dtype == "auto" else cfg.dtype
    return PaperConfig(
        width=cfg.width,
        activation=cfg.activation,
        steps=cfg.num_iterations or DEFAULT_STEPS,
        data_multiple=cfg.data_multiple,
        dtype=dtype,
        seed=cfg.seed,
    )


def make_spec(
    cfg: GridConfig, paper: PaperConfig, row: Axis, col: Axis, device: torch.device, parent: dict | None
) -> dict:
    """What the numbers depend on, in the shape every grid's spec has (the captions and `plot` read it)."""
    lr0, lr1 = (
        ("cols axis (lr0)", "rows axis (lr1)")
        if cfg.phase_space == "lr_vs_lr"
        else ("rows axis (lr)", "rows axis (lr)")
    )
    spec = {
        "axes": {"rows": asdict(row), "cols": asdict(col)},
        "settings": {
            "task": "paper-mlp",
            **asdict(paper),
            "phase_space": cfg.phase_space,
            "device": device.type,
            "trainable_window_steps": cfg.trainable_window_steps,
            "trainable_loss_ratio_threshold": cfg.trainable_loss_ratio_threshold,
        },
        "group_lrs": {"layer 0": lr0, "layer 1": lr1},
        "model": {"source": f"paper-mlp (width {paper.width}, {paper.activation}, {num_params(paper)} parameters)"},
        "dataset": {"source": f"N(0, 1) inputs and targets ({num_points(paper)} points, seed {paper.seed})"},
    }
    if cfg.refine:
        spec["settings"]["refine"] = cfg.refine  # the cells a refined grid trains depend on it (refine.py)
    if parent is not None:
        spec["parent"] = parent
    return spec


def plan_paper_grid(cfg: GridConfig, axes: tuple[Axis, Axis] | None = None, parent: dict | None = None) -> PaperPlan:
    """Every check before any work. `axes`: exact axis values (a zoom's), instead of --rows/--cols and their ranges."""
    from fractal_vmap.tracking import refuse_wandb

    refuse_wandb(cfg, "a paper-mlp grid")
    check_paper_fields(cfg)
    if cfg.phase_space not in SPACE_AXES:
        raise UserError(f"unknown --phase_space {cfg.phase_space!r}: use one of {', '.join(PHASE_SPACES)}")
    if cfg.dtype not in ("auto", "float64", "float32"):
        raise UserError(f"--dtype {cfg.dtype} for the paper task: use float64 (auto) or float32")
    paper = paper_config(cfg)
    check_config(paper)
    if axes is None:
        rows_axis, cols_axis = SPACE_AXES[cfg.phase_space]
        axes = (
            make_axis(rows_axis, cfg.rows, cfg.row_min, cfg.row_max, cfg.row_scale, "rows", PAPER_AXES),
            make_axis(cols_axis, cfg.cols, cfg.col_min, cfg.col_max, cfg.col_scale, "cols", PAPER_AXES),
        )
    row, col = axes
    device = resolve_device(cfg.device)
    spec = make_spec(cfg, paper, row, col, device, parent)
    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(spec, row.name, col.name)
    check_run_dir(run_dir, spec)
    return PaperPlan(cfg, paper, row, col, device, spec, run_dir)


def lane_results(losses: torch.Tensor, window: int, threshold: float) -> list[dict]:
    """One result a lane from its losses [steps, lanes] (NaN after a lane's first non-finite loss)."""
    curves = losses.T.numpy()
    measures = convergence_measure(curves, window, threshold)
    results = []
    for curve, measure in zip(curves, measures):
        finite = curve[np.isfinite(curve)]
        run = curve[: len(finite) + 1] if len(finite) < len(curve) else curve  # up to the first non-finite loss
        results.append(
            {
                **trainability(run, window, threshold),
                "measure": float(measure),
                "final_loss": float(run[-1]),
                "avg_loss": float(np.mean(run)),
                "steps": len(run),
                "total_steps": len(curve),
                "losses": run.tolist(),
            }
        )
    return results


def train_paper_cells(plan: PaperPlan, points: list[tuple[int, int]]) -> list[dict]:
    """Train the cells `points` ((row, col) indices: a row, or a refinement level's cells, refine.py) as the lanes of one
    call, each at its axis values (phase_lanes' mapping); one result a cell."""
    rows = torch.tensor([plan.row.values[i] for i, _ in points], dtype=torch.float64)
    cols = torch.tensor([plan.col.values[j] for _, j in points], dtype=torch.float64)
    lr0, lr1, offset = (
        (cols, rows, torch.zeros_like(rows)) if plan.cfg.phase_space == "lr_vs_lr" else (rows, rows, cols)
    )
    chunk = LANE_CHUNK if plan.device.type == "cpu" else len(points)  # a GPU takes them all at once
    losses = train_paper_lanes(plan.paper, lr0, lr1, offset, chunk=chunk, device=plan.device)
    results = lane_results(losses, plan.cfg.trainable_window_steps, plan.cfg.trainable_loss_ratio_threshold)
    for (i, j), r in zip(points, results):
        r.update(grid_i=i, grid_j=j)
    return results


def run_paper_grid(cfg: GridConfig, axes: tuple[Axis, Axis] | None = None, parent: dict | None = None) -> Path:
    """Plan, train every row without a finished file of this spec, then the tables and pictures."""
    plan = plan_paper_grid(cfg, axes, parent)
    cfg.run_dir = str(plan.run_dir)  # what an interrupted run's resume command names (cli.py)
    rows = len(plan.row.values)
    with run_dir_lock(plan.run_dir):
        digest = open_run_dir(plan.run_dir, plan.spec, plan.device, {"train_points": num_points(plan.paper)})
        console.print(
            f"paper-mlp grid {plan.row.name} ({rows} rows) x {plan.col.name} ({len(plan.col.values)} lanes a row) on {plan.device}, "
            f"run dir [bold]{plan.run_dir}[/bold]",
            soft_wrap=True,
        )
        done = [read_row(row_path(plan.run_dir, i), len(plan.col.values), digest) for i in range(rows)]
        if any(d is not None for d in done):
            console.print(f"resuming: {sum(d is not None for d in done)}/{rows} rows already done")
        for i in track(range(rows), description="rows", console=console, disable=not console.is_terminal):
            if done[i] is None:
                t0 = time.perf_counter()
                results = train_paper_cells(plan, [(i, j) for j in range(len(plan.col.values))])
                write_row(
                    row_path(plan.run_dir, i),
                    i,
                    digest,
                    results,
                    time.perf_counter() - t0,
                    min(LANE_CHUNK, len(results)),
                )
                done[i] = json.loads(json.dumps(finite_or_none(results)))  # as a resumed run reads it back: NaN is null
        out = write_report(plan.run_dir, [lane for row in done for lane in row], plan.row, plan.col)
    f = out["fractal"]
    console.print(
        f"trainable {f['trainable_fraction']:.0%} of {rows * len(plan.col.values)} cells; {dimension_note(f)}",
        highlight=False,
        soft_wrap=True,
    )
    console.print(
        f"pictures: [bold]{plan.run_dir / 'trainability.png'}[/bold] and [bold]{plan.run_dir / 'panels.png'}[/bold]; "
        f"cells: {plan.run_dir / 'cells.parquet'}",
        soft_wrap=True,
    )
    return plan.run_dir
