"""The two axes of a grid: which `finetune` knob each one sweeps, over which values, log- or linear-spaced."""

import math
from dataclasses import dataclass, replace

import numpy as np

from fractal_vmap.errors import UserError
from fractal_vmap.recipe import FinetuneConfig

# axis name -> (FinetuneConfig field, default (min, max), default scale)
AXES = {
    "num_tokens": ("num_tokens", (1000.0, 8000.0), "log"),
    "lr": ("learning_rate", (1e-2, 1e2), "log"),
    "matrix_lr": ("matrix_lr", (1e-3, 1e2), "log"),
    "unembedding_lr": ("unembedding_lr", (1e-4, 1e1), "log"),
    "embedding_lr": ("embedding_lr", (1e-3, 1e2), "log"),
    "weight_decay": ("weight_decay", (0.0, 1.0), "linear"),
    "warmup_frac": ("warmup_frac", (0.0, 0.5), "linear"),
    "final_lr_frac": ("final_lr_frac", (0.0, 1.0), "linear"),
    "seed": ("seed", (0.0, 7.0), "linear"),
}
INTEGER_AXES = ("num_tokens", "seed")


@dataclass
class Axis:
    name: str
    values: list[float]
    scale: str

    @property
    def field(self) -> str:
        return AXES[self.name][0]


def make_axis(name: str, n: int, lo: float | None, hi: float | None, scale: str, which: str) -> Axis:
    if name not in AXES:
        raise UserError(f"unknown {which} axis {name!r}: choose from {', '.join(AXES)}")
    if n < 1:
        raise UserError(f"--{which} is {n}: a grid needs at least one {which[:-1]}")
    _, (dlo, dhi), dscale = AXES[name]
    lo, hi = (dlo if lo is None else lo), (dhi if hi is None else hi)
    for flag, value in ((f"--{which[:-1]}_min", lo), (f"--{which[:-1]}_max", hi)):
        if not math.isfinite(value):
            raise UserError(f"{flag} is {value}: axis bounds must be finite numbers")
    scale = dscale if scale == "auto" else scale
    if scale not in ("log", "linear"):
        raise UserError(f"--{which[:-1]}_scale {scale!r}: use log, linear or auto")
    if lo > hi:
        raise UserError(f"{which} axis {name}: min {lo:g} > max {hi:g}: swap them")
    if scale == "log" and lo <= 0:
        raise UserError(f"{which} axis {name} is log-spaced but its min is {lo:g}: give a positive min or --{which[:-1]}_scale linear")
    values = np.geomspace(lo, hi, n) if scale == "log" else np.linspace(lo, hi, n)
    if name in INTEGER_AXES:
        values = np.round(values)
    return Axis(name, [float(v) for v in values], scale)


def parse_axes(spec: str) -> tuple[str, str]:
    names = [a.strip() for a in spec.split(",")]
    if len(names) != 2 or names[0] == names[1]:
        raise UserError(f"--axes {spec!r}: give two different axes, rows first, e.g. --axes num_tokens,lr")
    return names[0], names[1]


def cell_config(base: FinetuneConfig, row: Axis, col: Axis, i: int, j: int, run_name: str) -> FinetuneConfig:
    """The `finetune` settings of cell (i, j): the base settings with both axis values put in."""
    values = {}
    for axis, k in ((row, i), (col, j)):
        values[axis.field] = int(axis.values[k]) if axis.name in INTEGER_AXES else axis.values[k]
    return replace(base, **values, run_name=f"{run_name}-r{i}-c{j}")
