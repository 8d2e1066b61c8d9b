"""`fractal-vmap compare RUN_A RUN_B`: how many cells of two grids over the same axes change phase, and where.

Its first use is the noise floor of a map: a grid and its `--perturb_ulp 1` twin (base weights nudged by one float32
ulp) differ only by rounding, so the cells that flip between them are the part of the map that rounding decides.

It also says what the two runs ran on (cells.parquet's `threads` and `device`, from the row files) and what that
means: the same spec at equal threads on the same device is promised bit-equal in every cell; other thread counts or
devices may round a matmul otherwise (Intel's MKL splits a reduction by thread), and near the boundary a rounding
difference grows to O(1), so there the labels are what to compare.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table
from simple_parsing import field

from fractal_vmap.analysis.fractal import fractal_dimension
from fractal_vmap.console import console as default_console
from fractal_vmap.errors import UserError
from fractal_vmap.files import read_json_object, strict_json

NEAR = 2  # cells within this many steps (king moves) of run A's boundary count as "near" it


@dataclass
class CompareConfig:
    """Compare two finished grids over the same axes (e.g. a grid and its --perturb_ulp twin)."""

    run_a: str = field(positional=True, metavar="RUN_A", help="a finished grid's run dir")
    run_b: str = field(
        positional=True, metavar="RUN_B", help="another finished grid's run dir, over the same axis values"
    )
    out: str | None = None  # also write the comparison as JSON here


def load_phase(run_dir: Path) -> tuple[dict, np.ndarray, object]:
    """A finished run's grid.json, its phase grid (1.0 trained (measure < 0), 0.0 not, NaN where no cell) and its
    cells."""
    import pandas as pd

    if not (run_dir / "grid.json").is_file() or not (run_dir / "cells.parquet").is_file():
        raise UserError(
            f"{run_dir} is not a finished grid (no grid.json or cells.parquet): pass a run dir that `grid` completed"
        )
    grid = read_json_object(run_dir / "grid.json", "the grid's spec", "pass a run dir that `grid` wrote")
    axes = grid["spec"]["axes"]
    cells = pd.read_parquet(run_dir / "cells.parquet")
    phase = np.full((len(axes["rows"]["values"]), len(axes["cols"]["values"])), np.nan)
    measure = cells["measure"].to_numpy(dtype=np.float64, na_value=np.nan)
    phase[cells["row"].to_numpy(), cells["col"].to_numpy()] = np.where(np.isnan(measure), np.nan, measure < 0)
    return grid, phase, cells


def ran_on(cells, column: str) -> list:
    """The distinct values of cells.parquet's `threads` or `device`, sorted; None for cells whose row did not record it
    (written before fractal-vmap recorded it)."""
    import pandas as pd

    if column not in cells:
        return [None]
    values = {None if pd.isna(v) else (int(v) if column == "threads" else str(v)) for v in cells[column].astype(object)}
    return sorted(values, key=lambda v: (v is None, v if v is not None else 0))


def numbers_differ(a, b) -> int:
    """Cells whose final loss or measure differ at all between two runs over the same axes (NaN equals NaN)."""
    a, b = (c.sort_values(["row", "col"]).reset_index(drop=True) for c in (a, b))
    if len(a) != len(b) or (a[["row", "col"]].to_numpy() != b[["row", "col"]].to_numpy()).any():
        return int(max(len(a), len(b)))
    differ = np.zeros(len(a), dtype=bool)
    for column in ("final_loss", "measure"):
        x, y = (c[column].to_numpy(dtype=np.float64, na_value=np.nan) for c in (a, b))
        differ |= ~((x == y) | (np.isnan(x) & np.isnan(y)))
    return int(differ.sum())


def rounding_note(a_grid: dict, b_grid: dict, threads: list[list], devices: list[list], differ: int) -> str:
    """What the two runs' thread counts and devices mean for comparing them (the module docstring)."""
    settings = a_grid["spec"]["settings"]
    # on CUDA the CPU threads do no arithmetic; the paper MLP trains every chunk at one thread whatever the count
    thread_free = settings.get("device") == "cuda" or settings.get("task") == "paper-mlp"
    known = lambda lists: all(len(v) == 1 and v[0] is not None for v in lists)  # noqa: E731
    same_threads = thread_free or (known(threads) and threads[0] == threads[1])
    same = known(devices) and devices[0] == devices[1] and same_threads
    what = "on the same device" if thread_free else "at equal threads on the same device"
    if same and a_grid.get("digest") == b_grid.get("digest"):
        cells = f"{differ} cell{'s differ' if differ != 1 else ' differs'}"
        verdict = "and every cell is" if differ == 0 else f"but {cells}: a bug, please report it"
        return f"the same spec {what}: the product promises every cell bit-equal, {verdict}"
    if same:
        return f"{what}: every difference comes from the two specs (e.g. --perturb_ulp)"
    other = "other devices" if thread_free else "other thread counts or devices (or unrecorded ones)"
    return (
        f"{other}: a matmul may round otherwise there (Intel's MKL splits its sums by thread), so cells may "
        "differ by rounding, which near the boundary grows to O(1): compare labels (the cells that change phase), "
        "not losses"
    )


def king_neighbours(grid: np.ndarray, fill) -> list[np.ndarray]:
    """The 8 neighbours of every cell, as 8 arrays of the grid's shape (`fill` beyond the border)."""
    H, W = grid.shape
    padded = np.pad(grid, 1, constant_values=fill)
    return [
        padded[1 + di : 1 + di + H, 1 + dj : 1 + dj + W] for di in (-1, 0, 1) for dj in (-1, 0, 1) if (di, dj) != (0, 0)
    ]


def boundary_distance(phase: np.ndarray, limit: int) -> np.ndarray:
    """Each cell's distance in king moves to the nearest boundary cell (one with a neighbour of the other phase; NaN
    cells have no phase), counted up to `limit`, and limit + 1 beyond it."""
    known = ~np.isnan(phase)
    reached = np.zeros(phase.shape, dtype=bool)
    for nb in king_neighbours(phase, np.nan):
        reached |= known & ~np.isnan(nb) & (nb != phase)
    distance = np.full(phase.shape, limit + 1)
    for d in range(limit + 1):
        distance[reached & (distance > limit)] = d  # the first time a cell is reached
        reached = reached | np.logical_or.reduce(king_neighbours(reached, False))
    return distance


def compare_runs(cfg: CompareConfig) -> dict:
    a_dir, b_dir = Path(cfg.run_a), Path(cfg.run_b)
    a_grid, a, a_cells = load_phase(a_dir)
    b_grid, b, b_cells = load_phase(b_dir)
    a_axes, b_axes = a_grid["spec"]["axes"], b_grid["spec"]["axes"]
    if a_axes != b_axes:
        raise UserError(
            f"{a_dir} and {b_dir} are grids over different axes or values: compare grids of the same axes, ranges and "
            "sizes"
        )
    both = ~np.isnan(a) & ~np.isnan(b)
    flipped = both & (a != b)
    distance = boundary_distance(a, NEAR)
    fa, fb = json.loads((a_dir / "fractal.json").read_text()), json.loads((b_dir / "fractal.json").read_text())
    threads = [ran_on(c, "threads") for c in (a_cells, b_cells)]
    devices = [ran_on(c, "device") for c in (a_cells, b_cells)]
    differ = numbers_differ(a_cells, b_cells)
    report = {
        "run_a": str(a_dir),
        "run_b": str(b_dir),
        "cells": int(both.sum()),
        "flipped": int(flipped.sum()),
        "flipped_fraction": float(flipped.sum() / max(both.sum(), 1)),
        "flipped_on_boundary": int((flipped & (distance == 0)).sum()),
        "flipped_near_boundary": int((flipped & (distance > 0) & (distance <= NEAR)).sum()),
        "flipped_far": int((flipped & (distance > NEAR)).sum()),
        "flipped_cells": [[int(i), int(j)] for i, j in zip(*np.nonzero(flipped))],
        "trainable_fraction": [float(np.nanmean(a)), float(np.nanmean(b))],
        "dimension": [fa.get("dimension"), fb.get("dimension")],
        "edge_pixel_count": [fa.get("edge_pixel_count"), fb.get("edge_pixel_count")],
        "dimension_of_flips": fractal_dimension(np.where(both, np.where(flipped, 1.0, -1.0), np.nan))["dimension"]
        if flipped.any()
        else None,
        "threads": threads,
        "devices": devices,
        "numbers_differ": differ,
        "rounding": rounding_note(a_grid, b_grid, threads, devices, differ),
    }
    if cfg.out:
        Path(cfg.out).write_text(strict_json(report))
    return report


def print_report(report: dict, console: Console | None = None) -> None:
    console = console or default_console
    table = Table(title=f"compare {report['run_a']} vs {report['run_b']}", show_header=False)
    n, f = report["cells"], report["flipped"]
    table.add_row("cells compared", str(n))
    table.add_row("cells that change phase", f"{f} ({report['flipped_fraction']:.2%})")
    table.add_row("  on run A's boundary", str(report["flipped_on_boundary"]))
    table.add_row(f"  within {NEAR} cells of it", str(report["flipped_near_boundary"]))
    table.add_row("  farther", str(report["flipped_far"]))
    fmt = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    table.add_row("trainable fraction A / B", " / ".join(f"{x:.1%}" for x in report["trainable_fraction"]))
    table.add_row(
        "boundary dimension A / B",
        " / ".join(fmt(x) for x in report["dimension"])
        + f"  ({' / '.join(str(x) for x in report['edge_pixel_count'])} edge pixels)",
    )
    listed = lambda values: ", ".join("unrecorded" if v is None else str(v) for v in values)  # noqa: E731
    table.add_row("torch threads A / B", " / ".join(listed(v) for v in report["threads"]))
    table.add_row("device A / B", " / ".join(listed(v) for v in report["devices"]))
    table.add_row("cells with other numbers", str(report["numbers_differ"]))
    console.print(table)
    console.print(report["rounding"], highlight=False, soft_wrap=True)
