"""Zooming into a finished grid: `zoom` (a new grid inside a box of it, same settings, the parent recorded), `boxes`
(where the boundary is densest, to zoom there) and the chain of runs that `animate` plays.

A zoom at the parent's spacing (no --rows/--cols) takes the parent's exact axis values, so its lanes are the parent's
lanes and, a lane's numbers not depending on its neighbours (engine.py, paper.py), its cells equal the parent's bit
for bit. A finer zoom spaces its values evenly (in log10 on a log axis) from the box's first to its last value.
"""

import math
import re
from dataclasses import fields
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from fractal_vmap.axes import AXES, INTEGER_AXES, Axis, make_axis
from fractal_vmap.boxes import boundary_boxes
from fractal_vmap.errors import UserError
from fractal_vmap.files import read_json_object
from fractal_vmap.options import AnimateConfig, BoxesConfig, GridConfig, ZoomConfig
from fractal_vmap.report import measure_grid

console = Console()
RESOLVED = (
    "device",
    "dtype",
    "kernels",
)  # spec settings recorded as resolved: the child resolves its own ("compile" is "on" or absent)


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


def parse_box(text: str, rows: int, cols: int) -> tuple[int, int, int, int]:
    match = re.fullmatch(r"\s*(\d+):(\d+)\s*,\s*(\d+):(\d+)\s*", text)
    if match is None:
        raise UserError(f"--box {text!r}: write r0:r1,c0:c1 (half-open cell indices, e.g. 0:16,32:48)")
    r0, r1, c0, c1 = (int(g) for g in match.groups())
    if not (0 <= r0 < r1 <= rows and 0 <= c0 < c1 <= cols):
        raise UserError(
            f"--box {text}: the grid has {rows} rows and {cols} cols, so use 0 <= r0 < r1 <= {rows} and 0 <= c0 < c1 <= {cols}"
        )
    return r0, r1, c0, c1


def parse_range(text: str) -> dict[str, tuple[float, float]]:
    """rows=LO:HI,cols=LO:HI -> {"rows": (lo, hi), "cols": (lo, hi)}."""
    out = {}
    for part in text.split(","):
        match = re.fullmatch(r"\s*(rows|cols)\s*=\s*([-+0-9.eE]+)\s*:\s*([-+0-9.eE]+)\s*", part)
        if match is None:
            raise UserError(
                f"--range {text!r}: write rows=LO:HI,cols=LO:HI (axis values, e.g. rows=1e-2:1e1,cols=1e3:1e4)"
            )
        lo, hi = float(match.group(2)), float(match.group(3))
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise UserError(f"--range {part.strip()}: LO and HI must be finite with LO < HI")
        out[match.group(1)] = (lo, hi)
    if set(out) != {"rows", "cols"}:
        raise UserError(f"--range {text!r} must give both rows=LO:HI and cols=LO:HI")
    return out


def check_inside(span: tuple[float, float], axis: Axis, which: str) -> None:
    """A --range must lie inside the parent's axis: a zoom looks into its parent (values printed to a few digits, as
    `boxes` shows them, count as inside)."""
    lo, hi = min(axis.values), max(axis.values)
    if axis.scale == "log":
        low, high = lo * (1 - 1e-3), hi * (1 + 1e-3)
    else:  # a linear axis may start at 0, where no relative slack helps
        pad = 1e-3 * ((hi - lo) or abs(hi) or 1.0)
        low, high = lo - pad, hi + pad
    if span[0] < low or span[1] > high:
        raise UserError(
            f"--range {which}={span[0]:g}:{span[1]:g} reaches outside the parent's {which} axis "
            f"({axis.name} {lo:.4g}..{hi:.4g}): a zoom looks inside its parent; pass a range within it, "
            "or run a new grid for the rest"
        )


def squared(lo: float, hi: float, other: tuple[float, float], log: bool, other_log: bool) -> tuple[float, float]:
    """Widen [lo, hi] about its centre to the other side's width (log10 widths on log axes); never narrows it."""
    t = (lambda v: math.log10(v)) if log else (lambda v: v)
    u = (lambda v: math.log10(v)) if other_log else (lambda v: v)
    width, want = t(hi) - t(lo), u(other[1]) - u(other[0])
    if want <= width:
        return lo, hi
    centre = (t(lo) + t(hi)) / 2
    a, b = centre - want / 2, centre + want / 2
    return (10**a, 10**b) if log else (a, b)


def child_axes(cfg: ZoomConfig, spec: dict) -> tuple[tuple[Axis, Axis], list[int] | None]:
    """The zoom's axes, and the parent's box (cell indices) when given by --box."""
    from fractal_vmap.paper_task import PAPER_AXES

    rows, cols = (Axis(**spec["axes"][k]) for k in ("rows", "cols"))
    if (cfg.box is None) == (cfg.range is None):
        raise UserError(
            "pass the box as --box r0:r1,c0:c1 (cell indices) or as --range rows=LO:HI,cols=LO:HI (axis values), one of the two"
        )
    if cfg.rows < 0 or cfg.cols < 0:
        raise UserError(f"--rows {cfg.rows} --cols {cfg.cols}: use 0 (the parent's spacing) or a positive number")
    table = PAPER_AXES if spec["settings"].get("task") == "paper-mlp" else AXES
    if cfg.box is not None:
        r0, r1, c0, c1 = parse_box(cfg.box, len(rows.values), len(cols.values))
        if not cfg.rows and not cfg.cols and not cfg.square:  # the parent's spacing: its exact values
            return (Axis(rows.name, rows.values[r0:r1], rows.scale), Axis(cols.name, cols.values[c0:c1], cols.scale)), [
                r0,
                r1,
                c0,
                c1,
            ]
        ranges = {"rows": (rows.values[r0], rows.values[r1 - 1]), "cols": (cols.values[c0], cols.values[c1 - 1])}
        counts, box = {"rows": cfg.rows or r1 - r0, "cols": cfg.cols or c1 - c0}, [r0, r1, c0, c1]
    else:
        ranges, box = parse_range(cfg.range), None
        counts = {"rows": cfg.rows or len(rows.values), "cols": cfg.cols or len(cols.values)}
        for which, axis in (("rows", rows), ("cols", cols)):
            check_inside(ranges[which], axis, which)
    if cfg.square:
        log = {"rows": rows.scale == "log", "cols": cols.scale == "log"}
        ranges = {
            "rows": squared(*ranges["rows"], ranges["cols"], log["rows"], log["cols"]),
            "cols": squared(*ranges["cols"], ranges["rows"], log["cols"], log["rows"]),
        }
    for which, axis in (("rows", rows), ("cols", cols)):  # an integer axis takes whole bounds: rounded inwards
        if axis.name in INTEGER_AXES:
            ranges[which] = (float(math.ceil(ranges[which][0])), float(math.floor(ranges[which][1])))
    return (
        make_axis(rows.name, counts["rows"], *ranges["rows"], rows.scale, "rows", table),
        make_axis(cols.name, counts["cols"], *ranges["cols"], cols.scale, "cols", table),
    ), box


def child_config(settings: dict, run_dir: str | None) -> GridConfig:
    """The parent's settings as the zoom's options: every grid option the spec holds (a null one: the default), the
    resolved ones (device, dtype, kernels) left for the child to resolve again."""
    names = {f.name for f in fields(GridConfig)}
    kept = {k: v for k, v in settings.items() if k in names and v is not None and k not in RESOLVED}
    if settings.get("task") == "paper-mlp":
        kept.update(
            num_iterations=settings["steps"],
            dtype=settings["dtype"],
            width=settings["width"],
            activation=settings["activation"],
            data_multiple=settings["data_multiple"],
            seed=settings["seed"],
        )
    return GridConfig(**kept, run_dir=run_dir)


def run_zoom(cfg: ZoomConfig) -> Path:
    parent_dir, grid, _ = read_grid(cfg.run)
    spec = grid["spec"]
    axes, box = child_axes(cfg, spec)
    parent = {"run_dir": str(parent_dir.resolve()), "digest": grid.get("digest"), "box": box}
    child = child_config(spec["settings"], cfg.run_dir)
    for which, axis in zip(("row", "col"), axes):  # the options say what the axes are (grid.json's settings show them)
        setattr(child, f"{which}s", len(axis.values))
        setattr(child, f"{which}_min", axis.values[0])
        setattr(child, f"{which}_max", axis.values[-1])
        setattr(child, f"{which}_scale", axis.scale)
    if spec["settings"].get("task") == "paper-mlp":
        from fractal_vmap.paper_task import run_paper_grid

        return run_paper_grid(child, axes, parent)
    from fractal_vmap.grid import run_grid

    child.axes = f"{axes[0].name},{axes[1].name}"
    return run_grid(child, axes, parent)


def suggest_boxes(cfg: BoxesConfig) -> list[dict]:
    """The boxes with the most edge pixels, each with its cells, axis ranges and the zoom command."""
    run_dir, grid, measure = read_grid(cfg.run)
    H, W = measure.shape
    size = cfg.size or max(2, min(H, W) // 16)
    if not 2 <= size <= min(H, W):
        raise UserError(f"--size {cfg.size}: a box needs 2 to {min(H, W)} cells a side on this {H} x {W} grid")
    if cfg.count < 1:
        raise UserError(f"--count {cfg.count}: ask for at least one box")
    axes = grid["spec"]["axes"]
    rows, cols = axes["rows"]["values"], axes["cols"]["values"]
    out = []
    for b in boundary_boxes(measure, size, cfg.count):
        out.append(
            {
                "box": f"{b.row0}:{b.row1},{b.col0}:{b.col1}",
                "edge_pixels": b.edges,
                "density": b.density,
                "rows": (rows[b.row0], rows[b.row1 - 1]),
                "cols": (cols[b.col0], cols[b.col1 - 1]),
                "zoom": f"fractal-vmap zoom {run_dir} --box {b.row0}:{b.row1},{b.col0}:{b.col1} --rows {H} --cols {W}",
            }
        )
    return out


def print_boxes(boxes: list[dict], cfg: BoxesConfig) -> None:
    if not boxes:
        console.print(f"{cfg.run} has no boundary (every cell in one phase): nothing to zoom into")
        return
    table = Table(title=f"boxes of {cfg.run} with the most boundary")
    for name in ("box (r0:r1,c0:c1)", "edge pixels", "density", "rows", "cols"):
        table.add_column(name, justify="right")
    for b in boxes:
        table.add_row(
            b["box"],
            str(b["edge_pixels"]),
            f"{b['density']:.2f}",
            f"{b['rows'][0]:.4g} .. {b['rows'][1]:.4g}",
            f"{b['cols'][0]:.4g} .. {b['cols'][1]:.4g}",
        )
    console.print(table)
    console.print(f"zoom into the first: {boxes[0]['zoom']}", highlight=False, soft_wrap=True)


def zoom_levels(runs: list[str]) -> list:
    """The animation's levels: each run's measure and axis values, with the box of the next run, which must be its zoom."""
    import pandas as pd

    from fractal_vmap.animate import Level

    read = [read_grid(r) for r in runs]
    levels = []
    for k, (run_dir, grid, measure) in enumerate(read):
        axes = grid["spec"]["axes"]
        box = None
        if k + 1 < len(read):
            child_dir, child, _ = read[k + 1]
            parent = child["spec"].get("parent") or {}
            if Path(parent.get("run_dir", "")).resolve() != run_dir.resolve():
                raise UserError(
                    f"{child_dir} is not a zoom of {run_dir}: list the runs outermost first, each a `fractal-vmap zoom` of the one before"
                )
            if parent.get("box") is None:
                raise UserError(
                    f"{child_dir} was zoomed by --range, so it has no box in {run_dir}'s cells to draw: zoom with --box"
                )
            box = tuple(parent["box"])
        label = (
            f"{run_dir.name}: {axes['rows']['name']} {axes['rows']['values'][0]:.3g}..{axes['rows']['values'][-1]:.3g}, "
            f"{axes['cols']['name']} {axes['cols']['values'][0]:.3g}..{axes['cols']['values'][-1]:.3g}"
        )
        cells = pd.read_parquet(run_dir / "cells.parquet")
        steps = measure_grid(cells, *measure.shape, "total_steps")  # for the shading (plot.measure_shade)
        row_values, col_values = np.asarray(axes["rows"]["values"]), np.asarray(axes["cols"]["values"])
        levels.append(Level(measure, row_values, col_values, box, label, steps))
    return levels


def run_animate(cfg: AnimateConfig) -> dict:
    from fractal_vmap.animate import write_animation

    if cfg.size < 16 or cfg.size % 2:
        raise UserError(f"--size {cfg.size}: use an even number of pixels, 16 or more")
    paths = write_animation(zoom_levels(cfg.runs), cfg.out, cfg.size, cfg.frame_ms)
    console.print(
        f"animation: [bold]{paths['gif']}[/bold]"
        + (f" and [bold]{paths['mp4']}[/bold]" if paths.get("mp4") else " (no ffmpeg: no MP4)")
    )
    return paths
