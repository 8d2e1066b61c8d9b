"""An axis of a grid: which setting it sweeps, over which values, log- or linear-spaced. A task names its axes in a
table (name -> AxisKind: tasks/nanochat/axes.py, tasks/paper/task.py); grid.json records each axis as its name,
values and scale."""

import math
from dataclasses import dataclass
from dataclasses import field as dataclass_field

import numpy as np

from fractal_vmap.errors import UserError


@dataclass(frozen=True)
class AxisKind:
    """What an axis of a task sweeps: the setting it sets, its default range and spacing, whether it takes integers."""

    setting: str
    default_range: tuple[float, float]
    scale: str  # "log" or "linear"
    integer: bool = False


@dataclass
class Axis:
    name: str
    values: list[float]
    scale: str
    field: str = dataclass_field(default="", compare=False)  # the setting it sets (AxisKind.setting; not in grid.json)

    def to_spec(self) -> dict:
        """The axis as grid.json records it."""
        return {"name": self.name, "values": self.values, "scale": self.scale}


def make_axis(
    name: str, n: int, lo: float | None, hi: float | None, scale: str, which: str, table: dict[str, AxisKind]
) -> Axis:
    """n values of axis `name` of a task's `table`, between lo and hi (unset: the axis' default range)."""
    if name not in table:
        raise UserError(f"unknown {which} axis {name!r}: choose from {', '.join(table)}")
    if n < 1:
        raise UserError(f"--{which} is {n}: a grid needs at least one {which[:-1]}")
    kind = table[name]
    (dlo, dhi) = kind.default_range
    lo, hi = (dlo if lo is None else lo), (dhi if hi is None else hi)
    for flag, value in ((f"--{which[:-1]}_min", lo), (f"--{which[:-1]}_max", hi)):
        if not math.isfinite(value):
            raise UserError(f"{flag} is {value}: axis bounds must be finite numbers")
    scale = kind.scale if scale == "auto" else scale
    if scale not in ("log", "linear"):
        raise UserError(f"--{which[:-1]}_scale {scale!r}: use log, linear or auto")
    if lo > hi:
        raise UserError(f"{which} axis {name}: min {lo:g} > max {hi:g}: swap them")
    if scale == "log" and lo <= 0:
        raise UserError(
            f"{which} axis {name} is log-spaced but its min is {lo:g}: give a positive min or --{which[:-1]}_scale "
            "linear"
        )
    if kind.integer:  # a non-integer bound, rounded, leaves the range (seed 0.5..3.7 trained 0 and 4)
        for flag, value in ((f"--{which[:-1]}_min", lo), (f"--{which[:-1]}_max", hi)):
            if value != round(value):
                raise UserError(
                    f"{flag} {value:g}: the {which} axis {name} takes whole numbers: "
                    f"pass {math.floor(value)} or {math.ceil(value)}"
                )
    values = np.geomspace(lo, hi, n) if scale == "log" else np.linspace(lo, hi, n)
    if kind.integer:
        values = np.round(values)
    check_distinct(name, values, lo, hi, which)
    return Axis(name, [float(v) for v in values], scale, kind.setting)


def check_distinct(name: str, values: np.ndarray, lo: float, hi: float, which: str) -> None:
    """Refuse an axis whose values repeat: those rows (or cols) would train the same cells."""
    if len(values) < 2 or (np.diff(values) > 0).all():
        return
    one, n = which[:-1], len(values)
    if lo == hi:
        raise UserError(
            f"--{one}_min and --{one}_max are both {lo:g} with --{which} {n}: every {one} would train "
            f"the same cells: pass --{which} 1, or two different bounds"
        )
    raise UserError(
        f"the {which} axis {name} {lo:g}..{hi:g} rounds to {len(np.unique(values))} distinct whole numbers "
        f"for --{which} {n}: some {which} would train the same cells: pass fewer --{which} or a wider "
        "range"
    )


def parse_axes(spec: str) -> tuple[str, str]:
    names = [a.strip() for a in spec.split(",")]
    if len(names) != 2 or names[0] == names[1]:
        raise UserError(f"--axes {spec!r}: give two different axes, rows first, e.g. --axes num_tokens,lr")
    return names[0], names[1]
