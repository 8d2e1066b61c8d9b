"""`fractal-vmap zoom`: a new grid inside a box of a finished grid, of the same task and settings, the parent recorded
in its grid.json (where to zoom: `boxes`, analysis/boxes.py; a chain of zooms played: `animate`, analysis/animate.py).

`--refine K` makes the new grid a refined one (grid/refine.py): --rows x --cols coarse values, the map at the finer
spacing near its boundary only.

A zoom at the parent's spacing (no --rows/--cols) takes the parent's exact axis values, so its lanes are the parent's
lanes and, a lane's numbers not depending on its neighbours (lanes.py), its cells equal the parent's bit for bit. A
finer zoom spaces its values evenly (in log10 on a log axis) from the box's first to its last value.
"""

import math
import re
from pathlib import Path

from fractal_vmap.analysis.runs import read_grid
from fractal_vmap.axes import Axis, make_axis
from fractal_vmap.errors import UserError
from fractal_vmap.grid import refine
from fractal_vmap.grid.pipeline import run_grid
from fractal_vmap.options import GridConfig, ZoomConfig
from fractal_vmap.tasks import get_task


def parse_box(text: str, rows: int, cols: int) -> tuple[int, int, int, int]:
    match = re.fullmatch(r"\s*(\d+):(\d+)\s*,\s*(\d+):(\d+)\s*", text)
    if match is None:
        raise UserError(f"--box {text!r}: write r0:r1,c0:c1 (half-open cell indices, e.g. 0:16,32:48)")
    r0, r1, c0, c1 = (int(g) for g in match.groups())
    if not (0 <= r0 < r1 <= rows and 0 <= c0 < c1 <= cols):
        raise UserError(
            f"--box {text}: the grid has {rows} rows and {cols} cols, so use 0 <= r0 < r1 <= {rows} and 0 <= c0 < c1 "
            f"<= {cols}"
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
    table = get_task(spec["settings"].get("task", GridConfig.task)).AXES
    rows, cols = (Axis(**spec["axes"][k], field=table[spec["axes"][k]["name"]].setting) for k in ("rows", "cols"))
    if (cfg.box is None) == (cfg.range is None):
        raise UserError(
            "pass the box as --box r0:r1,c0:c1 (cell indices) or as --range rows=LO:HI,cols=LO:HI (axis values), one "
            "of the two"
        )
    if cfg.rows < 0 or cfg.cols < 0:
        raise UserError(f"--rows {cfg.rows} --cols {cfg.cols}: use 0 (the parent's spacing) or a positive number")
    if cfg.refine and (cfg.rows < 2 or cfg.cols < 2):
        raise UserError(f"zoom --refine {cfg.refine} needs the coarse grid's --rows and --cols (each >= 2)")
    if cfg.box is not None:
        r0, r1, c0, c1 = parse_box(cfg.box, len(rows.values), len(cols.values))
        if not cfg.rows and not cfg.cols and not cfg.square:  # the parent's spacing: its exact values
            exact = (
                Axis(rows.name, rows.values[r0:r1], rows.scale, rows.field),
                Axis(cols.name, cols.values[c0:c1], cols.scale, cols.field),
            )
            return exact, [r0, r1, c0, c1]
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
    counts = {k: refine.fine_size(n, cfg.refine) for k, n in counts.items()}  # a refined zoom's fine map
    for which, axis in (("rows", rows), ("cols", cols)):  # an integer axis takes whole bounds: rounded inwards
        if table[axis.name].integer:
            ranges[which] = (float(math.ceil(ranges[which][0])), float(math.floor(ranges[which][1])))
    return (
        make_axis(rows.name, counts["rows"], *ranges["rows"], rows.scale, "rows", table),
        make_axis(cols.name, counts["cols"], *ranges["cols"], cols.scale, "cols", table),
    ), box


def child_config(settings: dict, run_dir: str | None) -> GridConfig:
    """The parent's settings as the zoom's options (its task's zoom_options); the zoom is a plain grid."""
    task = get_task(settings.get("task", GridConfig.task))
    kept = {k: v for k, v in task.zoom_options(settings).items() if k != "refine"}
    return GridConfig(**kept, run_dir=run_dir)


def zoom_grid(cfg: ZoomConfig) -> tuple[GridConfig, tuple[Axis, Axis], dict]:
    """The zoom as a grid: its options, its axes and its parent (run dir, digest, box), for run_grid."""
    parent_dir, grid, _ = read_grid(cfg.run)
    spec = grid["spec"]
    axes, box = child_axes(cfg, spec)
    parent = {"run_dir": str(parent_dir.resolve()), "digest": grid.get("digest"), "box": box}
    child = child_config(spec["settings"], cfg.run_dir)
    child.refine = cfg.refine  # its coarse grid is --rows x --cols, the axes its fine map's
    for which, axis in zip(("row", "col"), axes):  # the options say what the axes are (grid.json's settings show them)
        setattr(child, f"{which}s", getattr(cfg, f"{which}s") if cfg.refine else len(axis.values))
        setattr(child, f"{which}_min", axis.values[0])
        setattr(child, f"{which}_max", axis.values[-1])
        setattr(child, f"{which}_scale", axis.scale)
    return child, axes, parent


def run_zoom(cfg: ZoomConfig) -> Path:
    return run_grid(*zoom_grid(cfg))
