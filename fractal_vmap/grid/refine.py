"""`grid --refine K` (either task), the schedule the grid pipeline follows (pipeline.run_levels): a boundary map at
(rows - 1) x 2^K + 1 by (cols - 1) x 2^K + 1 cells that trains only near the boundary. Level 0 trains the --rows x
--cols grid (every 2^K-th cell of the fine grid); each next level halves the spacing inside the squares of the level
before whose corners disagree in phase, and inside their neighbouring squares, so a thin feature next to the boundary
is not missed. A cell no level trained takes the result of its coarse parent (the trained cell at the corner of its
square at the coarsest level that has one) and is marked `trained = false` in cells.parquet; `level` says at which
level a cell was trained (or filled).

Every level's values are the fine grid's own values, and a lane's numbers do not depend on which lanes train beside
it (lanes.py), so a trained cell equals the same cell of a full fine grid bit for bit: refinement can only be wrong
where it did not look (islands inside squares whose corners agree: the known weakness of border tracing).

Layout: the run dir as every grid's, except `rows/` holds one file a level (`row_XXXX.json` = level XXXX, the lanes it
trained, each with its fine-grid indices), so a rerun resumes level by level.
"""

import os

import numpy as np

from fractal_vmap.errors import UserError
from fractal_vmap.options import GridConfig

MAX_LEVELS = 6  # 2^6 = 64 fine cells per coarse spacing: beyond that a zoom serves better
# host memory a fine cell takes, trained or not, measured with tracemalloc on a 129 x 129 map (CPython 3.11; the
# process's peak RSS grew by the same per cell from 129^2 to 385^2 cells): the filled cell's dict and its cells.parquet
# row at the peak of write_report (2287 bytes); a task's own per-cell state comes on top (its CELL_BYTES)
MAP_CELL_BYTES = 2300


def fine_size(n: int, K: int) -> int:
    """Values on an axis of n coarse values refined K levels: (n - 1) x 2^K + 1 (level 0's are every 2^K-th)."""
    return (n - 1) * 2**K + 1 if K else n


def physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system that knows
        return None


def check_map_fits(cfg: GridConfig, task_cell_bytes: int) -> None:
    """Refuse, before anything is planned, a fine map whose per-cell tables alone outgrow this machine's memory."""
    K = cfg.refine
    H, W = fine_size(cfg.rows, K), fine_size(cfg.cols, K)
    per_cell = MAP_CELL_BYTES + task_cell_bytes
    need, have = H * W * per_cell, physical_memory()
    if have is not None and need > have:
        raise UserError(
            f"--refine {K} on --rows {cfg.rows} --cols {cfg.cols} makes a {H} x {W} map "
            f"({H * W:.3g} cells): its cell tables alone would take about {need / 2**30:,.0f} GiB "
            f"({per_cell} bytes a cell), more than this machine's {have / 2**30:.0f} GiB: use fewer "
            "--rows/--cols or --refine levels, or zoom into a box (fractal-vmap boxes)"
        )


def check(cfg: GridConfig, task_cell_bytes: int = 0) -> None:
    """--refine's options, one clear line each, before any work (`task_cell_bytes`: the task's own state a fine
    cell)."""
    if not cfg.refine:
        return
    if not 1 <= cfg.refine <= MAX_LEVELS:
        raise UserError(
            f"--refine {cfg.refine}: use 1 to {MAX_LEVELS} levels (each halves the spacing near the boundary)"
        )
    if cfg.rows < 2 or cfg.cols < 2:
        raise UserError(
            f"--refine needs a coarse grid of at least 2 x 2 cells, got --rows {cfg.rows} --cols {cfg.cols}"
        )
    if cfg.workers > 1:
        raise UserError("--refine runs in one process: leave out --workers (and torchrun)")
    check_map_fits(cfg, task_cell_bytes)


def level_points(results: dict[tuple[int, int], dict], k: int, K: int, H: int, W: int) -> list[tuple[int, int]]:
    """The fine-grid cells level k of K trains: every 2^K-th cell at level 0, then (to_refine) the cells near the
    boundary the `results` of the levels before show."""
    step = 2 ** (K - k)
    if k == 0:
        return [(i, j) for i in range(0, H, step) for j in range(0, W, step)]
    known = np.zeros((H, W), dtype=bool)
    phase = np.zeros((H, W), dtype=bool)
    for (i, j), r in results.items():
        known[i, j], phase[i, j] = True, r["converged"]
    return to_refine(phase, known, step)


def to_refine(phase: np.ndarray, known: np.ndarray, step: int) -> list[tuple[int, int]]:
    """Fine-grid cells at spacing `step` to train next: those inside (or on the edges of) the squares of spacing 2 x
    step whose known corners disagree in phase, and of the squares around them. phase: bool [H, W] (valid where
    known)."""
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
