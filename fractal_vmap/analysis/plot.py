"""`fractal-vmap plot RUN`: a finished grid's pictures redrawn from its files, without training. With no option it
rewrites RUN's trainability.png and panels.png exactly as the grid drew them; --style / --dpi restyle them;
--trainable_loss_ratio_threshold / --trainable_window_steps relabel every cell from the loss curves in its row files
(the measure and labels follow, as in recipe.cell_result) and write the new pictures and fractal.json to --out.
"""

import json
import math
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from fractal_vmap.analysis.labels import label_runs
from fractal_vmap.analysis.runs import read_row, row_path
from fractal_vmap.axes import Axis
from fractal_vmap.console import console
from fractal_vmap.errors import UserError
from fractal_vmap.files import atomic_path, check_writable_dir, read_json_object, strict_json, write_atomic
from fractal_vmap.options import PlotConfig


def relabel(run_dir: Path, grid: dict, cells, window: int, threshold: float):
    """The cells relabelled with another window or threshold: every label and the measure recomputed from each lane's
    loss curve in the row files (labels.label_runs, as the grid labelled them)."""
    cols = len(grid["spec"]["axes"]["cols"]["values"])
    cells = cells.copy()
    index = {(int(r), int(c)): k for k, (r, c) in enumerate(zip(cells["row"], cells["col"]))}
    for i in sorted(set(int(r) for r in cells["row"])):
        lanes = read_row(row_path(run_dir, i), cols, grid["digest"])
        if lanes is None:
            raise UserError(
                f"{row_path(run_dir, i)} is missing or not of this grid: rerun the grid command to finish it, then plot"
            )
        steps = [lane["total_steps"] for lane in lanes]
        curves = np.full((len(lanes), max(steps)), np.nan)
        for j, lane in enumerate(lanes):
            curves[j, : len(lane["losses"])] = [np.nan if x is None else x for x in lane["losses"]]  # JSON null: NaN
        labels = label_runs(curves, steps, window, threshold)
        rows = [index[(i, j)] for j in range(len(lanes))]
        for key in ("converged", "trainable_mean_last_k", "trainable_ratio", "measure"):
            cells.loc[rows, key] = labels[key]
    return cells


def plot_run(cfg: PlotConfig) -> list[Path]:
    """The `plot` command: check everything, then draw (and, when relabelled, write cells.parquet and fractal.json)."""
    from fractal_vmap.analysis.report import MAP_COLUMNS, draw_pictures, measure_fractal
    from fractal_vmap.analysis.runs import read_maps, read_run

    run_dir = Path(cfg.run)
    missing = [name for name in ("grid.json", "cells.parquet", "fractal.json") if not (run_dir / name).is_file()]
    if missing:
        raise UserError(
            f"{run_dir} is not a finished grid (no {', '.join(missing)}): pass a run dir that `grid` completed, or "
            "rerun the grid to finish it"
        )
    # one clear line if unreadable
    read_json_object(run_dir / "grid.json", "the grid's spec", "pass a run dir that `grid` wrote")
    grid, fractal = (json.loads((run_dir / name).read_text()) for name in ("grid.json", "fractal.json"))
    settings = grid["spec"]["settings"]
    window = settings["trainable_window_steps"] if cfg.trainable_window_steps is None else cfg.trainable_window_steps
    threshold = (
        settings["trainable_loss_ratio_threshold"]
        if cfg.trainable_loss_ratio_threshold is None
        else cfg.trainable_loss_ratio_threshold
    )
    if window < 1:
        raise UserError(f"--trainable_window_steps is {window}: it must be at least 1")
    if not 0 < threshold < math.inf:
        raise UserError(f"--trainable_loss_ratio_threshold is {threshold}: it must be positive and finite")
    if cfg.dpi < 1:
        raise UserError(f"--dpi is {cfg.dpi}: it must be at least 1")
    from fractal_vmap.analysis.pictures import MAX_PIXELS, PANELS_INCHES, max_dpi

    if cfg.dpi > max_dpi():
        w, h = (inches * cfg.dpi for inches in PANELS_INCHES)
        raise UserError(
            f"--dpi {cfg.dpi} would draw panels.png on a {w} x {h} pixel canvas "
            f"({w * h * 4 / 2**30:,.0f} GiB; at most {MAX_PIXELS * 4 / 2**30:.0f} GiB is drawn): "
            f"use --dpi {max_dpi()} or less"
        )
    relabelled = (window, threshold) != (settings["trainable_window_steps"], settings["trainable_loss_ratio_threshold"])
    out = Path(cfg.out) if cfg.out else run_dir
    if relabelled and out.resolve() == run_dir.resolve():
        raise UserError(
            f"relabelled pictures in {run_dir} would disagree with its cells.parquet and fractal.json: pass --out DIR"
        )
    check_writable_dir(out, "--out")
    import matplotlib.pyplot as plt

    if cfg.style is not None and cfg.style not in plt.style.available and not Path(cfg.style).is_file():
        raise UserError(
            f"--style {cfg.style!r} is neither a matplotlib style ({', '.join(sorted(plt.style.available)[:4])}, ...) "
            "nor a file"
        )
    row, col = Axis(**grid["spec"]["axes"]["rows"]), Axis(**grid["spec"]["axes"]["cols"])
    if relabelled:
        cells = relabel(run_dir, grid, read_run(run_dir)[1], window, threshold)
        fractal = measure_fractal(cells, row, col)
    else:  # the pictures' columns alone, one at a time: a 4097^2 map's whole frame would take GBs
        cells = read_maps(run_dir, list(MAP_COLUMNS), len(row.values), len(col.values))
    out.mkdir(parents=True, exist_ok=True)
    if relabelled:
        with atomic_path(out / "cells.parquet") as tmp:
            cells.to_parquet(tmp, index=False)
        write_atomic(out / "fractal.json", strict_json(fractal))
    with plt.style.context(cfg.style) if cfg.style else nullcontext():  # no style: the rc settings the grid drew with
        paths = draw_pictures(grid, cells, fractal, out, run_dir.name, window, threshold, cfg.dpi)
    console.print(
        f"pictures: [bold]{paths[0]}[/bold] and [bold]{paths[1]}[/bold]"
        + (f" (relabelled: window {window}, threshold {threshold:g})" if relabelled else "")
    )
    return paths
