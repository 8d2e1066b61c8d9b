"""The two axes of a grid: which `finetune` knob each one sweeps, over which values, log- or linear-spaced."""

import math
from dataclasses import dataclass, fields, replace

import numpy as np

from fractal_vmap.errors import UserError
from fractal_vmap.recipe import FinetuneConfig, TrainConfig, trainable_groups

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
DEFAULT_AXES = "num_tokens,lr"  # a nanochat grid's, when --axes is unset


@dataclass
class Axis:
    name: str
    values: list[float]
    scale: str

    @property
    def field(self) -> str:
        return AXES[self.name][0]


def make_axis(
    name: str, n: int, lo: float | None, hi: float | None, scale: str, which: str, table: dict = AXES
) -> Axis:
    """n values of axis `name` (defaults from `table`: AXES for nanochat grids, paper_task.PAPER_AXES for the paper's)."""
    if name not in table:
        raise UserError(f"unknown {which} axis {name!r}: choose from {', '.join(table)}")
    if n < 1:
        raise UserError(f"--{which} is {n}: a grid needs at least one {which[:-1]}")
    _, (dlo, dhi), dscale = table[name]
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
        raise UserError(
            f"{which} axis {name} is log-spaced but its min is {lo:g}: give a positive min or --{which[:-1]}_scale linear"
        )
    if name in INTEGER_AXES:  # a non-integer bound, rounded, leaves the range (seed 0.5..3.7 trained 0 and 4)
        for flag, value in ((f"--{which[:-1]}_min", lo), (f"--{which[:-1]}_max", hi)):
            if value != round(value):
                raise UserError(
                    f"{flag} {value:g}: the {which} axis {name} takes whole numbers: "
                    f"pass {math.floor(value)} or {math.ceil(value)}"
                )
    values = np.geomspace(lo, hi, n) if scale == "log" else np.linspace(lo, hi, n)
    if name in INTEGER_AXES:
        values = np.round(values)
    check_distinct(name, values, lo, hi, which)
    return Axis(name, [float(v) for v in values], scale)


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


def parse_axes(spec: str | None) -> tuple[str, str]:
    names = [a.strip() for a in (spec or DEFAULT_AXES).split(",")]
    if len(names) != 2 or names[0] == names[1]:
        raise UserError(f"--axes {spec!r}: give two different axes, rows first, e.g. --axes num_tokens,lr")
    return names[0], names[1]


def cell_config(base: FinetuneConfig, row: Axis, col: Axis, i: int, j: int, run_name: str) -> FinetuneConfig:
    """The `finetune` settings of cell (i, j): the base settings with both axis values put in."""
    values = {}
    for axis, k in ((row, i), (col, j)):
        values[axis.field] = int(axis.values[k]) if axis.name in INTEGER_AXES else axis.values[k]
    return replace(base, **values, run_name=f"{run_name}-r{i}-c{j}")


# ----------------------------------------------------------------------------- what the axes override

LR_FIELDS = {
    "matrix": "matrix_lr",
    "embedding": "embedding_lr",
    "unembedding": "unembedding_lr",
}  # group -> its own lr flag
MULT_FIELDS = {
    "embedding": "embedding_lr_mult",
    "unembedding": "unembedding_lr_mult",
}  # group -> its multiple of learning_rate
ADAMW_GROUPS = ("embedding", "unembedding")  # the groups weight_decay acts on


def cell_lrs(cfg: TrainConfig) -> dict[str, float | None]:
    """The learning rates a cell actually trains with, as their flags would set them (before nanochat's
    (n_embd/768)^-0.5 AdamW scale and init_lr_frac, which group_lrs applies): each group's (None if frozen), and the
    base learning_rate (None when no trained group derives its lr from it)."""
    groups = trainable_groups(cfg)
    lrs: dict[str, float | None] = {"learning_rate": None}
    for group, name in LR_FIELDS.items():
        own = getattr(cfg, name)
        derived = cfg.learning_rate * (getattr(cfg, MULT_FIELDS[group]) if group in MULT_FIELDS else 1.0)
        lrs[name] = None if group not in groups else own if own is not None else derived
        if group in groups and own is None:
            lrs["learning_rate"] = cfg.learning_rate
    return lrs


def per_cell_fields(row: Axis, col: Axis) -> dict[str, str]:
    """The settings an axis sets cell by cell: field -> "rows" or "cols"."""
    return {row.field: "rows", col.field: "cols"}


def lr_sources(cfg: TrainConfig, row: Axis, col: Axis) -> dict[str, float | str | None]:
    """Where each group's lr comes from in a grid: a number (the same for every cell), the axis that sets it, or
    None (frozen). For grid.json: a reader sees which lr each cell used without the overridden base."""
    axis_of = {
        field: f"{which} axis ({axis.name})"
        for field, which, axis in ((row.field, "rows", row), (col.field, "cols", col))
    }
    groups = trainable_groups(cfg)
    sources: dict[str, float | str | None] = {}
    for group, name in LR_FIELDS.items():
        mult = getattr(cfg, MULT_FIELDS[group]) if group in MULT_FIELDS else 1.0
        if group not in groups:
            sources[group] = None
        elif name in axis_of:
            sources[group] = axis_of[name]
        elif getattr(cfg, name) is not None:
            sources[group] = getattr(cfg, name)
        elif "learning_rate" in axis_of:
            sources[group] = axis_of["learning_rate"] + (f" x {mult:g}" if mult != 1.0 else "")
        else:
            sources[group] = cfg.learning_rate * mult
    return sources


def unused_fields(cfg: TrainConfig, row: Axis, col: Axis) -> dict[str, str]:
    """Settings that no cell of the grid reads, each with the reason: other settings win, or the axes set them cell by
    cell. An axis field that has another reason is an axis that changes nothing."""
    per_cell = per_cell_fields(row, col)
    groups = trainable_groups(cfg)
    unused: dict[str, str] = {}
    reads_base = False
    for group, name in LR_FIELDS.items():
        if group not in groups:
            unused[name] = f"the {group} is frozen (--trainable_param_groups {cfg.trainable_param_groups})"
            if group in MULT_FIELDS:
                unused[MULT_FIELDS[group]] = unused[name]
        elif name in per_cell or getattr(cfg, name) is not None:
            if group in MULT_FIELDS:
                unused[MULT_FIELDS[group]] = (
                    f"the {group} lr is set by {'an axis' if name in per_cell else '--' + name}"
                )
        else:
            reads_base = True
    if not reads_base:
        unused["learning_rate"] = "every trained group's lr is set by an axis or its own flag"
    if not any(g in groups for g in ADAMW_GROUPS):
        unused["weight_decay"] = "only the matrices train, and Muon has no weight decay"
    if cfg.num_iterations is not None:
        unused["num_tokens"] = f"--num_iterations {cfg.num_iterations} fixes the step count"
    for field, which in per_cell.items():
        unused.setdefault(field, f"the {which} axis sets it cell by cell")
    return unused


def is_given(cfg, name: str) -> bool:
    """Whether a setting differs from its default: given on the command line or in a config file. (A flag given at its
    default value cannot be told apart, and changes nothing.)"""
    default = next(f.default for f in fields(cfg) if f.name == name)
    return getattr(cfg, name) != default


def check_overrides(cfg: TrainConfig, row: Axis, col: Axis) -> list[str]:
    """Refuse, in one line, a flag that no cell would read (an axis or another setting overrides it) and an axis that
    would change nothing; return one warning line per setting that pins part of what an axis moves."""
    per_cell = per_cell_fields(row, col)
    unused = unused_fields(cfg, row, col)
    for field, which in per_cell.items():
        axis = row if which == "rows" else col
        if field in unused and not unused[field].startswith(f"the {which} axis"):
            raise UserError(
                f"the {which} axis {axis.name} would change nothing: {unused[field]}; choose another --axes"
            )
        if is_given(cfg, field):
            span = f"{axis.values[0]:g}..{axis.values[-1]:g}" if len(axis.values) > 1 else f"{axis.values[0]:g}"
            raise UserError(
                f"--{field} {getattr(cfg, field)} has no effect: {field} is the {which} axis ({axis.name} {span} over "
                f"{len(axis.values)} {which}); sweep another range with --{which[:-1]}_min/--{which[:-1]}_max, or fix it by choosing other --axes"
            )
    for field, reason in unused.items():
        if field not in per_cell and is_given(cfg, field):
            raise UserError(f"--{field} {getattr(cfg, field)} has no effect: {reason}; drop it")
    warnings = []
    if "learning_rate" in per_cell:
        which = per_cell["learning_rate"]
        groups = trainable_groups(cfg)
        pinned = [g for g in groups if getattr(cfg, LR_FIELDS[g]) is not None and LR_FIELDS[g] not in per_cell]
        moved = [g for g in groups if g not in pinned]
        for g in pinned:
            warnings.append(
                f"--{LR_FIELDS[g]} {getattr(cfg, LR_FIELDS[g])} pins the {g} lr: the {which} axis (lr) moves only the {' and '.join(moved)} lr"
            )
    return warnings
