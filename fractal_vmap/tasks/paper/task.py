"""The paper-mlp task of a grid (`grid --task paper-mlp`): each cell trains the paper's MLP (mlp.py) by full-batch
gradient descent at its axis values, one lane a pixel on the lane engine. It runs through the same grid pipeline as a
nanochat grid (grid/pipeline.py): grid.json, one row file a row (each lane's loss curve and labels), cells.parquet,
fractal.json and both pictures, resumed row by row, one writer at a time; labelled with the same measure and threshold
as every grid (analysis/labels.py).

The axes follow --phase_space: lr_vs_lr has rows = lr1 (output layer) and cols = lr0 (input layer), by default log10
lr in [-3, 6] on both (the notebook's first picture); offset_vs_lr has rows = lr (both layers) and cols = the offset
added to every initial W0 weight. A zoom (grid/zoom.py) passes the parent's exact axis values instead of a range.
"""

from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from fractal_vmap.analysis.labels import label_runs
from fractal_vmap.axes import Axis, AxisKind
from fractal_vmap.errors import UserError
from fractal_vmap.options import GridConfig, is_given
from fractal_vmap.recipe import resolve_device
from fractal_vmap.tasks.paper.mlp import (
    DEFAULT_VIEW,
    LANE_CHUNK,
    PHASE_SPACES,
    PaperConfig,
    check_config,
    num_params,
    num_points,
    train_paper_lanes,
)

NAME = "paper-mlp"
CELL_BYTES = 0  # a fine cell holds nothing of the task's until it trains
WORKERS = False  # one process: a 256 x 256 grid trains in under a minute, its chunks on every core
DEFAULT_STEPS = 100  # gradient descent steps when --num_iterations is unset (the paper: 500 to 1000)
VIEW = (10 ** DEFAULT_VIEW[0], 10 ** DEFAULT_VIEW[1])
# the offset's range is ours (the notebook's is not stated)
AXES = {
    "lr0": AxisKind("lr0", VIEW, "log"),
    "lr1": AxisKind("lr1", VIEW, "log"),
    "lr": AxisKind("lr", VIEW, "log"),
    "offset": AxisKind("offset", (-2.0, 2.0), "linear"),
}
SPACE_AXES = {"lr_vs_lr": ("lr1", "lr0"), "offset_vs_lr": ("lr", "offset")}  # phase space -> (rows axis, cols axis)
# the grid options a paper-mlp grid reads (axes must be unset); every other one is nanochat's, refused when given
PAPER_READS = (
    "task",
    "axes",
    "rows",
    "cols",
    "row_min",
    "row_max",
    "col_min",
    "col_max",
    "row_scale",
    "col_scale",
    "run_dir",
    "device",
    "dtype",
    "seed",
    "num_iterations",
    "trainable_window_steps",
    "trainable_loss_ratio_threshold",
    "refine",
    "phase_space",
    "width",
    "activation",
    "data_multiple",
    "workers",
    "perturb_ulp",
    "twin_of",
    "wandb",
    "wandb_project",
    "wandb_entity",
)


@dataclass
class PaperPlan:
    """Everything a paper-mlp grid needs, checked, before its run dir is touched."""

    cfg: GridConfig
    paper: PaperConfig
    row: Axis
    col: Axis
    device: torch.device
    spec: dict
    run_dir: Path | None = None  # set by the grid pipeline (grid/pipeline.py plan_grid)

    rate = "lane-steps/s"  # the progress' rate: networks x gradient steps

    @property
    def data(self) -> dict:
        """grid.json's account of the data."""
        return {"train_points": num_points(self.paper)}

    def describe(self) -> str:
        return (
            f"{num_points(self.paper)} training points, {self.paper.steps} steps of full-batch gradient descent a cell"
        )

    def steps(self, points: list[tuple[int, int]]) -> list[int]:
        return [self.paper.steps] * len(points)

    def train(self, points: list[tuple[int, int]], progress=None) -> tuple[dict, int]:
        """Train the cells `points` ((row, col) indices: a row, or a refinement level's cells) as the lanes of one
        call, each at its axis values (mlp.phase_lanes' mapping); their results as a table (analysis/runs.py: one
        array a field, a cell an entry), and the lane chunk."""
        rows = torch.tensor([self.row.values[i] for i, _ in points], dtype=torch.float64)
        cols = torch.tensor([self.col.values[j] for _, j in points], dtype=torch.float64)
        lr0, lr1, offset = (
            (cols, rows, torch.zeros_like(rows)) if self.cfg.phase_space == "lr_vs_lr" else (rows, rows, cols)
        )
        chunk = LANE_CHUNK if self.device.type == "cpu" else len(points)  # a GPU takes them all at once
        steps = self.paper.steps

        def chunk_done(start: int, n: int) -> None:  # in order, as each chunk's losses are in
            if progress is not None:
                progress.chunk(list(range(start, start + n)), [steps] * n)(steps, steps, n * steps)

        losses = train_paper_lanes(self.paper, lr0, lr1, offset, chunk=chunk, device=self.device, on_chunk=chunk_done)
        table = lane_table(losses, self.cfg.trainable_window_steps, self.cfg.trainable_loss_ratio_threshold)
        table["grid_i"] = np.array([i for i, _ in points], dtype=np.int64)
        table["grid_j"] = np.array([j for _, j in points], dtype=np.int64)
        return table, min(chunk, len(points))

    def cell_lrs(self) -> None:
        return None  # the axes are the learning rates (cells.parquet's axis columns)


def axis_names(cfg: GridConfig) -> tuple[str, str]:
    """The rows and cols axes of --phase_space."""
    if cfg.phase_space not in SPACE_AXES:
        raise UserError(f"unknown --phase_space {cfg.phase_space!r}: use one of {', '.join(PHASE_SPACES)}")
    return SPACE_AXES[cfg.phase_space]


def zoom_options(settings: dict) -> dict:
    """A zoom's options from its parent's spec settings (the PaperConfig fields under their flags' names)."""
    return {
        "task": NAME,
        "num_iterations": settings["steps"],
        "dtype": settings["dtype"],
        "width": settings["width"],
        "activation": settings["activation"],
        "data_multiple": settings["data_multiple"],
        "seed": settings["seed"],
        "phase_space": settings["phase_space"],
        "trainable_window_steps": settings["trainable_window_steps"],
        "trainable_loss_ratio_threshold": settings["trainable_loss_ratio_threshold"],
        **({"refine": settings["refine"]} if "refine" in settings else {}),
        **({"perturb_ulp": settings["perturb_ulp"]} if "perturb_ulp" in settings else {}),
    }


def paper_config(cfg: GridConfig) -> PaperConfig:
    dtype = "float64" if cfg.dtype == "auto" else cfg.dtype
    return PaperConfig(
        width=cfg.width,
        activation=cfg.activation,
        steps=cfg.num_iterations or DEFAULT_STEPS,
        data_multiple=cfg.data_multiple,
        dtype=dtype,
        seed=cfg.seed,
        perturb_ulp=cfg.perturb_ulp,
    )


def make_spec(
    cfg: GridConfig, paper: PaperConfig, row: Axis, col: Axis, device: torch.device, parent: dict | None
) -> dict:
    """What the numbers depend on, in the shape every grid's spec has (the captions and `plot` read it)."""
    lr0, lr1 = (
        ("cols axis (lr0)", "rows axis (lr1)")
        if cfg.phase_space == "lr_vs_lr"
        else ("rows axis (lr)", "rows axis (lr)")
    )
    spec = {
        "axes": {"rows": row.to_spec(), "cols": col.to_spec()},
        "settings": {
            "task": NAME,
            **asdict(paper),
            "phase_space": cfg.phase_space,
            "device": device.type,
            "trainable_window_steps": cfg.trainable_window_steps,
            "trainable_loss_ratio_threshold": cfg.trainable_loss_ratio_threshold,
        },
        "group_lrs": {"layer 0": lr0, "layer 1": lr1},
        "model": {"source": f"paper-mlp (width {paper.width}, {paper.activation}, {num_params(paper)} parameters)"},
        "dataset": {"source": f"N(0, 1) inputs and targets ({num_points(paper)} points, seed {paper.seed})"},
    }
    if not paper.perturb_ulp:  # recorded only when set, so run dirs written before it existed resume
        del spec["settings"]["perturb_ulp"]
    if cfg.refine:
        spec["settings"]["refine"] = cfg.refine  # the cells a refined grid trains depend on it (grid/refine.py)
    if parent is not None:
        spec["parent"] = parent
    return spec


def check_paper_fields(cfg: GridConfig) -> None:
    """Refuse, in one line, a nanochat setting on a paper-mlp grid, which would ignore it (the mirror of the nanochat
    task's refusal of a paper setting)."""
    if cfg.axes is not None:
        raise UserError(
            f"--axes {cfg.axes} is for nanochat grids: the paper task's axes follow --phase_space "
            f"({', '.join(PHASE_SPACES)})"
        )
    for f in fields(GridConfig):
        if f.name not in PAPER_READS and is_given(cfg, f.name):
            raise UserError(
                f"--{f.name} {getattr(cfg, f.name)} has no effect on a paper-mlp grid (the paper's MLP "
                "brings its own model, data and gradient descent; its learning rates are the axes, see "
                "--phase_space): drop it, or leave out --task paper-mlp"
            )


def plan(cfg: GridConfig, row: Axis, col: Axis, parent: dict | None = None) -> PaperPlan:
    """Every check before any work."""
    check_paper_fields(cfg)
    if cfg.dtype not in ("auto", "float64", "float32"):
        raise UserError(f"--dtype {cfg.dtype} for the paper task: use float64 (auto) or float32")
    paper = paper_config(cfg)
    check_config(paper)
    device = resolve_device(cfg.device)
    spec = make_spec(cfg, paper, row, col, device, parent)
    return PaperPlan(cfg, paper, row, col, device, spec)


def lane_table(losses: torch.Tensor, window: int, threshold: float) -> dict[str, np.ndarray]:
    """The lanes' results as columns from their losses [steps, lanes] (NaN after a lane's first non-finite loss):
    label_runs' labels, total_steps, and the curves [lanes, steps] (runs.lanes_of cuts each at its run's end)."""
    curves = np.ascontiguousarray(losses.T.numpy())
    labels = label_runs(curves, [curves.shape[1]] * curves.shape[0], window, threshold)
    return {**labels, "total_steps": np.full(curves.shape[0], curves.shape[1]), "losses": curves}
