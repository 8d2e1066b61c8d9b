"""What a grid's cells train: one registry entry a task. The grid pipeline (grid/pipeline.py) and zooms
(grid/zoom.py) ask a task for everything task-shaped, and compare no task name anywhere.

A task is a module with:
  NAME, AXES (axis name -> axes.AxisKind), WORKERS (whether its rows may go to several workers: grid/shard.py),
  CELL_BYTES (host memory of its state a grid cell, before it trains: refine.check_map_fits);
  axis_names(cfg) -> (rows axis, cols axis): the axes a grid's options ask for;
  plan(cfg, row, col, parent) -> a plan: every check and load, each bad input one clear line, before the run dir is
    touched. A plan has cfg, row, col, device, spec (what the numbers depend on: grid.json), run_dir, data
    (grid.json's account of the data), describe() (a line about the data), rate (what the progress' rate counts),
    steps(points) (the step counts of these (row, col) cells: the progress' work), train(points, progress) -> (one
    result a cell, the lane chunk that ran) for any cells (a row, or a refinement level), and cell_lrs()
    (cells.parquet's learning-rate columns, or None);
  zoom_options(settings) -> a zoom's grid options from its parent's spec settings.
"""

from importlib import import_module
from types import ModuleType

from fractal_vmap.errors import UserError

TASKS = {"nanochat-sft": "fractal_vmap.tasks.nanochat.task", "paper-mlp": "fractal_vmap.tasks.paper.task"}


def get_task(name: str) -> ModuleType:
    """The task registered as `name` (imported on first use: a task brings torch and its model)."""
    if name not in TASKS:
        raise UserError(f"unknown --task {name!r}: use one of {', '.join(TASKS)}")
    return import_module(TASKS[name])
