"""What a finished grid's rows become: cells.parquet (one row per cell), fractal.json (the boundary's box-counting
dimension, with what it rests on), trainability.png and panels.png; each written atomically. The pictures are always
drawn from the files (grid.json, cells.parquet, fractal.json), so `fractal-vmap plot RUN` redraws them identically.
"""

import json
import textwrap
from pathlib import Path

import numpy as np

from fractal_vmap.analysis.cellmap import CellMap, from_lanes, parquet_bytes
from fractal_vmap.analysis.dimension import MIN_BOX_SIZES, MIN_EDGE_PIXELS
from fractal_vmap.analysis.runs import measure_grid, read_maps
from fractal_vmap.axes import Axis
from fractal_vmap.files import atomic_path, finite_or_none, strict_json, write_atomic

PICTURES = ("trainability.png", "panels.png", "map.png")
CAPTION_WIDTH = 110  # characters a caption line: about the paper image's width in 7-point monospace


def cells_frame(lanes: list[dict], row: Axis, col: Axis, lrs: list[list[dict]] | None = None):
    """One tidy row per cell (cellmap.CellMap.frame): its indices, both axis values, its labels and numbers (no loss
    curve), the learning rates it trained with (`lrs[i][j]`, axes.cell_lrs: null for a frozen group or an unread
    base learning_rate), and the torch threads and device its row ran with (null for rows written before they were
    recorded)."""
    H, W = len(row.values), len(col.values)
    return from_lanes(lanes, H, W).frame(0, H, row, col, lrs)


def map_fractal(measure, trainable_fraction: float, row: Axis, col: Axis) -> dict:
    """fractal.json's content (strict-JSON ready) from a measure [H, W]: the dimension, the box sizes, counts and edge
    pixels it rests on, and a caveat when they are too few to mean anything."""
    from fractal_vmap.analysis.fractal import fractal_dimension

    f = fractal_dimension(measure)
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
            "trainable_fraction": trainable_fraction,
            "caveat": caveat,
        }
    )


def measure_fractal(cells, row: Axis, col: Axis) -> dict:
    """map_fractal of a cells frame (cells.parquet's rows)."""
    measure = measure_grid(cells, len(row.values), len(col.values))
    return map_fractal(measure, float(cells["converged"].mean()), row, col)


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


MAP_COLUMNS = ("measure", "total_steps", "stable", "converged", "final_loss", "trained")  # what the pictures read
FRAME_CELLS = 1 << 20  # a finished map up to this many cells is also read back as a frame (W&B's table, callers)


def as_maps(cells, H: int, W: int) -> dict[str, np.ndarray]:
    """The pictures' columns laid out [H, W] (NaN where no cell), from a cells frame or as given (a dict of maps)."""
    if isinstance(cells, dict):
        return cells
    return {c: measure_grid(cells, H, W, c) for c in MAP_COLUMNS if c in cells.columns}


def averaged(steps: np.ndarray | None, window: int) -> str:
    """What the trainable label averaged: the last `window` losses, or every loss of a cell with fewer steps."""
    steps = np.zeros(0) if steps is None else np.asarray(steps, dtype=np.float64).ravel()
    short = steps[np.isfinite(steps) & (steps < window)]
    if not short.size:
        return f"mean of the last {window} losses"
    counts = f"{int(short.min())}" if short.min() == short.max() else f"{int(short.min())}..{int(short.max())}"
    return f"mean of the last {window} losses, or of all {counts} in the {short.size} cells with fewer steps,"


def caption(grid: dict, cells, fractal: dict, run_name: str, window: int, threshold: float) -> str:
    """What a picture shows, in a few lines: model, data, axes, lrs, labels, the dimension and its basis, the run.
    `cells`: a cells frame or its maps (as_maps)."""
    spec, env = grid["spec"], grid.get("environment", {})
    settings, axes = spec["settings"], spec["axes"]
    lrs = ", ".join(
        f"{g} frozen" if v is None else f"{g} = {v if isinstance(v, str) else f'{v:g}'}"
        for g, v in spec.get("group_lrs", {}).items()
    )
    H, W = len(axes["rows"]["values"]), len(axes["cols"]["values"])
    maps = as_maps(cells, H, W)
    if "trained" in maps:  # a refined map (refine.py): the cells no level trained took a coarser cell's result
        counted = f"{int(np.nansum(maps['trained']))}/{H * W} cells trained (the others filled from a coarser level)"
    else:
        counted = f"{int(np.isfinite(maps['converged']).sum())}/{H * W} cells"
    lines = [
        f"model {source_label(spec['model'])} · dataset {source_label(spec['dataset'])} · {settings['device']} "
        f"{settings['dtype']}",
        f"rows {axis_label(axes['rows'])} x cols {axis_label(axes['cols'])} · learning rates: {lrs}",
        (
            f"{counted} · {np.nanmean(maps['converged']):.0%} trainable ({averaged(maps.get('total_steps'), window)} "
            f"< {threshold:g} x the first) · {np.nanmean(maps['stable']):.0%} stable"
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
    """trainability.png, panels.png and map.png (one pixel a cell: the map at full resolution) in out_dir, from a
    grid.json, its cells (a frame, or its maps: as_maps) and fractal.json (as read from files)."""
    from fractal_vmap.analysis.pictures import full_map, panels, paper_image

    settings = grid["spec"]["settings"]
    window = settings["trainable_window_steps"] if window is None else window
    threshold = settings["trainable_loss_ratio_threshold"] if threshold is None else threshold
    row, col = Axis(**grid["spec"]["axes"]["rows"]), Axis(**grid["spec"]["axes"]["cols"])
    log_rows, log_cols = row.scale == "log", col.scale == "log"
    maps = as_maps(cells, len(row.values), len(col.values))
    text = caption(grid, maps, fractal, run_name, window, threshold)
    measure, steps = maps["measure"], maps.get("total_steps")  # shaded per step where the steps differ
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
        panels(maps, row.name, col.name, tmp, log_rows, log_cols, text, dpi, (row.values, col.values))
    with atomic_path(paths[2]) as tmp:
        full_map(measure, steps, tmp)
    return paths


def write_report(
    run_dir: Path, cells: CellMap | list[dict], row: Axis, col: Axis, lrs: list[list[dict]] | None = None
) -> dict:
    """cells.parquet and fractal.json from the finished cells (a map, or a grid's lanes), then the pictures drawn from
    those files. Returns fractal.json and the cells frame read back (None above FRAME_CELLS cells)."""
    import pandas as pd

    H, W = len(row.values), len(col.values)
    cells = cells if isinstance(cells, CellMap) else from_lanes(cells, H, W)
    write_atomic(run_dir / "cells.parquet", parquet_bytes(cells, row, col, lrs))
    write_atomic(
        run_dir / "fractal.json", strict_json(map_fractal(cells.field("measure"), cells.trainable_fraction(), row, col))
    )
    del cells  # the pictures read the files alone
    grid, fractal = (json.loads((run_dir / name).read_text()) for name in ("grid.json", "fractal.json"))
    draw_pictures(grid, read_maps(run_dir, list(MAP_COLUMNS), H, W), fractal, run_dir, run_dir.name)
    frame = pd.read_parquet(run_dir / "cells.parquet") if H * W <= FRAME_CELLS else None
    return {"cells": frame, "fractal": fractal}
