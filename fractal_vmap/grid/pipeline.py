"""The grid pipeline, one for every task (tasks/) and every way of covering a grid: a plain grid (every row), a
refined grid (refine.py: level 0 on a coarse grid, then levels near the boundary) and a zoom (zoom.py: exact axis
values inside a box of a parent). Four steps:

  plan: the task's every check and load, each bad input one clear line, before the run dir is touched;
  open: the run dir's lock (lock.py), grid.json (rundir.py), the grid's one W&B run (tracking.py);
  train: the units not yet done, each written as its file when it finishes (a unit is a row, or a refinement level,
    whose file is compact: analysis/runs.py), so a rerun resumes unit by unit;
  finish: cells.parquet, fractal.json and the pictures (analysis/report.py), W&B's summary, the closing lines.

Rows over many workers: shard.py (the same plan, open, train and finish, split by rank).
"""

import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from fractal_vmap.analysis import runs
from fractal_vmap.analysis.cellmap import CellMap
from fractal_vmap.analysis.report import dimension_note, write_report
from fractal_vmap.analysis.runs import Table, lanes_of, level_path, level_table, read_row, row_path, table_of
from fractal_vmap.axes import Axis, make_axis
from fractal_vmap.console import console
from fractal_vmap.files import finite_or_none
from fractal_vmap.grid import refine, twin
from fractal_vmap.grid.lock import run_dir_lock
from fractal_vmap.grid.rundir import (
    check_run_dir,
    default_run_dir,
    mixed_rows_note,
    open_run_dir,
    this_machine,
    write_level,
    write_row,
)
from fractal_vmap.options import GridConfig
from fractal_vmap.progress import GridProgress
from fractal_vmap.tasks import get_task
from fractal_vmap.tracking import check_wandb, closing_run, start_run


def grid_axes(cfg: GridConfig, task=None) -> tuple[Axis, Axis]:
    """The grid's axes from its options: --rows x --cols values, or a refined grid's finest level (refine.py)."""
    task = task or get_task(cfg.task)
    rows_axis, cols_axis = task.axis_names(cfg)
    rows, cols = refine.fine_size(cfg.rows, cfg.refine), refine.fine_size(cfg.cols, cfg.refine)
    return (
        make_axis(rows_axis, rows, cfg.row_min, cfg.row_max, cfg.row_scale, "rows", task.AXES),
        make_axis(cols_axis, cols, cfg.col_min, cfg.col_max, cfg.col_scale, "cols", task.AXES),
    )


def plan_grid(cfg: GridConfig, axes: tuple[Axis, Axis] | None = None, parent: dict | None = None):
    """The task's plan of the grid: its checks and loads, on the axes of the options or on `axes` (a zoom's exact
    values, with `parent` its parent run and box)."""
    task = get_task(cfg.task)
    check_wandb(cfg)
    refine.check(cfg, task.CELL_BYTES)
    row, col = axes or grid_axes(cfg, task)
    plan = task.plan(cfg, row, col, parent)
    twin.check(cfg, plan)
    plan.run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(plan.spec, row.name, col.name)
    check_run_dir(plan.run_dir, plan.spec)
    return plan


def open_grid(plan, machines: set[tuple[str, int]] | None = None) -> tuple[str, object]:
    """The writer's start (the single process, or rank 0), with the run dir's lock held: grid.json, the one warning
    line when the units left would train at another thread count or device than the finished ones (`machines`: every
    worker's (device, threads), this process's by default), and the W&B run. Returns the spec's digest and the W&B run
    (None when disabled)."""
    cfg = plan.cfg
    check_run_dir(plan.run_dir, plan.spec)  # again, under the lock: another grid may have made it since plan looked
    digest = open_run_dir(plan.run_dir, plan.spec, plan.device, plan.data)
    units = 1 if cfg.twin_of else cfg.refine + 1 if cfg.refine else len(plan.row.values)
    machines = machines or {this_machine(plan.device)}
    note = mixed_rows_note(plan.run_dir, digest, units, machines, plan.device.type == "cuda")
    if note:
        console.print(f"[yellow]warning: {note}[/yellow]", soft_wrap=True, highlight=False)
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
    shape = f"{plan.row.name} ({len(plan.row.values)} rows) x {plan.col.name} ({len(plan.col.values)} cols)"
    how = f"refined {cfg.refine} levels from {cfg.rows} x {cfg.cols}" if cfg.refine else "a row of lanes at a time"
    console.print(f"{cfg.task} grid {shape}, {how}, on {plan.device}, run dir [bold]{plan.run_dir}[/bold]")
    console.print(plan.describe(), highlight=False)
    return digest, wandb_run


def read_unit(plan, digest: str, k: int, cells: int) -> list[dict] | None:
    """Unit k's results from its row file, if it finished under this spec (an empty unit is done)."""
    return read_row(row_path(plan.run_dir, k), cells, digest) if cells else []


def read_level(plan, digest: str, k: int, cells: int) -> Table | None:
    """A refined grid's level k from its level file (or from the JSON row file a run before compact levels wrote), if
    it finished under this spec with `cells` cells."""
    found = runs.read_level(level_path(plan.run_dir, k), digest)
    if found is not None and found[0]["cells"] == cells:
        return level_table(*found)
    lanes = read_unit(plan, digest, k, cells) if row_path(plan.run_dir, k).exists() else None
    return None if lanes is None else table_of(lanes)


def train_unit(
    plan,
    digest: str,
    k: int,
    points: list[tuple[int, int]],
    progress,
    rank: int = 0,
    wandb_run=None,
    description: str = "",
    level: bool = False,
):
    """Train unit k of the grid (a row, or with `level` a refinement level: its cells `points`) and write it: a row as
    row file k (JSON lanes), a level as level file k (a table, runs.py). Returns the cells' results as a resumed run
    reads them back (a row's strict JSON: NaN is null; a level's table)."""
    t0 = time.perf_counter()
    progress.row_started(k, description, len(points))
    results, chunk = plan.train(points, progress)  # a task gives lanes (dicts) or a table (columns)
    if level:
        table = results if isinstance(results, dict) else table_of(results)
        done = write_level(level_path(plan.run_dir, k), k, digest, table, time.perf_counter() - t0, chunk, plan.device)
        converged, stable = done["converged"], done["stable"]
    else:
        lanes = results if isinstance(results, list) else lanes_of(results)
        path = row_path(plan.run_dir, k)
        done = write_row(path, k, digest, lanes, time.perf_counter() - t0, chunk, plan.device, rank)
        converged, stable = [r["converged"] for r in done], [r["stable"] for r in done]
    progress.row_finished(k)
    if wandb_run is not None:  # step = the unit: monotone across resumes, which continue the same W&B run
        wandb_run.log(
            {
                "row": k,
                "row/converged_frac": float(np.mean(converged)),
                "row/stable_frac": float(np.mean(stable)),
                "row/seconds": time.perf_counter() - t0,
            },
            step=k,
        )
    return done


def row_points(plan, i: int) -> list[tuple[int, int]]:
    return [(i, j) for j in range(len(plan.col.values))]


def run_rows(
    plan, digest: str, wandb_run=None, rows: Iterable[int] | None = None, progress=None, rank: int = 0
) -> list[dict]:
    """Train every row (or the rows `rows` yields: a worker's claims, shard.py) without a finished file of this spec;
    returns the lanes of those rows, in the order gone through. `rank` (the worker's) is recorded in each row file."""
    row, H = plan.row, len(plan.row.values)
    done = [read_unit(plan, digest, i, len(plan.col.values)) for i in range(H)]
    lanes: list[dict] = []
    with progress or GridProgress(
        console, [plan.steps(row_points(plan, i)) for i in range(H)], rate=plan.rate
    ) as progress:
        for i in (i for i in range(H) if done[i] is not None):
            progress.row_skipped(i)
        for i in range(H) if rows is None else rows:
            if done[i] is None:
                done[i] = train_unit(
                    plan, digest, i, row_points(plan, i), progress, rank, wandb_run, f"{row.name}={row.values[i]:g}"
                )
            lanes += done[i]
    return lanes


def run_levels(plan, digest: str, wandb_run=None) -> tuple[CellMap, int]:
    """A refined grid (refine.py): level 0 on the coarse grid, then each level near the boundary the levels before
    found, each a unit. Returns the map (the cells no level trained showing their coarse parent's result) and the
    number of cells trained."""
    K, H, W = plan.cfg.refine, len(plan.row.values), len(plan.col.values)
    known, phase = np.zeros((H, W), dtype=bool), np.zeros((H, W), dtype=bool)
    trained_at = np.full((H, W), -1, dtype=np.int32)  # each trained cell's entry in the levels' table
    tables: list[Table] = []
    with GridProgress(console, [], unit="level", rate=plan.rate) as progress:
        for k in range(K + 1):
            points = refine.level_points(known, phase, k, K)
            progress.add_row(plan.steps(points))
            spacing, n = 2 ** (K - k), int(known.sum())
            done = read_level(plan, digest, k, len(points)) if points else None
            if done is not None or not points:
                progress.row_skipped(k)
            else:
                what = f"spacing {spacing} ({n + len(points)} of {H * W} cells trained by then)"
                done = train_unit(plan, digest, k, points, progress, 0, wandb_run, what, level=True)
            if not points:
                continue
            i, j = done["grid_i"].astype(np.int64), done["grid_j"].astype(np.int64)
            known[i, j], phase[i, j] = True, done["converged"].astype(bool)
            trained_at[i, j] = n + np.arange(len(i))
            level = np.full(len(i), k, dtype=np.int8)
            tables.append({**{c: v for c, v in done.items() if c != "losses"}, "level": level})
    table = {c: np.concatenate([t[c] for t in tables]) for c in tables[0]}
    source = refine.filled(trained_at, K)
    per_cell = {"trained": trained_at >= 0, "level": table["level"][source]}
    return CellMap(table, source, per_cell), len(table["level"])


def run_twin(plan, digest: str, wandb_run=None) -> tuple[list[dict], int]:
    """A twin (twin.py): the parent's boundary neighbourhood as one unit (resumed if done), the other cells from the
    parent. Returns every cell (trained = true or false) and the number trained."""
    points, cells = twin.twin_points(Path(plan.cfg.twin_of))
    lanes = twin.parent_lanes(cells)
    with GridProgress(console, [plan.steps(points)], unit="unit", rate=plan.rate) as progress:
        done = read_unit(plan, digest, 0, len(points))
        if done is not None:
            progress.row_skipped(0)
        else:
            what = f"the parent's boundary neighbourhood ({len(points)} of {len(lanes)} cells)"
            done = train_unit(plan, digest, 0, points, progress, 0, wandb_run, what)
    trained = {(r["grid_i"], r["grid_j"]): {**r, "trained": True} for r in done}
    return [trained.get(key) or {**lane, "trained": False} for key, lane in sorted(lanes.items())], len(trained)


def finish_grid(plan, lanes: list[dict] | CellMap, wandb_run=None, trained: int | None = None) -> dict:
    """The table, fractal.json and pictures; the W&B summary; the closing lines. `lanes`: a grid's lanes, or a refined
    grid's map (run_levels); `trained`: the cells a refined grid trained (the others are filled in)."""
    out = write_report(plan.run_dir, lanes, plan.row, plan.col, plan.cell_lrs())
    cells_total = len(plan.row.values) * len(plan.col.values)
    if wandb_run is not None:
        import wandb

        run_dir, cells = plan.run_dir, out["cells"]
        logged = {
            "trainability": wandb.Image(str(run_dir / "trainability.png")),
            "panels": wandb.Image(str(run_dir / "panels.png")),
        }
        if cells is not None:  # a map too large to read back as a frame is in cells.parquet alone
            logged["cells"] = wandb.Table(dataframe=cells.astype(object).where(cells.notna(), None))  # NaN -> None
        wandb_run.log(logged, step=len(plan.row.values))
        wandb_run.summary.update(
            finite_or_none(
                {
                    "fractal_dimension": out["fractal"]["dimension"],
                    "trainable_fraction": out["fractal"]["trainable_fraction"],
                }
            )
        )
    f = out["fractal"]
    trainable = f"trainable {f['trainable_fraction']:.0%}"
    if trained is None:
        counted = f"{trainable} of {len(lanes)} cells"
    else:  # a refined map: the cells no level trained took a coarser cell's result
        counted = f"trained {trained} of {cells_total} cells ({trained / cells_total:.1%}); {trainable} of the map"
    console.print(f"{counted}; {dimension_note(f)}", highlight=False, style="yellow" if f["caveat"] else None)
    console.print(
        f"pictures: [bold]{plan.run_dir / 'trainability.png'}[/bold] and [bold]{plan.run_dir / 'panels.png'}[/bold] "
        f"(the map at one pixel a cell: {plan.run_dir / 'map.png'}); "
        f"cells: {plan.run_dir / 'cells.parquet'}"
    )
    return out


def run_grid(cfg: GridConfig, axes: tuple[Axis, Axis] | None = None, parent: dict | None = None) -> Path:
    """A grid in one process, any task, plain or refined: plan, open, train the units not done yet, finish."""
    plan = plan_grid(cfg, axes, parent)
    cfg.run_dir = str(plan.run_dir)  # what an interrupted run's resume command names (cli.py)
    with run_dir_lock(plan.run_dir):
        digest, wandb_run = open_grid(plan)
        with closing_run(wandb_run, plan.run_dir / "wandb"):
            if cfg.twin_of:  # twin.py: the parent's boundary neighbourhood, the rest from the parent
                lanes, trained = run_twin(plan, digest, wandb_run)
                finish_grid(plan, lanes, wandb_run, trained)
            elif cfg.refine:
                lanes, trained = run_levels(plan, digest, wandb_run)
                finish_grid(plan, lanes, wandb_run, trained)
            else:
                finish_grid(plan, run_rows(plan, digest, wandb_run), wandb_run)
    return plan.run_dir
