"""`grid --twin_of PARENT`: a map's twin (its `--perturb_ulp 1` or another `--seed` rerun) that trains only where a
label can change: the parent's boundary cells (those with a king neighbour of the other phase) and their neighbours.
Every other cell takes the parent's result, marked `trained = false` in cells.parquet. So a twin costs a fraction of
its map, and `compare PARENT TWIN` (analysis/compare.py) counts the cells that flip; a flip outside the trained band
cannot be seen, which is why the band reaches one cell beyond the boundary.

Layout: the run dir as every grid's, with one unit (`rows/row_0000.json`: the trained cells, with their grid indices),
and the spec's `twin_of`: the parent's digest (and dir name), so a twin of another parent never resumes from it.
"""

from pathlib import Path

from fractal_vmap.analysis.compare import boundary_distance, load_phase
from fractal_vmap.errors import UserError

NEIGHBOURHOOD = 1  # king moves from the boundary that the twin trains (1: the boundary cells and their neighbours)


def check(cfg, plan) -> None:
    """A twin's options, one line each, before its run dir is touched; records the parent in the plan's spec."""
    if not cfg.twin_of:
        return
    if cfg.refine or cfg.workers > 1:
        raise UserError("--twin_of trains one set of cells in one process: leave out --refine and --workers")
    parent_dir = Path(cfg.twin_of)
    grid, _, _ = load_phase(parent_dir)  # one line if it is not a finished grid
    if grid["spec"]["axes"] != plan.spec["axes"]:
        raise UserError(
            f"--twin_of {cfg.twin_of} is a grid over other axes or values than this one: give the twin the parent's "
            "axes, ranges and sizes (its --rows/--cols are the parent's fine map's)"
        )
    # the parent's digest names its cells (equal specs train equal cells), its dir's name is for a reader: a copied or
    # moved study still resumes
    plan.spec["twin_of"] = {"name": parent_dir.resolve().name, "digest": grid.get("digest")}


def twin_points(parent_dir: Path) -> tuple[list[tuple[int, int]], object]:
    """The cells a twin trains (the parent's boundary neighbourhood, row-major) and the parent's cells."""
    _, phase, cells = load_phase(parent_dir)
    distance = boundary_distance(phase, NEIGHBOURHOOD)
    points = [(int(i), int(j)) for i, j in zip(*(distance <= NEIGHBOURHOOD).nonzero())]
    return points, cells


def parent_lanes(cells) -> dict[tuple[int, int], dict]:
    """The parent's cells as lanes (cells.parquet's columns, no loss curve), by (row, col)."""
    frame = cells.drop(columns=[c for c in ("trained", "level") if c in cells.columns])
    frame = frame.astype(object).where(frame.notna(), None)  # NaN and <NA> -> None, as a row file reads back
    return {
        (r["row"], r["col"]): {**r, "grid_i": r["row"], "grid_j": r["col"], "losses": []}
        for r in frame.to_dict("records")
    }
