"""Reading a grid's run dir: grid.json (the spec), the row files (rows/row_XXXX.json: a finished row's lanes, each
with its loss curve and labels; rows/row_XXXX.npz: a refined grid's level, its cells as columns) and the finished
grid's cells.parquet and fractal.json. Writing them: grid/rundir.py and report.py.

A level file is compact because a 4097^2 map's levels hold 247K cells (534 MB as JSON, 24 GB as Python dicts at the
finish): one numpy array a field (np.savez, no pickle), with the header a JSON string under `header` (the digest,
`complete`, threads, device, seconds: what a row file's JSON holds besides its lanes) and the fields that are not
numbers (a nanochat lane's error, run name) as JSON lists in the header. Loss curves are kept (`losses`, [cells,
steps], NaN after a run's end) where they are small: at most CURVE_VALUES values a level.
"""

import io
import json
import zipfile
from pathlib import Path

import numpy as np

from fractal_vmap.console import console
from fractal_vmap.errors import UserError
from fractal_vmap.files import read_json_object


def row_path(run_dir: Path, i: int) -> Path:
    return run_dir / "rows" / f"row_{i:04d}.json"


CURVE_VALUES = 1 << 22  # loss values a level file keeps (32 MB of float64): a 2048-lane level of 2048 steps

Table = dict[str, np.ndarray]  # a unit's cells as columns, each [cells] (losses [cells, steps])


def level_path(run_dir: Path, k: int) -> Path:
    return run_dir / "rows" / f"row_{k:04d}.npz"


def table_of(lanes: list[dict]) -> Table:
    """Lanes (one dict a cell, as a trainer or a JSON row file gives them) as columns: numbers and flags as float,
    int or bool arrays (a JSON null as NaN), a loss curve as a row of `losses` (NaN-padded), anything else an object
    array."""
    table: Table = {}
    for key in dict.fromkeys(k for lane in lanes for k in lane):
        values = [lane.get(key) for lane in lanes]
        if key == "losses":
            curves = np.full((len(values), max((len(v) for v in values), default=0)), np.nan)
            for i, v in enumerate(values):
                curves[i, : len(v)] = [np.nan if x is None else x for x in v]
            table[key] = curves
        elif all(isinstance(v, bool) for v in values):
            table[key] = np.array(values, dtype=bool)
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            table[key] = np.array(values, dtype=np.int64)
        elif all(v is None or (isinstance(v, int | float) and not isinstance(v, bool)) for v in values):
            table[key] = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
        else:
            table[key] = np.array(values, dtype=object)
    return table


def lanes_of(table: Table) -> list[dict]:
    """A table's cells as lanes (table_of's inverse: Python values, a curve cut at the run's `steps`)."""
    n = len(table["grid_i"])
    lanes = [{} for _ in range(n)]
    for key, values in table.items():
        if key == "losses":
            steps = table["steps"] if "steps" in table else np.full(n, values.shape[1])
            for lane, curve, s in zip(lanes, values, steps):
                lane[key] = curve[: int(s)].tolist()
        else:
            for lane, v in zip(lanes, values.tolist()):
                lane[key] = v
    return lanes


def pack_level(header: dict, table: Table) -> bytes:
    """A level file's bytes: the numeric columns as arrays, the header and the other columns as JSON."""
    arrays = {k: v for k, v in table.items() if v.dtype != object and (k != "losses" or v.size <= CURVE_VALUES)}
    objects = {k: v.tolist() for k, v in table.items() if v.dtype == object}
    text = json.dumps({**header, "cells": len(table["grid_i"]), "objects": objects}, allow_nan=False)
    buffer = io.BytesIO()
    np.savez(buffer, header=np.array(text), **arrays)
    return buffer.getvalue()


def read_level(path: Path, digest: str, say=console.print) -> tuple[dict, Table] | None:
    """A finished level file's header and table, or None if it is missing, torn, unfinished or of another spec (then
    the level is trained again; `say` tells why)."""
    if not path.exists():
        return None
    try:
        with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as data:
            header = json.loads(str(data["header"]))
            table = {k: data[k] for k in data.files if k != "header"}
    except (zipfile.BadZipFile, ValueError, KeyError, EOFError, OSError, json.JSONDecodeError):
        say(f"[yellow]{path} is torn: training that level again[/yellow]")
        return None
    if not isinstance(header, dict) or header.get("spec_digest") != digest:
        say(f"[yellow]{path} was trained under another spec: training that level again[/yellow]")
        return None
    table.update({k: np.array(v, dtype=object) for k, v in header.pop("objects", {}).items()})
    return (header, table) if header.get("complete") else None


def level_table(header: dict, table: Table) -> Table:
    """A level's table with the torch threads and device its level ran with, per cell (cells.parquet's columns)."""
    n = header["cells"]
    machine = {"threads": np.full(n, header["threads"]), "device": np.full(n, header["device"], dtype=object)}
    return {**table, **machine}


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


def read_header(run_dir: Path, i: int, digest: str) -> dict | None:
    """Unit i's finished header (a level file's, else a row file's record), quietly None if neither is of this spec."""
    quiet = lambda *_: None  # noqa: E731 -- read_row and read_level say why, later
    level = read_level(level_path(run_dir, i), digest, quiet) if level_path(run_dir, i).exists() else None
    return level[0] if level is not None else read_record(row_path(run_dir, i), digest, quiet)


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


def read_maps(run_dir: Path, columns: list[str], rows: int, cols: int) -> dict[str, np.ndarray]:
    """Columns of cells.parquet laid out [rows, cols] as float arrays (NaN where no cell), read one column at a time so
    that a 4097^2 map never holds a whole frame (a float64 [4097, 4097] is 134 MB)."""
    import pyarrow.parquet as pq

    with pq.ParquetFile(run_dir / "cells.parquet") as f:
        names = f.schema_arrow.names
        index = [f.read(columns=[c]).column(0).to_numpy() for c in ("row", "col")]
        flat = index[0].astype(np.int64) * cols + index[1]
        del index
        out = {}
        for c in columns:
            if c not in names:
                continue
            grid = np.full(rows * cols, np.nan)
            values = f.read(columns=[c]).column(0).to_pandas()
            grid[flat] = values.to_numpy(dtype=np.float64, na_value=np.nan)
            out[c] = grid.reshape(rows, cols)
    return out


def read_grid(run: str) -> tuple[Path, dict, np.ndarray]:
    """A finished grid's dir, grid.json and measure [rows, cols]; one line if it is not one."""
    import pandas as pd

    run_dir = Path(run)
    fix = "pass the run dir of a finished grid"
    grid = read_json_object(run_dir / "grid.json", "the grid's spec", fix) if (run_dir / "grid.json").exists() else None
    if grid is None or "spec" not in grid or not (run_dir / "cells.parquet").exists():
        raise UserError(f"{run} is not a finished grid (no grid.json with a spec, or no cells.parquet): {fix}")
    axes = grid["spec"]["axes"]
    cells = pd.read_parquet(run_dir / "cells.parquet", columns=["row", "col", "measure"])  # a 4097^2 map's: 0.4 GB
    measure = measure_grid(cells, len(axes["rows"]["values"]), len(axes["cols"]["values"]))
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
