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

Layout: the run dir as every grid's, except `rows/` holds one compact file a level (`row_XXXX.npz` = level XXXX,
the cells it trained as columns, each with its fine-grid indices: analysis/runs.py), so a rerun resumes level by level;
a level a run before these files wrote as `row_XXXX.json` is still read. The finish works on arrays
(analysis/cellmap.py): a 4097 x 4097 map (--rows 257 --cols 257 --refine 4) finishes in a few minutes and ~4 GB.
"""

import os

import numpy as np

from fractal_vmap.errors import UserError
from fractal_vmap.options import GridConfig

MAX_LEVELS = 6  # 2^6 = 64 fine cells per coarse spacing: beyond that a zoom serves better
# host memory a fine cell takes at the finish, trained or not (pipeline.run_levels' CellMap, then report.write_report:
# its per-cell arrays, the pictures' float64 maps and their shading; cells.parquet goes in fixed blocks): 177 bytes
# by tracemalloc from 513^2 to 769^2 (tests/test_probe.py), and the 4097^2 paper map's peak RSS, 3.7-4.1 GB, is
# ~0.6 GB of imports and 190-200 bytes a cell; a task's own per-cell state comes on top (its CELL_BYTES)
MAP_CELL_BYTES = 200


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


def level_points(known: np.ndarray, phase: np.ndarray, k: int, K: int) -> list[tuple[int, int]]:
    """The fine-grid cells level k of K trains: every 2^K-th cell at level 0, then (to_refine) the cells near the
    boundary the levels before show (`known`, `phase`: bool [H, W], which fine cells were trained, and which of them
    trained)."""
    H, W = known.shape
    step = 2 ** (K - k)
    if k == 0:
        return [(i, j) for i in range(0, H, step) for j in range(0, W, step)]
    return to_refine(phase, known, step)


def to_refine(phase: np.ndarray, known: np.ndarray, step: int) -> list[tuple[int, int]]:
    """Fine-grid cells at spacing `step` to train next, in row-major order: those inside (or on the edges of) the
    squares of spacing 2 x step whose known corners disagree in phase, and of the squares around them. phase: bool
    [H, W] (valid where known). Array operations on the coarse lattice: a 4097^2 map's last level has 4M squares."""
    H, W = phase.shape
    big = 2 * step
    si, sj = (H - 1) // big, (W - 1) // big  # whole squares along each side (their far corner inside the grid)
    if si < 1 or sj < 1:
        return []
    p, kn = phase[: si * big + 1 : big, : sj * big + 1 : big], known[: si * big + 1 : big, : sj * big + 1 : big]
    corners = [(slice(a, a + si), slice(b, b + sj)) for a in (0, 1) for b in (0, 1)]
    any_true = np.zeros((si, sj), dtype=bool)
    any_false = np.zeros((si, sj), dtype=bool)
    for c in corners:
        any_true |= kn[c] & p[c]
        any_false |= kn[c] & ~p[c]
    crossed = np.pad(any_true & any_false, 1)  # the boundary crosses these squares: they and their 8 neighbours
    marked = np.zeros((si, sj), dtype=bool)
    for di in (0, 1, 2):
        for dj in (0, 1, 2):
            marked |= crossed[di : di + si, dj : dj + sj]
    cells = np.zeros((2 * si + 1, 2 * sj + 1), dtype=bool)  # the lattice of spacing `step`
    for di in (0, 1, 2):
        for dj in (0, 1, 2):
            cells[di : di + 2 * si : 2, dj : dj + 2 * sj : 2] |= marked
    cells &= ~known[: si * big + 1 : step, : sj * big + 1 : step]
    a, b = np.nonzero(cells)
    return list(zip((a * step).tolist(), (b * step).tolist()))


def filled(trained_at: np.ndarray, K: int) -> np.ndarray:
    """Which trained cell every fine cell shows: itself where trained, else its coarse parent, the corner of its square
    at the finest level whose corner was trained. `trained_at`: int [H, W], the index of each fine cell's result in the
    trained cells' table, -1 where no level trained it. Returns int [H, W] indices into that table (-1: no parent, which
    a finished map never has: level 0 trains every corner)."""
    H, W = trained_at.shape
    source = np.full((H, W), -1, dtype=trained_at.dtype)
    for k in range(K):  # the coarsest parents first, each finer level's overwriting them
        step = 2 ** (K - k)
        parents = trained_at[(np.arange(H) // step * step)[:, None], (np.arange(W) // step * step)[None, :]]
        np.copyto(source, parents, where=parents >= 0)
    np.copyto(source, trained_at, where=trained_at >= 0)
    return source
