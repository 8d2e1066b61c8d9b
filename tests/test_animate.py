"""Zoom animation: frame count and size of the GIF, the box drawn where the child's cells are."""

import shutil

import numpy as np
import pytest
from PIL import Image

from fractal_vmap.animate import BOX_RGB, CAPTION_PX, Level, write_animation, zoom_frames


def disc(H, W, centre, radius, rng):
    """A measure trained (< 0) inside a disc, with random magnitudes so the shading varies."""
    r, c = np.mgrid[0:H, 0:W]
    inside = (r - centre[0]) ** 2 + (c - centre[1]) ** 2 < radius**2
    return np.where(inside, -1.0, 1.0) * rng.uniform(1, 100, (H, W))


def chain(rng):
    """Three levels: 40x40 -> a 10x10 box -> 20x20 -> a 5x5 box -> 20x20 (the last with NaN cells not computed)."""
    a = Level(disc(40, 40, (20, 20), 12, rng), np.logspace(-3, 6, 40), np.logspace(-3, 6, 40), box=(25, 35, 5, 15))
    b = Level(disc(20, 20, (0, 20), 15, rng), np.linspace(1, 2, 20), np.linspace(3, 4, 20), box=(10, 15, 0, 5))
    last = disc(20, 20, (10, 10), 6, rng)
    last[:3, :3] = np.nan
    c = Level(last, np.linspace(1, 1.1, 20), np.linspace(3, 3.1, 20))
    return [a, b, c]


def test_gif_has_parent_box_child_frames(tmp_path):
    rng = np.random.default_rng(0)
    levels = chain(rng)
    out = write_animation(levels, tmp_path / "zoom.gif", size=200, frame_ms=300)
    assert out["gif"].exists()
    with Image.open(out["gif"]) as gif:
        assert gif.n_frames == 4  # L0 + box, L1, L1 + box, L2
        assert gif.size == (200, 200 + CAPTION_PX)
        gif.seek(0)
        first = np.asarray(gif.convert("RGB"))
        gif.seek(1)
        second = np.asarray(gif.convert("RGB"))
    # level 0's box (rows 25..34, cols 5..14 of 40) in pixels: x 25..75, y from the top 200 - 35*5 = 25 .. 75
    left_edge = first[30:70, 25]
    assert (left_edge == BOX_RGB).all(axis=-1).all()
    assert not (second[30:70, 25] == BOX_RGB).all(axis=-1).all()  # the child frame has no box there
    assert not (first[100:190, 100:190] == BOX_RGB).all(axis=-1).any()  # no stray box pixels in the grid elsewhere


def test_frames_follow_the_chain():
    rng = np.random.default_rng(1)
    levels = chain(rng)
    frames = zoom_frames(levels, size=100)
    assert len(frames) == 4 and all(f.size == (100, 100 + CAPTION_PX) for f in frames)
    # frame 1 is level 1 (the child of level 0): a disc centred at row 0, col 20 of 20 = bottom right is blue (trained)
    pixels = np.asarray(frames[1])
    bottom_right, top_left = pixels[95, 95], pixels[5, 5]
    assert bottom_right[2] > bottom_right[0] and top_left[0] > top_left[2]
    assert len(zoom_frames(levels[-1:], size=100)) == 1
    with pytest.raises(AssertionError):
        zoom_frames(
            [Level(levels[0].measure, levels[0].row_values, levels[0].col_values, box=(30, 50, 0, 10)), levels[1]],
            size=100,
        )


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is not installed")
def test_mp4_when_ffmpeg_exists(tmp_path):
    out = write_animation(chain(np.random.default_rng(2)), tmp_path / "zoom.gif", size=100)
    assert out["mp4"] is not None and out["mp4"].stat().st_size > 0
