"""A zoom chain as an animation: each parent grid with the box of its child drawn, then the child, and so on.

Input: the levels of a zoom chain, each an already-computed measure grid [H, W] with its axis values and the cells
of the next level's box in it. Output: a GIF (always, with Pillow) and an MP4 when ffmpeg is on the PATH.
Colours are plot.paper_image's (trained blue, not trained red, NaN grey); row 0 is at the bottom.
"""

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from fractal_vmap.analysis.pictures import measure_rgb
from fractal_vmap.analysis.runs import measure_grid, read_grid
from fractal_vmap.console import console
from fractal_vmap.errors import UserError
from fractal_vmap.options import AnimateConfig

CAPTION_PX = 24  # height of the text strip under each frame
BOX_RGB = (0, 0, 0)  # the child's box: black shows on both phases and on the pale cells near the boundary
BOX_PX = 3  # box outline width


@dataclass
class Level:
    measure: np.ndarray  # [H, W] convergence measure (< 0 trained), NaN where not computed
    row_values: np.ndarray  # [H] axis values of the rows
    col_values: np.ndarray  # [W] axis values of the columns
    box: tuple[int, int, int, int] | None = None  # (row0, row1, col0, col1): the next level's cells here, half-open
    label: str = ""  # caption; default: the axis ranges
    steps: np.ndarray | None = None  # [H, W] the cells' step counts: shaded per step where they differ (plot.py)


def _caption(level: Level, index: int) -> str:
    if level.label:
        return level.label
    r, c = level.row_values, level.col_values
    return f"level {index}: rows {r[0]:.4g} .. {r[-1]:.4g}, cols {c[0]:.4g} .. {c[-1]:.4g}"


def render_frame(level: Level, index: int, size: int, with_box: bool) -> Image.Image:
    """One frame: the grid scaled to size x size pixels (nearest cell), the box if asked, a caption strip below."""
    m = np.asarray(level.measure, dtype=np.float64)
    H, W = m.shape
    assert len(level.row_values) == H and len(level.col_values) == W, "axis values do not match the measure's shape"
    rgb = (measure_rgb(m, level.steps)[::-1] * 255).round().astype(np.uint8)  # flipped: row 0 at the bottom
    grid = Image.fromarray(rgb).resize((size, size), Image.NEAREST)
    frame = Image.new("RGB", (size, size + CAPTION_PX), (255, 255, 255))
    frame.paste(grid, (0, 0))
    draw = ImageDraw.Draw(frame)
    if with_box:
        row0, row1, col0, col1 = level.box
        assert 0 <= row0 < row1 <= H and 0 <= col0 < col1 <= W, f"box {level.box} is outside the {H}x{W} grid"
        x0, x1 = col0 * size / W, col1 * size / W
        y0, y1 = size - row1 * size / H, size - row0 * size / H  # rows run up the picture
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=BOX_RGB, width=BOX_PX)
    draw.text((4, size + 5), _caption(level, index), fill=(0, 0, 0))
    return frame


def zoom_frames(levels: list[Level], size: int = 512) -> list[Image.Image]:
    """Each parent with its child's box drawn, then the child: [L0 + box, L1, L1 + box, L2, ...] (one frame if one
    level)."""
    assert levels, "no levels to animate"
    for level in levels[:-1]:
        assert level.box is not None, "every level but the last needs the box of the next one"
    if len(levels) == 1:
        return [render_frame(levels[0], 0, size, with_box=False)]
    frames = []
    for i in range(len(levels) - 1):
        if i > 0:
            frames.append(render_frame(levels[i], i, size, with_box=False))  # the child of the previous pair
        frames.append(render_frame(levels[i], i, size, with_box=True))
    frames.append(render_frame(levels[-1], len(levels) - 1, size, with_box=False))
    return frames


def write_animation(levels: list[Level], path, size: int = 512, frame_ms: int = 1000) -> dict[str, Path | None]:
    """Write path (.gif) and, when ffmpeg exists, the same frames as an MP4 beside it. Returns both paths."""
    assert size % 2 == 0 and CAPTION_PX % 2 == 0, "H.264 wants even frame sizes"
    frames = zoom_frames(levels, size)
    gif = Path(path).with_suffix(".gif")
    gif.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=frame_ms, loop=0)
    mp4 = None
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is not None:
        mp4 = gif.with_suffix(".mp4")
        with tempfile.TemporaryDirectory() as tmp:
            for i, frame in enumerate(frames):
                frame.save(Path(tmp) / f"frame_{i:04d}.png")
            subprocess.run(
                [
                    ffmpeg,
                    "-y",
                    "-loglevel",
                    "error",
                    "-framerate",
                    f"{1000 / frame_ms:g}",
                    "-i",
                    str(Path(tmp) / "frame_%04d.png"),
                    "-r",
                    "25",
                    "-c:v",
                    "libx264",
                    "-pix_fmt",
                    "yuv420p",
                    str(mp4),
                ],
                check=True,
            )
    return {"gif": gif, "mp4": mp4}


def zoom_levels(runs: list[str]) -> list:
    """The animation's levels: each run's measure and axis values, with the box of the next run, which must be its
    zoom."""
    import pandas as pd

    read = [read_grid(r) for r in runs]
    levels = []
    for k, (run_dir, grid, measure) in enumerate(read):
        axes = grid["spec"]["axes"]
        box = None
        if k + 1 < len(read):
            child_dir, child, _ = read[k + 1]
            parent = child["spec"].get("parent") or {}
            if Path(parent.get("run_dir", "")).resolve() != run_dir.resolve():
                raise UserError(
                    f"{child_dir} is not a zoom of {run_dir}: list the runs outermost first, each a `fractal-vmap "
                    "zoom` of the one before"
                )
            if parent.get("box") is None:
                raise UserError(
                    f"{child_dir} was zoomed by --range, so it has no box in {run_dir}'s cells to draw: zoom with --box"
                )
            box = tuple(parent["box"])
        label = (
            f"{run_dir.name}: {axes['rows']['name']} "
            f"{axes['rows']['values'][0]:.3g}..{axes['rows']['values'][-1]:.3g}, "
            f"{axes['cols']['name']} {axes['cols']['values'][0]:.3g}..{axes['cols']['values'][-1]:.3g}"
        )
        cells = pd.read_parquet(run_dir / "cells.parquet")
        steps = measure_grid(cells, *measure.shape, "total_steps")  # for the shading (pictures.measure_shade)
        row_values, col_values = np.asarray(axes["rows"]["values"]), np.asarray(axes["cols"]["values"])
        levels.append(Level(measure, row_values, col_values, box, label, steps))
    return levels


def run_animate(cfg: AnimateConfig) -> dict:
    if cfg.size < 16 or cfg.size % 2:
        raise UserError(f"--size {cfg.size}: use an even number of pixels, 16 or more")
    paths = write_animation(zoom_levels(cfg.runs), cfg.out, cfg.size, cfg.frame_ms)
    console.print(
        f"animation: [bold]{paths['gif']}[/bold]"
        + (f" and [bold]{paths['mp4']}[/bold]" if paths.get("mp4") else " (no ffmpeg: no MP4)")
    )
    return paths
