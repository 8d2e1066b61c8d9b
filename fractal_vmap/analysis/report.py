"""What a finished grid's rows become: cells.parquet (one row per cell), fractal.json (the boundary's box-counting
dimension, with what it rests on), trainability.png and panels.png; each written atomically. The pictures are always
drawn from the files (grid.json, cells.parquet, fractal.json), so `fractal-vmap plot RUN` redraws them identically.
"""

import textwrap
from pathlib import Path

from fractal_vmap.analysis.dimension import MIN_BOX_SIZES, MIN_EDGE_PIXELS
from fractal_vmap.analysis.runs import measure_grid, read_run
from fractal_vmap.axes import Axis
from fractal_vmap.files import atomic_path, finite_or_none, strict_json, write_atomic

CELL_COLUMNS = [
    "row",
    "col",
    "stable",
    "converged",
    "trainable_ratio",
    "final_loss",
    "avg_loss",
    "measure",
    "trainable_loss0",
    "trainable_mean_last_k",
    "tokens_seen",
    "steps",
    "total_steps",
    "learning_rate",
    "matrix_lr",
    "embedding_lr",
    "unembedding_lr",
    "num_tokens_target",
    "seed",
    "error",
    "threads",
    "device",
]  # the torch threads and the device the cell's row ran with
PICTURES = ("trainability.png", "panels.png")
CAPTION_WIDTH = 110  # characters a caption line: about the paper image's width in 7-point monospace


def cells_frame(lanes: list[dict], row: Axis, col: Axis, lrs: list[list[dict]] | None = None):
    """One tidy row per cell: its indices, both axis values, its labels and numbers (no loss curve), the learning
    rates it trained with (`lrs[i][j]`, axes.cell_lrs: null for a frozen group or an unread base learning_rate), and
    the torch threads and device its row ran with (rundir.row_lanes; null for rows written before they were
    recorded)."""
    import pandas as pd

    refined = [c for c in ("trained", "level") if lanes and c in lanes[0]]  # a refined grid's (refine.py)
    # an axis named like a field (seed) once
    columns = list(dict.fromkeys(["row", "col", row.name, col.name, *CELL_COLUMNS, *refined]))
    records = [
        {
            **lane,
            **(lrs[lane["grid_i"]][lane["grid_j"]] if lrs else {}),
            "row": lane["grid_i"],
            "col": lane["grid_j"],
            row.name: row.values[lane["grid_i"]],
            col.name: col.values[lane["grid_j"]],
        }
        for lane in lanes
    ]
    dtypes = {c: "float64" for c in ("learning_rate", "matrix_lr", "embedding_lr", "unembedding_lr")}
    dtypes.update(threads="Int64", device="string")
    return pd.DataFrame.from_records(records).reindex(columns=columns).astype(dtypes)


def measure_fractal(cells, row: Axis, col: Axis) -> dict:
    """fractal.json's content (strict-JSON ready): the dimension, the box sizes, counts and edge pixels it rests on,
    and a caveat when they are too few to mean anything."""
    from fractal_vmap.analysis.fractal import fractal_dimension

    f = fractal_dimension(measure_grid(cells, len(row.values), len(col.values)))
    too_few = len(f["sizes"]) < MIN_BOX_SIZES or f["edge_pixel_count"] < MIN_EDGE_PIXELS
    caveat = (
        (
            f"too few to mean anything (a dimension needs >= {MIN_EDGE_PIXELS} edge pixels and >= {MIN_BOX_SIZES} box "
            "sizes: "
            "a grid of about 32 x 32 cells or more)"
        )
        if too_few and f["edge_pixel_count"]
        else None
    )
    return finite_or_none(
        {
            **f,
            "rows_axis": row.name,
            "cols_axis": col.name,
            "trainable_fraction": float(cells["converged"].mean()),
            "caveat": caveat,
        }
    )


def dimension_note(f: dict) -> str:
    """The dimension in words, with what it rests on (fractal.json's fields; null where NaN)."""
    sizes = ", ".join(str(s) for s in f["sizes"]) or "none (the grid is too small for one)"
    if not f["edge_pixel_count"] and 0 < (f.get("trainable_fraction") or 0) < 1:  # both phases, no 2 x 2 block of both
        return (
            f"no boundary dimension: {f['trainable_fraction']:.0%} of the cells train, but an edge pixel is a "
            "2 x 2 block of cells in both phases and this grid has none (one row or one col, or the phases meet "
            "only beside cells without a result)"
        )
    if not f["edge_pixel_count"]:
        return "no boundary: every cell with a result is in the same phase, so there is no dimension"
    value = "no boundary dimension" if f["dimension"] is None else f"boundary dimension {f['dimension']:.2f}"
    if f.get("caveat"):
        return f"{value} from {f['edge_pixel_count']} edge pixels and box sizes {sizes}: {f['caveat']}"
    local = "" if f["dimension_median_local"] is None else f"; median local slope {f['dimension_median_local']:.2f}"
    return f"{value} (least-squares slope over box sizes {sizes} cells, {f['edge_pixel_count']} edge pixels{local})"


def source_label(source: dict) -> str:
    """ "default (step 300, sha256 1a2b3c4d)" from a spec's model or dataset id."""
    extra = ([f"step {source['step']}"] if "step" in source else []) + (
        [f"sha256 {source['sha256'][:8]}"] if "sha256" in source else []
    )
    return source["source"] + (f" ({', '.join(extra)})" if extra else "")


def axis_label(axis: dict) -> str:
    values = axis["values"]
    span = f"{values[0]:g}..{values[-1]:g}" if len(values) > 1 else f"{values[0]:g}"
    return f"{axis['name']} {span} ({len(values)}, {axis['scale']})"


def averaged(cells, window: int) -> str:
    """What the trainable label averaged: the last `window` losses, or every loss of a cell with fewer steps."""
    steps = cells["total_steps"].dropna() if "total_steps" in cells.columns else cells.iloc[:0, 0]
    short = steps[steps < window]
    if short.empty:
        return f"mean of the last {window} losses"
    counts = f"{int(short.min())}" if short.min() == short.max() else f"{int(short.min())}..{int(short.max())}"
    return f"mean of the last {window} losses, or of all {counts} in the {len(short)} cells with fewer steps,"


def caption(grid: dict, cells, fractal: dict, run_name: str, window: int, threshold: float) -> str:
    """What a picture shows, in a few lines: model, data, axes, lrs, labels, the dimension and its basis, the run."""
    spec, env = grid["spec"], grid.get("environment", {})
    settings, axes = spec["settings"], spec["axes"]
    lrs = ", ".join(
        f"{g} frozen" if v is None else f"{g} = {v if isinstance(v, str) else f'{v:g}'}"
        for g, v in spec.get("group_lrs", {}).items()
    )
    cells_total = len(axes["rows"]["values"]) * len(axes["cols"]["values"])
    if "trained" in cells.columns:  # a refined map (refine.py): the cells no level trained took a coarser cell's result
        counted = f"{int(cells['trained'].sum())}/{cells_total} cells trained (the others filled from a coarser level)"
    else:
        counted = f"{len(cells)}/{cells_total} cells"
    lines = [
        f"model {source_label(spec['model'])} · dataset {source_label(spec['dataset'])} · {settings['device']} "
        f"{settings['dtype']}",
        f"rows {axis_label(axes['rows'])} x cols {axis_label(axes['cols'])} · learning rates: {lrs}",
        (
            f"{counted} · {cells['converged'].mean():.0%} trainable ({averaged(cells, window)} < {threshold:g} x "
            f"the first) · {cells['stable'].mean():.0%} stable"
        ),
        dimension_note(fractal),
        f"run dir {run_name} · created {env.get('created', '?')} · fractal-vmap "
        f"{(env.get('git_revision') or env.get('fractal_vmap') or '?')[:12]}",
    ]
    return "\n".join(textwrap.fill(line, CAPTION_WIDTH, subsequent_indent="  ") for line in lines)


def draw_pictures(
    grid: dict,
    cells,
    fractal: dict,
    out_dir: Path,
    run_name: str,
    window: int | None = None,
    threshold: float | None = None,
    dpi: int = 150,
) -> list[Path]:
    """trainability.png and panels.png in out_dir, from a grid.json, its cells and fractal.json (as read from files)."""
    from fractal_vmap.analysis.pictures import panels, paper_image

    settings = grid["spec"]["settings"]
    window = settings["trainable_window_steps"] if window is None else window
    threshold = settings["trainable_loss_ratio_threshold"] if threshold is None else threshold
    row, col = Axis(**grid["spec"]["axes"]["rows"]), Axis(**grid["spec"]["axes"]["cols"])
    log_rows, log_cols = row.scale == "log", col.scale == "log"
    text = caption(grid, cells, fractal, run_name, window, threshold)
    measure = measure_grid(cells, len(row.values), len(col.values))
    steps = measure_grid(cells, len(row.values), len(col.values), "total_steps")  # shaded per step where they differ
    paths = [Path(out_dir) / name for name in PICTURES]
    with atomic_path(paths[0]) as tmp:
        paper_image(
            measure,
            row.values,
            col.values,
            row.name,
            col.name,
            tmp,
            log_rows,
            log_cols,
            f"trainable (blue) or not (red): {row.name} x {col.name}",
            text,
            dpi,
            steps,
        )
    with atomic_path(paths[1]) as tmp:
        panels(cells, row.name, col.name, tmp, log_rows, log_cols, text, dpi)
    return paths


def write_report(run_dir: Path, lanes: list[dict], row: Axis, col: Axis, lrs: list[list[dict]] | None = None) -> dict:
    """cells.parquet and fractal.json from the finished rows, then both pictures drawn from those files."""
    cells = cells_frame(lanes, row, col, lrs)
    with atomic_path(run_dir / "cells.parquet") as tmp:
        cells.to_parquet(tmp, index=False)
    write_atomic(run_dir / "fractal.json", strict_json(measure_fractal(cells, row, col)))
    grid, cells, fractal = read_run(run_dir)
    draw_pictures(grid, cells, fractal, run_dir, run_dir.name)
    return {"cells": cells, "fractal": fractal}
