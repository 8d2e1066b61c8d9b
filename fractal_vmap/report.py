"""What a finished grid's rows become: cells.parquet (one row per cell), fractal.json (the boundary's box-counting
dimension), trainability.png and panels.png; each written atomically."""

from pathlib import Path

import numpy as np

from fractal_vmap.axes import Axis
from fractal_vmap.files import atomic_path, strict_json, write_atomic

CELL_COLUMNS = ["row", "col", "stable", "converged", "trainable_ratio", "final_loss", "avg_loss", "measure", "trainable_loss0",
                "trainable_mean_last_k", "tokens_seen", "steps", "total_steps", "learning_rate", "num_tokens_target", "seed", "error"]


def cells_frame(lanes: list[dict], row: Axis, col: Axis):
    """One tidy row per cell: its indices, both axis values, its labels and numbers (no loss curve)."""
    import pandas as pd

    columns = list(dict.fromkeys(["row", "col", row.name, col.name, *CELL_COLUMNS]))  # an axis named like a field (seed) once
    records = [{**lane, "row": lane["grid_i"], "col": lane["grid_j"], row.name: row.values[lane["grid_i"]], col.name: col.values[lane["grid_j"]]}
               for lane in lanes]
    return pd.DataFrame.from_records(records)[columns]


def measure_grid(cells, rows: int, cols: int) -> np.ndarray:
    """The convergence measure laid out [rows, cols]; cells not in the frame are NaN."""
    measure = np.full((rows, cols), np.nan)
    measure[cells["row"].to_numpy(), cells["col"].to_numpy()] = cells["measure"].to_numpy(dtype=np.float64, na_value=np.nan)
    return measure


def write_report(run_dir: Path, lanes: list[dict], row: Axis, col: Axis) -> dict:
    """cells.parquet, fractal.json and both pictures from the finished rows."""
    from fractal_vmap.fractal import fractal_dimension
    from fractal_vmap.plot import panels, paper_image

    cells = cells_frame(lanes, row, col)
    with atomic_path(run_dir / "cells.parquet") as tmp:
        cells.to_parquet(tmp, index=False)
    measure = measure_grid(cells, len(row.values), len(col.values))
    fractal = {**fractal_dimension(measure), "rows_axis": row.name, "cols_axis": col.name,
               "trainable_fraction": float(cells["converged"].mean())}
    write_atomic(run_dir / "fractal.json", strict_json(fractal))
    log_rows, log_cols = row.scale == "log", col.scale == "log"
    title = f"trainable (blue) vs not (red): {row.name} x {col.name}"
    with atomic_path(run_dir / "trainability.png") as tmp:
        paper_image(measure, row.values, col.values, row.name, col.name, tmp, log_rows, log_cols, title)
    with atomic_path(run_dir / "panels.png") as tmp:
        panels(cells, row.name, col.name, tmp, log_rows, log_cols)
    return {"cells": cells, "fractal": fractal}
