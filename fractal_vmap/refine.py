"""`grid --refine K` (either task): a boundary map at (rows - 1) x 2^K + 1 by (cols - 1) x 2^K + 1 cells that trains
only near the boundary. Level 0 trains the --rows x --cols grid (every 2^K-th cell of the fine grid); each next level
halves the spacing inside the squares of the level before whose corners disagree in phase, and inside their
neighbouring squares, so a thin feature next to the boundary is not missed. A cell no level trained takes the result
of its coarse parent (the trained cell at the corner of its square at the coarsest level that has one) and is marked
`trained = false` in cells.parquet; `level` says at which level a cell was trained (or filled).

Every level's values are the fine grid's own values, and a lane's numbers do not depend on which lanes train beside
it (paper.py, engine.py), so a trained cell equals the same cell of a full fine grid bit for bit: refinement can only be wrong
where it did not look (islands inside squares whose corners agree: the known weakness of border tracing).

Layout: the run dir as every grid's, except `rows/` holds one file a level (`row_XXXX.json` = level XXXX, the lanes it
trained, each with its fine-grid indices), so a rerun resumes level by level.
"""

import json
import os
import time
from pathlib import Path

import numpy as np
from rich.console import Console

from fractal_vmap.axes import Axis, make_axis
from fractal_vmap.errors import UserError
from fractal_vmap.files import finite_or_none
from fractal_vmap.lock import run_dir_lock
from fractal_vmap.options import GridConfig
from fractal_vmap.paper import LANE_CHUNK
from fractal_vmap.report import dimension_note, write_report
from fractal_vmap.rundir import open_run_dir, read_row, row_path, write_row

MAX_LEVELS = 6  # 2^6 = 64 fine cells per coarse spacing: beyond that a zoom serves better
# host memory a fine cell takes, trained or not, measured with tracemalloc on a 129 x 129 map (CPython 3.11; the
# process's peak RSS grew by the same per cell from 129^2 to 385^2 cells): the filled cell's dict and its cells.parquet
# row at the peak of write_report (2287 bytes), and for a nanochat grid also its FinetuneConfig, which plan_grid makes
# for every fine cell (1743 bytes). A trained cell's loss curve comes on top.
MAP_CELL_BYTES, NANOCHAT_CELL_BYTES = 2300, 1750
console = Console()


def physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system that knows
        return None


def check_map_fits(cfg: GridConfig, K: int) -> None:
    """Refuse, before anything is planned, a fine map whose per-cell tables alone outgrow this machine's memory."""
    H, W = (cfg.rows - 1) * 2**K + 1, (cfg.cols - 1) * 2**K + 1
    per_cell = MAP_CELL_BYTES + (NANOCHAT_CELL_BYTES if cfg.task != "paper-mlp" else 0)
    need, have = H * W * per_cell, physical_memory()
    if have is not None and need > have:
        raise UserError(
            f"--refine {K} on --rows {cfg.rows} --cols {cfg.cols} makes a {H} x {W} map "
            f"({H * W:.3g} cells): its cell tables alone would take about {need / 2**30:,.0f} GiB "
            f"({per_cell} bytes a cell), more than this machine's {have / 2**30:.0f} GiB: use fewer "
            "--rows/--cols or --refine levels, or zoom into a box (fractal-vmap boxes)"
        )


def fine_axes(cfg: GridConfig, K: int) -> tuple[Axis, Axis]:
    """The finest level's axes: (n - 1) x 2^K + 1 values over the same ranges (level 0's values are every 2^K-th)."""
    from fractal_vmap.axes import AXES, parse_axes
    from fractal_vmap.paper_task import PAPER_AXES, SPACE_AXES

    if cfg.task == "paper-mlp":
        (rows_axis, cols_axis), table = SPACE_AXES[cfg.phase_space], PAPER_AXES
    else:
        (rows_axis, cols_axis), table = parse_axes(cfg.axes), AXES
    return (
        make_axis(rows_axis, (cfg.rows - 1) * 2**K + 1, cfg.row_min, cfg.row_max, cfg.row_scale, "rows", table),
        make_axis(cols_axis, (cfg.cols - 1) * 2**K + 1, cfg.col_min, cfg.col_max, cfg.col_scale, "cols", table),
    )


def to_refine(phase: np.ndarray, known: np.ndarray, step: int) -> list[tuple[int, int]]:
    """Fine-grid cells at spacing `step` to train next: those inside (or on the edges of) the squares of spacing 2 x step
    whose known corners disagree in phase, and of the squares around them. phase: bool [H, W] (valid where known)."""
    H, W = phase.shape
    big = 2 * step
    corners = [(i, j) for i in range(0, H, big) for j in range(0, W, big)]
    marked = set()
    for i, j in corners:
        if i + big >= H or j + big >= W:
            continue
        square = [(a, b) for a in (i, i + big) for b in (j, j + big)]
        values = {bool(phase[a, b]) for a, b in square if known[a, b]}
        if len(values) > 1:  # the boundary crosses this square: it and its 8 neighbours
            for di in (-big, 0, big):
                for dj in (-big, 0, big):
                    if 0 <= i + di and i + di + big < H and 0 <= j + dj and j + dj + big < W:
                        marked.add((i + di, j + dj))
    cells = {(a, b) for i, j in marked for a in range(i, i + big + 1, step) for b in range(j, j + big + 1, step)}
    return sorted(c for c in cells if not known[c])


def train_nanochat_points(plan, points: list[tuple[int, int]]) -> list[dict]:
    """Train the fine-grid cells `points` of a nanochat grid as one row of lanes (grid.train_row: lane chunks, memory,
    out-of-memory halving); one result a cell."""
    from fractal_vmap.grid import train_row

    results, _ = train_row(plan, [plan.cells[i][j] for i, j in points])
    for (i, j), r in zip(points, results):
        r.update(grid_i=i, grid_j=j)
    return results


def filled(
    results: dict[tuple[int, int], dict], levels: dict[tuple[int, int], int], H: int, W: int, K: int
) -> list[dict]:
    """Every fine cell: a trained one as it is (trained = true, its level), another from its coarse parent: the corner
    of its square at the finest level whose corner was trained (trained = false, the parent's level)."""
    out = []
    for i in range(H):
        for j in range(W):
            if (i, j) in results:
                out.append({**results[(i, j)], "trained": True, "level": levels[(i, j)]})
                continue
            for k in range(K - 1, -1, -1):  # the finest parent first
                step = 2 ** (K - k)
                parent = (i - i % step, j - j % step)
                if parent in results:
                    break
            out.append(
                {**results[parent], "grid_i": i, "grid_j": j, "trained": False, "level": levels[parent], "losses": []}
            )
    return out


def run_refined_grid(cfg: GridConfig) -> Path:
    """Level 0, then K levels of refinement near the boundary, then the tables and pictures of the filled fine grid.
    (No W&B run: the files are the record.)"""
    from fractal_vmap.tracking import refuse_wandb

    refuse_wandb(cfg, "a refined grid")
    K = cfg.refine
    if not 1 <= K <= MAX_LEVELS:
        raise UserError(f"--refine {K}: use 1 to {MAX_LEVELS} levels (each halves the spacing near the boundary)")
    if cfg.rows < 2 or cfg.cols < 2:
        raise UserError(
            f"--refine needs a coarse grid of at least 2 x 2 cells, got --rows {cfg.rows} --cols {cfg.cols}"
        )
    check_map_fits(cfg, K)
    if cfg.task == "paper-mlp":
        from fractal_vmap.paper_task import plan_paper_grid, train_paper_cells

        plan, train = plan_paper_grid(cfg, fine_axes(cfg, K)), train_paper_cells
    else:
        from fractal_vmap.grid import plan_grid

        plan, train = plan_grid(cfg, fine_axes(cfg, K)), train_nanochat_points
    cfg.run_dir = str(plan.run_dir)  # what an interrupted run's resume command names (cli.py)
    H, W = len(plan.row.values), len(plan.col.values)
    results: dict[tuple[int, int], dict] = {}
    levels: dict[tuple[int, int], int] = {}
    with run_dir_lock(plan.run_dir):
        digest = open_run_dir(plan.run_dir, plan.spec, plan.device, {"fine_cells": H * W})
        console.print(
            f"{cfg.task} grid refined {K} levels: {cfg.rows} x {cfg.cols} coarse cells to {H} x {W}, run dir [bold]{plan.run_dir}[/bold]",
            soft_wrap=True,
        )
        for k in range(K + 1):
            step = 2 ** (K - k)
            known = np.zeros((H, W), dtype=bool)
            phase = np.zeros((H, W), dtype=bool)
            for (i, j), r in results.items():
                known[i, j], phase[i, j] = True, r["converged"]
            points = (
                [(i, j) for i in range(0, H, step) for j in range(0, W, step)]
                if k == 0
                else to_refine(phase, known, step)
            )
            path = row_path(plan.run_dir, k)
            done = read_row(path, len(points), digest) if points else []
            if done is None:
                t0 = time.perf_counter()
                trained = train(plan, points)
                write_row(path, k, digest, trained, time.perf_counter() - t0, min(LANE_CHUNK, len(points)))
                done = json.loads(json.dumps(finite_or_none(trained)))  # as a resumed run reads it back: NaN is null
            for r in done:
                results[(r["grid_i"], r["grid_j"])], levels[(r["grid_i"], r["grid_j"])] = r, k
            console.print(
                f"level {k}: {len(points)} cells trained at spacing {step} ({len(results)} of {H * W} so far)",
                highlight=False,
            )
        out = write_report(plan.run_dir, filled(results, levels, H, W, K), plan.row, plan.col)
    f = out["fractal"]
    console.print(
        f"trained {len(results)} of {H * W} cells ({len(results) / (H * W):.1%}); "
        f"trainable {f['trainable_fraction']:.0%} of the map; "
        f"{dimension_note(f)}",
        highlight=False,
        soft_wrap=True,
    )
    console.print(
        f"pictures: [bold]{plan.run_dir / 'trainability.png'}[/bold]; cells: {plan.run_dir / 'cells.parquet'}",
        soft_wrap=True,
    )
    return plan.run_dir
