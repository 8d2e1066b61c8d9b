"""Reading a grid's run dir: grid.json (the spec), the row files (rows/row_XXXX.json: a finished row's lanes, each
with its loss curve and labels) and the finished grid's cells.parquet and fractal.json. Writing them: grid/rundir.py
and report.py."""

import json
from pathlib import Path

import numpy as np

from fractal_vmap.console import console
from fractal_vmap.errors import UserError
from fractal_vmap.files import read_json_object


def row_path(run_dir: Path, i: int) -> Path:
    return run_dir / "rows" / f"row_{i:04d}.json"


def read_record(path: Path, digest: str, say=console.print) -> dict | None:
    """A finished row's file as written, or None if it is missing, torn, unfinished or of another spec (then the row is
    trained again; `say` tells why)."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        say(f"[yellow]{path} is torn: training that row again[/yellow]")
        return None
    if not isinstance(data, dict):
        say(f"[yellow]{path} holds a JSON {type(data).__name__}, not a row: training that row again[/yellow]")
        return None
    if data.get("spec_digest") != digest:
        say(f"[yellow]{path} was trained under another spec: training that row again[/yellow]")
        return None
    return data if data.get("complete") else None


def row_lanes(record: dict) -> list[dict]:
    """A row file's lanes, each with the torch threads and device its row ran with (cells.parquet's columns; rows
    written before these were recorded have neither)."""
    machine = {k: record[k] for k in ("threads", "device") if k in record}
    return [{**lane, **machine} for lane in record["lanes"]]


def read_row(path: Path, cols: int, digest: str) -> list[dict] | None:
    """A finished row's lanes (row_lanes), or None if the file is missing, torn, incomplete or of another spec (then the
    row is trained again)."""
    record = read_record(path, digest)
    return None if record is None or len(record.get("lanes", [])) != cols else row_lanes(record)


def read_grid(run: str) -> tuple[Path, dict, np.ndarray]:
    """A finished grid's dir, grid.json and measure [rows, cols]; one line if it is not one."""
    import pandas as pd

    run_dir = Path(run)
    fix = "pass the run dir of a finished grid"
    grid = read_json_object(run_dir / "grid.json", "the grid's spec", fix) if (run_dir / "grid.json").exists() else None
    if grid is None or "spec" not in grid or not (run_dir / "cells.parquet").exists():
        raise UserError(f"{run} is not a finished grid (no grid.json with a spec, or no cells.parquet): {fix}")
    axes = grid["spec"]["axes"]
    measure = measure_grid(
        pd.read_parquet(run_dir / "cells.parquet"), len(axes["rows"]["values"]), len(axes["cols"]["values"])
    )
    return run_dir, grid, measure


def read_run(run_dir: Path) -> tuple[dict, object, dict]:
    """grid.json, cells.parquet and fractal.json of a finished run."""
    import pandas as pd

    return (
        json.loads((run_dir / "grid.json").read_text()),
        pd.read_parquet(run_dir / "cells.parquet"),
        json.loads((run_dir / "fractal.json").read_text()),
    )


def measure_grid(cells, rows: int, cols: int, column: str = "measure") -> np.ndarray:
    """The convergence measure (or another column: total_steps) laid out [rows, cols]; cells not in the frame: NaN."""
    measure = np.full((rows, cols), np.nan)
    values = cells[column].to_numpy(dtype=np.float64, na_value=np.nan)
    measure[cells["row"].to_numpy(), cells["col"].to_numpy()] = values
    return measure
