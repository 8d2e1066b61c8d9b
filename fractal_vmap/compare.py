"""`fractal-vmap compare RUN_A RUN_B`: how many cells of two grids over the same axes change phase, and where.

Its first use is the noise floor of a map: a grid and its `--perturb_ulp 1` twin (base weights nudged by one float32
ulp) differ only by rounding, so the cells that flip between them are the part of the map that rounding decides.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table
from simple_parsing import field

from fractal_vmap.errors import UserError
from fractal_vmap.files import read_json_object, strict_json
from fractal_vmap.fractal import fractal_dimension

NEAR = 2  # cells within this many steps (king moves) of run A's boundary count as "near" it


@dataclass
class CompareConfig:
    """Compare two finished grids over the same axes (e.g. a grid and its --perturb_ulp twin)."""

    run_a: str = field(positional=True, metavar="RUN_A", help="a finished grid's run dir")
    run_b: str = field(
        positional=True, metavar="RUN_B", help="another finished grid's run dir, over the same axis values"
    )
    out: str | None = None  # also write the comparison as JSON here


def load_phase(run_dir: Path) -> tuple[dict, np.ndarray]:
    """A finished run's grid.json and its phase grid: 1.0 trained (measure < 0), 0.0 not, NaN where no cell."""
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
    return grid, phase


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
    a_grid, a = load_phase(a_dir)
    b_grid, b = load_phase(b_dir)
    a_axes, b_axes = a_grid["spec"]["axes"], b_grid["spec"]["axes"]
    if a_axes != b_axes:
        raise UserError(
            f"{a_dir} and {b_dir} are grids over different axes or values: compare grids of the same axes, ranges and sizes"
        )
    both = ~np.isnan(a) & ~np.isnan(b)
    flipped = both & (a != b)
    distance = boundary_distance(a, NEAR)
    fa, fb = json.loads((a_dir / "fractal.json").read_text()), json.loads((b_dir / "fractal.json").read_text())
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
    }
    if cfg.out:
        Path(cfg.out).write_text(strict_json(report))
    return report


def print_report(report: dict, console: Console | None = None) -> None:
    console = console or Console()
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
    console.print(table)
