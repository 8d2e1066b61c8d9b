"""Which grids a study runs, as grid options: the map of a plane (refined from a coarse grid), its twins (twin.py:
trained on the map's boundary only), zooms into the box with the most boundary (each a refined grid of the same side),
and, for nanochat, the num_tokens x lr plane. Every grid gets a fixed run dir inside the study dir, so the same
options name the same run dirs on a rerun and each resumes."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fractal_vmap.analysis.boxes import boundary_boxes
from fractal_vmap.analysis.runs import read_grid
from fractal_vmap.axes import Axis
from fractal_vmap.errors import UserError
from fractal_vmap.grid.zoom import child_config, zoom_grid
from fractal_vmap.options import GridConfig, StudyConfig, ZoomConfig
from fractal_vmap.tasks import get_task

TASKS = ("nanochat-sft", "paper-mlp")
TWINS = ("ulp", "seed")
# quick / full defaults: a default-model lane costs ~0.03 s a step on 2 unshared CPU cores (500 tokens: 8 steps), the
# paper's MLP microseconds; the full study's budgets are sized to its 45-minute target (README: the study's cost)
DEFAULTS = {
    "nanochat-sft": dict(coarse=(5, 9), refine=(2, 3), zooms=(1, 3), num_tokens=(500, 500)),
    "paper-mlp": dict(coarse=(17, 33), refine=(2, 3), zooms=(1, 3), num_tokens=(0, 0)),
}
TOKENS = dict(token_min=(250, 250), token_max=(1000, 4000), token_rows=(3, 5), token_refine=(2, 2))
PLANES = {False: ("matrix_lr", "unembedding_lr"), True: ("matrix_lr", "lora_alpha")}  # under LoRA the lm_head is frozen


@dataclass
class Settings:
    """A study's options with the defaults of --quick or the full study filled in."""

    cfg: StudyConfig
    coarse: int
    refine: int
    zooms: int
    num_tokens: int
    token_min: int
    token_max: int
    token_rows: int
    token_refine: int
    plane: tuple[str, str]
    twins: list[str]

    @property
    def side(self) -> int:
        return (self.coarse - 1) * 2**self.refine + 1


def settings(cfg: StudyConfig) -> Settings:
    """Every default filled in and every option checked, one line each, before any work."""
    if cfg.task not in TASKS:
        raise UserError(f"--task {cfg.task!r}: a study runs nanochat-sft or paper-mlp")
    pick = lambda name, value, pair, unset: pair[not cfg.quick] if value == unset else value  # noqa: E731
    table = DEFAULTS[cfg.task]
    values = {k: pick(k, getattr(cfg, k), table[k], -1 if k == "zooms" else 0) for k in table}
    if cfg.task == "nanochat-sft":
        values.update({k: pick(k, getattr(cfg, k), TOKENS[k], 0) for k in TOKENS})
    else:
        values.update(token_min=0, token_max=0, token_rows=0, token_refine=0)
    values["plane"] = study_plane(cfg)
    twins = [] if cfg.twins.strip() == "none" else [t.strip() for t in cfg.twins.split(",") if t.strip()]
    bad = [t for t in twins if t not in TWINS]
    if bad:
        raise UserError(f"--twins {cfg.twins!r}: use a comma list of {', '.join(TWINS)}, or none")
    if cfg.task == "paper-mlp":  # the paper's MLP trains full-batch: no data order; its seed draws the network itself
        twins = [t for t in twins if t != "seed"]
    s = Settings(cfg, twins=twins, **values)
    if s.coarse < 3:
        raise UserError(f"--coarse {s.coarse}: a map's coarse grid needs at least 3 values a side")
    for name, value in (("refine", s.refine), ("token_refine", s.token_refine or 1)):
        if not 1 <= value <= 6:
            raise UserError(f"--{name} {value}: use 1 to 6 levels (each halves the spacing near the boundary)")
    if s.zooms < 0:
        raise UserError(f"--zooms {s.zooms}: use 0 or more zoom levels (-1: the default)")
    if s.zooms and (not 0 < cfg.zoom_box < 1 or int(cfg.zoom_box * s.side) < 2):
        raise UserError(f"--zoom_box {cfg.zoom_box}: use a fraction in (0, 1) that leaves a box of >= 2 cells")
    if cfg.task == "nanochat-sft":
        if s.num_tokens < 1 or not 1 <= s.token_min < s.token_max or s.token_rows < 2:
            raise UserError(
                f"--num_tokens {s.num_tokens} --token_min {s.token_min} --token_max {s.token_max} --token_rows "
                f"{s.token_rows}: use positive budgets with token_min < token_max, and >= 2 token rows"
            )
    return s


def study_plane(cfg: StudyConfig) -> tuple[str, str]:
    """The map's axes (--plane, or the default for full fine-tuning or LoRA), checked: two continuous axes of the
    task, a zoom needing values between any two."""
    nanochat = cfg.task == "nanochat-sft"
    if not nanochat:
        if cfg.plane or cfg.lora_rank:
            raise UserError("--plane and --lora_rank are nanochat-sft's: the paper's map is lr1 x lr0; leave them out")
        return ("lr1", "lr0")
    names = tuple(n.strip() for n in cfg.plane.split(",")) if cfg.plane.strip() else PLANES[cfg.lora_rank > 0]
    table = get_task(cfg.task).AXES
    usable = [n for n, kind in table.items() if not kind.integer and (cfg.lora_rank > 0 or not n.startswith("lora"))]
    if len(names) != 2 or len(set(names)) != 2 or any(n not in usable for n in names):
        why = " (lora_rank, num_tokens and seed take integers: a zoom needs values between any two)"
        if "lora_alpha" in names and not cfg.lora_rank:
            why = " (lora_alpha needs --lora_rank R)"
        raise UserError(f"--plane {cfg.plane!r}: name two different axes of {', '.join(usable)}{why}")
    if cfg.lora_rank > 0 and {"unembedding_lr", "embedding_lr"} & set(names):
        raise UserError(
            f"--plane {cfg.plane!r}: under LoRA the embedding and lm_head are frozen; try matrix_lr,lora_alpha"
        )
    return names


def grid_options(s: Settings, refine: int = 0, **extra) -> GridConfig:
    """A map's options: the study's task, model, data, LoRA, device and W&B, refined from the coarse grid."""
    cfg = s.cfg
    common = dict(task=cfg.task, device=cfg.device, seed=cfg.seed, wandb=cfg.wandb, refine=refine or s.refine)
    common.update(wandb_project=cfg.wandb_project, wandb_entity=cfg.wandb_entity)
    if cfg.task == "nanochat-sft":
        common.update(model=cfg.model, dataset=cfg.dataset)
        common.update(lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_targets=cfg.lora_targets)
    elif cfg.model != "default" or cfg.dataset != "default":
        raise UserError("--model and --dataset are nanochat-sft's: the paper's MLP brings its own; leave them out")
    return GridConfig(**common, rows=s.coarse, cols=s.coarse, **extra)


def map_options(s: Settings, run_dir: Path) -> GridConfig:
    """The top level: nanochat's plane (matrix_lr x unembedding_lr by default) at one token budget, or the paper's
    lr1 x lr0 view."""
    if s.cfg.task == "nanochat-sft":
        cfg = grid_options(s, axes=",".join(s.plane), num_tokens=s.num_tokens, run_dir=str(run_dir))
        if "lora_alpha" in s.plane:  # the plane sweeps it (--lora_alpha is the num_tokens x lr plane's)
            cfg.lora_alpha = GridConfig.lora_alpha
        return cfg
    return grid_options(s, run_dir=str(run_dir))


def tokens_options(s: Settings, run_dir: Path) -> GridConfig:
    """nanochat's num_tokens x lr plane: token budgets as rows, the base lr (matrix lr; lm_head 0.2x) as cols."""
    cfg = grid_options(
        s, s.token_refine, axes="num_tokens,lr", row_min=s.token_min, row_max=s.token_max, run_dir=str(run_dir)
    )
    cfg.rows = s.token_rows
    return cfg


def parent_axes(spec: dict) -> tuple[Axis, Axis]:
    """A finished grid's exact axes, as a twin over them needs."""
    table = get_task(spec["settings"].get("task", GridConfig.task)).AXES
    return tuple(Axis(**spec["axes"][k], field=table[spec["axes"][k]["name"]].setting) for k in ("rows", "cols"))


def twin_options(s: Settings, parent_dir: Path, kind: str, run_dir: Path) -> tuple[GridConfig, tuple[Axis, Axis]]:
    """The `kind` twin of a finished map: its settings and exact axes, with --perturb_ulp 1 (ulp) or seed + 1 (seed),
    trained on the map's boundary neighbourhood (--twin_of)."""
    _, grid, _ = read_grid(str(parent_dir))
    spec = grid["spec"]
    axes = parent_axes(spec)
    cfg = child_config(spec["settings"], str(run_dir))
    cfg.wandb, cfg.twin_of = s.cfg.wandb, str(parent_dir)
    for which, axis in zip(("row", "col"), axes):
        setattr(cfg, f"{which}s", len(axis.values))
        setattr(cfg, f"{which}_min", axis.values[0])
        setattr(cfg, f"{which}_max", axis.values[-1])
        setattr(cfg, f"{which}_scale", axis.scale)
    if kind == "ulp":
        cfg.perturb_ulp += 1
    else:
        cfg.seed += 1
    return cfg, axes


def zoom_box(parent_dir: Path, fraction: float) -> tuple[list[int], int]:
    """The square box of the parent's map (side `fraction` of its shorter one) with the most edge pixels, as
    [r0, r1, c0, c1], and its edge pixels (0: the map has no boundary to zoom into)."""
    _, _, measure = read_grid(str(parent_dir))
    size = max(2, int(fraction * min(measure.shape)))
    boxes = boundary_boxes(measure, size, 1)
    if not boxes:
        return [], 0
    b = boxes[0]
    return [b.row0, b.row1, b.col0, b.col1], b.edges


def zoom_options(s: Settings, parent_dir: Path, box: list[int], run_dir: Path):
    """A zoom into `box` of the parent, refined as the map was (the same side): its options, axes and parent."""
    zoom = ZoomConfig(
        run=str(parent_dir),
        box=f"{box[0]}:{box[1]},{box[2]}:{box[3]}",
        rows=s.coarse,
        cols=s.coarse,
        refine=s.refine,
        run_dir=str(run_dir),
    )
    cfg, axes, parent = zoom_grid(zoom)
    cfg.wandb = s.cfg.wandb
    return cfg, axes, parent


def level_names(s: Settings) -> list[str]:
    """The run dir names of the map's levels: map, zoom1, zoom2, ..."""
    return ["map"] + [f"zoom{k}" for k in range(1, s.zooms + 1)]


def spacing_decades(values) -> float:
    """Mean step of an axis in decades (log10), for a log axis."""
    return float(np.mean(np.diff(np.log10(np.asarray(values, dtype=np.float64)))))
