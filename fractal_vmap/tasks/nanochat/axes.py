"""The nanochat task's axes: which `finetune` knob each sweeps, the settings of a cell, and what the axes override
(a flag that no cell would read is refused; one that pins part of what an axis moves is warned about)."""

from dataclasses import replace

from fractal_vmap.axes import Axis, AxisKind
from fractal_vmap.errors import UserError
from fractal_vmap.options import FinetuneConfig, TrainConfig, is_given
from fractal_vmap.recipe import ADAMW_GROUPS, LR_FLAGS, LR_MULTS, flag_lr, lr_source, trainable_groups

DEFAULT_AXES = "num_tokens,lr"  # a nanochat grid's rows and cols, when --axes is unset
AXES = {
    "num_tokens": AxisKind("num_tokens", (1000.0, 8000.0), "log", integer=True),
    "lr": AxisKind("learning_rate", (1e-2, 1e2), "log"),
    "matrix_lr": AxisKind("matrix_lr", (1e-3, 1e2), "log"),
    "unembedding_lr": AxisKind("unembedding_lr", (1e-4, 1e1), "log"),
    "embedding_lr": AxisKind("embedding_lr", (1e-3, 1e2), "log"),
    "weight_decay": AxisKind("weight_decay", (0.0, 1.0), "linear"),
    "warmup_frac": AxisKind("warmup_frac", (0.0, 0.5), "linear"),
    "final_lr_frac": AxisKind("final_lr_frac", (0.0, 1.0), "linear"),
    "seed": AxisKind("seed", (0.0, 7.0), "linear", integer=True),
    "lora_rank": AxisKind("lora_rank", (2.0, 64.0), "log", integer=True),
    "lora_alpha": AxisKind("lora_alpha", (1.0, 256.0), "log"),
}


def cell_config(base: FinetuneConfig, row: Axis, col: Axis, i: int, j: int, run_name: str) -> FinetuneConfig:
    """The `finetune` settings of cell (i, j): the base settings with both axis values put in."""
    values = {}
    for axis, k in ((row, i), (col, j)):
        values[axis.field] = int(axis.values[k]) if AXES[axis.name].integer else axis.values[k]
    return replace(base, **values, run_name=f"{run_name}-r{i}-c{j}")


# ----------------------------------------------------------------------------- what the axes override


def cell_lrs(cfg: TrainConfig) -> dict[str, float | None]:
    """The learning rates a cell actually trains with, as their flags would set them (recipe.flag_lr: before
    nanochat's (n_embd/768)^-0.5 AdamW scale and init_lr_frac): each group's (None if frozen), and the base
    learning_rate (None when no trained group derives its lr from it)."""
    groups = trainable_groups(cfg)
    lrs: dict[str, float | None] = {"learning_rate": None}
    for group, name in LR_FLAGS.items():
        lrs[name] = flag_lr(cfg, group) if group in groups else None
        if group in groups and lr_source(cfg, group)[0] == "learning_rate":
            lrs["learning_rate"] = cfg.learning_rate
    return lrs


def per_cell_fields(row: Axis, col: Axis) -> dict[str, str]:
    """The settings an axis sets cell by cell: field -> "rows" or "cols"."""
    return {row.field: "rows", col.field: "cols"}


def is_lora(cfg: TrainConfig, row: Axis, col: Axis) -> bool:
    """Whether the grid's cells train LoRA adapters: --lora_rank > 0, or a lora_rank axis."""
    return cfg.lora_rank > 0 or "lora_rank" in per_cell_fields(row, col)


def grid_groups(cfg: TrainConfig, row: Axis, col: Axis) -> list[str]:
    """The groups the grid's cells train: under LoRA only the matrices (through their adapters)."""
    return ["matrix"] if is_lora(cfg, row, col) else trainable_groups(cfg)


def lr_sources(cfg: TrainConfig, row: Axis, col: Axis) -> dict[str, float | str | None]:
    """Where each group's lr comes from in a grid: a number (the same for every cell), the axis that sets it, or
    None (frozen). For grid.json: a reader sees which lr each cell used without the overridden base."""
    axis_of = {axis.field: f"{which} axis ({axis.name})" for which, axis in (("rows", row), ("cols", col))}
    groups = grid_groups(cfg, row, col)
    sources: dict[str, float | str | None] = {}
    for group, own in LR_FLAGS.items():
        name, mult = lr_source(cfg, group)
        if group not in groups:
            sources[group] = None
        elif own in axis_of:  # the axis sets the group's own flag, cell by cell
            sources[group] = axis_of[own]
        elif name in axis_of:
            sources[group] = axis_of[name] + (f" x {mult:g}" if mult != 1.0 else "")
        else:
            sources[group] = getattr(cfg, name) * mult
    return sources


def unused_fields(cfg: TrainConfig, row: Axis, col: Axis) -> dict[str, str]:
    """Settings that no cell of the grid reads, each with the reason: other settings win, or the axes set them cell by
    cell. An axis field that has another reason is an axis that changes nothing."""
    per_cell = per_cell_fields(row, col)
    groups, lora = grid_groups(cfg, row, col), is_lora(cfg, row, col)
    unused: dict[str, str] = {}
    reads_base = False
    frozen_by = (
        "under LoRA only the adapters train" if lora else f"--trainable_param_groups {cfg.trainable_param_groups}"
    )
    for group, name in LR_FLAGS.items():
        if group not in groups:
            unused[name] = f"the {group} is frozen ({frozen_by})"
            if group in LR_MULTS:
                unused[LR_MULTS[group]] = unused[name]
        elif name in per_cell or getattr(cfg, name) is not None:
            if group in LR_MULTS:
                unused[LR_MULTS[group]] = f"the {group} lr is set by {'an axis' if name in per_cell else '--' + name}"
        else:
            reads_base = True
    if not reads_base:
        unused["learning_rate"] = "every trained group's lr is set by an axis or its own flag"
    if not any(g in groups for g in ADAMW_GROUPS) and not lora:  # (the adapters' AdamW decays them)
        unused["weight_decay"] = "only the matrices train, and Muon has no weight decay"
    if lora:
        unused["trainable_param_groups"] = "under LoRA only the adapters train"
    else:
        for name in ("lora_alpha", "lora_targets"):
            unused[name] = "LoRA is off (--lora_rank 0)"
    if cfg.num_iterations is not None:
        unused["num_tokens"] = f"--num_iterations {cfg.num_iterations} fixes the step count"
    for field, which in per_cell.items():
        unused.setdefault(field, f"the {which} axis sets it cell by cell")
    return unused


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
                f"{len(axis.values)} {which}); sweep another range with --{which[:-1]}_min/--{which[:-1]}_max, or fix "
                "it by choosing other --axes"
            )
    for field, reason in unused.items():
        if field not in per_cell and is_given(cfg, field):
            raise UserError(f"--{field} {getattr(cfg, field)} has no effect: {reason}; drop it")
    warnings = []
    if "learning_rate" in per_cell:
        which = per_cell["learning_rate"]
        groups = grid_groups(cfg, row, col)
        pinned = [g for g in groups if getattr(cfg, LR_FLAGS[g]) is not None and LR_FLAGS[g] not in per_cell]
        moved = [g for g in groups if g not in pinned]
        for g in pinned:
            warnings.append(
                f"--{LR_FLAGS[g]} {getattr(cfg, LR_FLAGS[g])} pins the {g} lr: the {which} axis (lr) moves only the "
                f"{' and '.join(moved)} lr"
            )
    return warnings
