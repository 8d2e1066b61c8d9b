"""The nanochat SFT task of a grid: each cell fine-tunes a nanochat base model on an SFT dataset with the recipe's
AdamW + Muon (recipe.py), its two axes any of the `finetune` knobs (axes.py); a row of cells trains as lanes of the
lane engine (row.py) in chunks sized by memory (chunks.py). `plan` does every check and load before the run dir is
touched; its spec is what the numbers depend on.
"""

from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from fractal_vmap.axes import Axis, parse_axes
from fractal_vmap.console import console
from fractal_vmap.data import make_stream, render_split, total_steps
from fractal_vmap.errors import UserError
from fractal_vmap.files import file_sha256
from fractal_vmap.kernels import resolve as resolve_kernels
from fractal_vmap.options import FinetuneConfig, GridConfig, TrainConfig
from fractal_vmap.recipe import autocast_name, group_lrs, resolve_device, validate
from fractal_vmap.sources import load_model, resolve_source
from fractal_vmap.tasks.nanochat.axes import (
    AXES,  # noqa: F401 (the task's axis table, for the grid)
    DEFAULT_AXES,
    cell_config,
    cell_lrs,
    check_overrides,
    is_lora,
    lr_sources,
    unused_fields,
)
from fractal_vmap.tasks.nanochat.chunks import train_row
from fractal_vmap.tasks.nanochat.compiled import resolve_compile
from fractal_vmap.tasks.nanochat.memory import parse_bytes, parse_levers

NAME = "nanochat-sft"
CELL_BYTES = 1750  # host memory of a fine cell's FinetuneConfig (tracemalloc, CPython 3.11): plan makes one a cell
WORKERS = True  # rows may train on several workers (grid/shard.py)
# fields that change neither the numbers nor the picture: left out of the spec a resumed run must match
RUN_ONLY_FIELDS = (
    "run_dir",
    "twin_of",  # the spec records the parent's digest and dir name instead (grid/twin.py)
    "lane_chunk",
    "workers",
    "memory_budget",
    "levers",
    "run_name",
    "wandb",
    "wandb_project",
    "wandb_entity",
)
# settings that change the numbers but joined the spec later: left out at these defaults, so older run dirs resume
LATER_FIELDS = {
    "micro_batches": 1,
    "momentum_dtype": "float32",
    "master_dtype": "float32",
    "task": "nanochat-sft",
    "refine": 0,
    "lora_rank": 0,
    "lora_alpha": 16.0,
    "lora_targets": "all",
}
RESOLVED = ("device", "dtype", "kernels")  # spec settings recorded as resolved on the machine that ran them
PAPER_FIELDS = {"width": 8, "activation": "tanh", "phase_space": "lr_vs_lr", "data_multiple": 1.0}  # the paper task's


@dataclass
class NanochatPlan:
    """Everything a nanochat grid needs, checked and loaded, before its run dir is touched."""

    cfg: GridConfig
    row: Axis
    col: Axis
    device: torch.device
    kernels: str  # "torch" or "triton", resolved
    model: tuple  # (GPTConfig, params, tokenizer)
    examples: list
    dropped: int
    cells: list[list[FinetuneConfig]]  # [rows][cols]
    spec: dict
    compile: bool = False  # --compile, resolved: the row step under torch.compile (compiled.py)
    run_dir: Path | None = None  # set by the grid pipeline (grid/pipeline.py plan_grid)

    rate = "tok/s"  # the progress' rate: tokens through the model

    @property
    def data(self) -> dict:
        """grid.json's account of the data."""
        return {"train_examples": len(self.examples), "dropped_examples": self.dropped}

    def describe(self) -> str:
        return (
            f"{len(self.examples)} training examples ({self.dropped} dropped: no supervised token within max_seq_len)"
        )

    def steps(self, points: list[tuple[int, int]]) -> list[int]:
        """The step count of each of these cells, as train_row will find it (from the first batch of its seed's
        stream): the work the progress' ETA is measured in."""
        cfgs = [self.cells[i][j] for i, j in points]
        tokenizer = self.model[2]
        first = {
            s: make_stream(cfgs[0], tokenizer, self.examples, s).batch(0)[1] for s in sorted({c.seed for c in cfgs})
        }
        return [total_steps(c, first[c.seed]) for c in cfgs]

    def train(self, points: list[tuple[int, int]], progress=None) -> tuple[list[dict], int]:
        """Train the cells `points` ((row, col) indices: a row, or a refinement level's cells) as the lanes of one
        row; one result a cell, and the lane chunk that ran last."""
        results, chunk = train_row(self, [self.cells[i][j] for i, j in points], progress)
        for (i, j), r in zip(points, results):
            r.update(grid_i=i, grid_j=j)
        return results, chunk

    def cell_lrs(self) -> list[list[dict]]:
        """The learning rates each cell trained with (cells.parquet's columns)."""
        return [[cell_lrs(c) for c in row] for row in self.cells]


def axis_names(cfg: GridConfig) -> tuple[str, str]:
    """The rows and cols axes a grid asks for (--axes; unset: num_tokens,lr)."""
    return parse_axes(cfg.axes or DEFAULT_AXES)


def zoom_options(settings: dict) -> dict:
    """A zoom's options from its parent's spec settings: every grid option the spec holds (a null one: the default),
    but the resolved ones (device, dtype, kernels), which the zoom resolves again ("compile" is "on" or absent)."""
    names = {f.name for f in fields(GridConfig)}
    return {k: v for k, v in settings.items() if k in names and v is not None and k not in RESOLVED}


def base_config(cfg: GridConfig) -> FinetuneConfig:
    """The grid's settings as one cell's `finetune` settings (before the axis values go in; finetune-only ones
    default)."""
    return FinetuneConfig(**{f.name: getattr(cfg, f.name) for f in fields(TrainConfig)})


def source_id(source: str, path: Path | None) -> dict:
    """A model or dataset id for the spec: the source string plus a content hash where there is a local file."""
    from fractal_vmap.checkpoint import last_step, model_files_dir

    if path is None or not path.exists():
        return {"source": source}
    if path.is_file():
        return {"source": source, "sha256": file_sha256(path)}
    step = last_step(path)
    return {"source": source, "step": step, "sha256": file_sha256(model_files_dir(path) / f"model_{step:06d}.pt")}


def make_spec(
    cfg: GridConfig, row: Axis, col: Axis, model_path: Path, device: torch.device, kernels: str, compile: bool = False
) -> dict:
    """What the numbers depend on. Device, dtype, kernels and compile as resolved (auto on a CPU machine is cpu,
    float32, torch, off).
    Settings no cell reads (an axis sets them, or another setting wins) are null; group_lrs says where each group's lr
    comes from."""
    unused = unused_fields(cfg, row, col)
    settings = {
        k: None if k in unused else v
        for k, v in asdict(cfg).items()
        if k not in RUN_ONLY_FIELDS and k not in PAPER_FIELDS and not (k in LATER_FIELDS and v == LATER_FIELDS[k])
    }
    settings["device"] = device.type
    settings["dtype"] = autocast_name(cfg, device)
    settings["kernels"] = kernels
    del settings["compile"]  # as resolved, and only when on (it moves the numbers slightly), so older run dirs resume
    if compile:
        settings["compile"] = "on"
    return {
        "axes": {"rows": row.to_spec(), "cols": col.to_spec()},
        "settings": settings,
        "group_lrs": lr_sources(cfg, row, col),
        "model": source_id(cfg.model, model_path),
        "dataset": source_id(cfg.dataset, Path(cfg.dataset) if cfg.dataset != "default" else None),
    }


def plan(cfg: GridConfig, row: Axis, col: Axis, parent: dict | None = None) -> NanochatPlan:
    """Every check and load a grid needs, each bad input one clear line, all before the run dir is created."""
    validate(cfg)
    cfg.axes = cfg.axes or DEFAULT_AXES  # as the spec has always recorded it
    for name, default in PAPER_FIELDS.items():
        if getattr(cfg, name) != default:
            raise UserError(
                f"--{name} is a setting of --task paper-mlp: leave it out of a nanochat grid, or add --task paper-mlp"
            )
    if cfg.lane_chunk < 0:
        raise UserError(f"--lane_chunk is {cfg.lane_chunk}: use 0 (auto) or a positive number of lanes")
    if cfg.perturb_ulp < 0:
        raise UserError(f"--perturb_ulp is {cfg.perturb_ulp}: use 0 (no nudge) or a positive number of ulps")
    # refuses a flag an axis overrides; warns of one that pins part of an axis
    for line in check_overrides(cfg, row, col):
        console.print(f"[yellow]warning:[/yellow] {line}", highlight=False, soft_wrap=True)
    device = resolve_device(cfg.device)
    kernels = resolve_kernels(cfg.kernels, device)
    if kernels == "triton" and device.type == "cpu":
        console.print(
            "[yellow]--kernels triton on CPU: Triton's interpreter runs the kernels, very slowly (for tests and "
            "debugging)[/yellow]"
        )
    if kernels == "triton" and "bfloat16" in (cfg.momentum_dtype, cfg.master_dtype):
        raise UserError(
            "--momentum_dtype/--master_dtype bfloat16 run on the torch optimizer steps only: add --kernels torch"
        )
    parse_levers(cfg.levers, cfg.micro_batches, cfg.momentum_dtype, cfg.master_dtype, autocast_name(cfg, device))
    if cfg.memory_budget is not None:
        parse_bytes(cfg.memory_budget)
    if cfg.device_batch_size % cfg.micro_batches:
        raise UserError(
            f"--device_batch_size {cfg.device_batch_size} does not split into {cfg.micro_batches} micro-batches: pick "
            "a divisor"
        )
    compile = resolve_compile(cfg.compile, device)
    if is_lora(cfg, row, col):  # a LoRA row runs eagerly (row.nanochat_row): the spec says so
        if cfg.compile == "on":
            raise UserError("--compile on does not take LoRA lanes yet (they run eagerly): use --compile off or auto")
        compile = False
    if cfg.compile == "on" and "remat" in cfg.levers.split(","):
        raise UserError(
            "--compile on does not take the remat lever (its recomputation does not trace): drop remat from --levers, "
            "or use --compile off"
        )
    directory = resolve_source(cfg.model)  # resolved once: an hf:/wandb: source is looked up a single time
    config, params, tokenizer = load_model(str(directory), cfg.tokenizer, device)
    params = {k: nudged(v, cfg.perturb_ulp) for k, v in params.items()}
    base = base_config(cfg)
    cells = [
        [cell_config(base, row, col, i, j, cfg.run_name or "grid") for j in range(len(col.values))]
        for i in range(len(row.values))
    ]
    for c in (c for r in cells for c in r):
        validate(c)  # e.g. an lr axis reaching a non-positive value on a linear scale
        group_lrs(c, config)  # e.g. a matrix_lr axis doing the same
        if is_lora(cfg, row, col) and c.lora_rank < 1:
            raise UserError(
                f"the lora_rank axis reaches {c.lora_rank}: its ranks must be at least 1 (rank 0 is full fine-tuning, "
                "with another optimizer): raise its min"
            )
    examples, dropped = render_split(cfg, tokenizer, config, "train")  # dataset errors, too
    spec = make_spec(cfg, row, col, directory, device, kernels, compile)
    if parent is not None:
        spec["parent"] = parent  # the run this grid zooms into, and the box
    return NanochatPlan(
        cfg, row, col, device, kernels, (config, params, tokenizer), examples, dropped, cells, spec, compile
    )


def nudged(t: torch.Tensor, ulps: int) -> torch.Tensor:
    """Every entry moved up by `ulps` representable floats (towards +inf)."""
    for _ in range(ulps):
        t = torch.nextafter(t, torch.full_like(t, torch.inf))
    return t
