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

from fractal_vmap.plot import measure_rgb

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
    """Each parent with its child's box drawn, then the child: [L0 + box, L1, L1 + box, L2, ...] (one frame if one level)."""
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
