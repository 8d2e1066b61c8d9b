import matplotlib

matplotlib.use("Agg")
import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

from fractal_vmap.plot import panels, paper_image

H, W = 6, 9
ROWS = np.logspace(3, 6, H)  # e.g. num_tokens
COLS = np.logspace(-5, -1, W)  # e.g. learning rate


def half_trained_measure(rng, split: str) -> np.ndarray:
    """Random measure: trained (< 0) in the bottom rows or the left cols, not trained (> 0) elsewhere, a few NaNs."""
    mag = rng.uniform(1.0, 100.0, size=(H, W))
    trained = np.arange(H)[:, None] < H // 2 if split == "rows" else np.arange(W)[None, :] < W // 2
    m = np.where(trained, -mag, mag)
    # NaNs away from the outer border so the coloured area still spans the whole grid
    for _ in range(3):
        m[rng.integers(1, H - 1), rng.integers(1, W - 1)] = np.nan
    return m


def first_run(mask: np.ndarray) -> tuple[int, int]:
    """Start and end (exclusive) of the first run of True entries."""
    start = int(np.argmax(mask))
    rest = np.flatnonzero(~mask[start:])
    return start, start + (int(rest[0]) if len(rest) else len(mask) - start)


def coloured_box(img: np.ndarray) -> np.ndarray:
    """Crop the PNG to the grid itself: the leftmost block of clearly coloured (blue or red) or grey pixels (the colour
    bar, right of it, is left out; white, black and text are excluded)."""
    rgb = img[..., :3]
    coloured = rgb.max(-1) - rgb.min(-1) > 0.15
    grey = (np.abs(rgb - 0.5) < 0.02).all(-1)
    cells = coloured | grey
    x0, x1 = first_run(cells.mean(0) > 0.3)  # columns mostly made of cells
    y0, y1 = first_run(cells[:, x0:x1].mean(1) > 0.9)
    return rgb[y0:y1, x0:x1]


def blue_fraction(region: np.ndarray) -> float:
    return float((region[..., 2] > region[..., 0] + 0.1).mean())


def red_fraction(region: np.ndarray) -> float:
    return float((region[..., 0] > region[..., 2] + 0.1).mean())


@pytest.mark.parametrize("split", ["rows", "cols"])
def test_paper_image_colours_and_orientation(tmp_path, split):
    rng = np.random.default_rng()
    m = half_trained_measure(rng, split)
    path = paper_image(m, ROWS, COLS, "num_tokens", "lr", tmp_path / "paper.png", title="test")
    assert path.exists() and path.stat().st_size > 0
    img = mpimg.imread(path)
    box = coloured_box(img)
    h, w = box.shape[:2]
    # image row 0 is the top of the picture; grid row 0 must be at the bottom
    if split == "rows":
        trained_part, untrained_part = box[int(0.6 * h):], box[: int(0.4 * h)]
    else:
        trained_part, untrained_part = box[:, : int(0.35 * w)], box[:, int(0.65 * w):]
    assert blue_fraction(trained_part) > 0.7, blue_fraction(trained_part)
    assert red_fraction(trained_part) < 0.05
    assert red_fraction(untrained_part) > 0.7, red_fraction(untrained_part)
    assert blue_fraction(untrained_part) < 0.05


def test_paper_image_nan_is_grey(tmp_path):
    m = np.full((H, W), np.nan)
    m[0, 0], m[-1, -1] = -1.0, 1.0  # corners keep the coloured box spanning the grid
    img = mpimg.imread(paper_image(m, ROWS, COLS, "num_tokens", "lr", tmp_path / "grey.png"))
    centre = coloured_box(img)
    h, w = centre.shape[:2]
    centre = centre[h // 3: 2 * h // 3, w // 3: 2 * w // 3]
    assert np.allclose(centre, 0.5, atol=0.02)
    # corners: bottom-left is grid (0, 0) trained, top-right is (H-1, W-1) not trained
    box = coloured_box(img)
    assert blue_fraction(box[-5:, :5]) > 0.9
    assert red_fraction(box[:5, -5:]) > 0.9


def test_panels_writes_png(tmp_path):
    rng = np.random.default_rng()
    m = half_trained_measure(rng, "rows")
    rows, cols = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    converged = m < 0
    stable = converged | (rng.random((H, W)) < 0.5)
    final_loss = np.where(converged, rng.uniform(0.5, 2.0, (H, W)), rng.uniform(3.0, 10.0, (H, W)))
    final_loss[~stable] = np.nan
    cells = pd.DataFrame(dict(
        row=rows.ravel(), col=cols.ravel(),
        stable=stable.ravel(), converged=converged.ravel(),
        final_loss=final_loss.ravel(), trainable_ratio=rng.uniform(0.1, 2.0, H * W),
        measure=m.ravel(),
        num_tokens=ROWS[rows.ravel()], lr=COLS[cols.ravel()],
    ))
    keep = ~np.isnan(m.ravel())  # cells not computed yet are simply absent
    path = panels(cells[keep], "num_tokens", "lr", tmp_path / "panels.png")
    assert path.exists() and path.stat().st_size > 0
    img = mpimg.imread(path)
    assert img.shape[0] > 500 and img.shape[1] > 500
    rgb = img[..., :3]
    # both phases show up as blue and red somewhere
    assert (rgb[..., 2] > rgb[..., 0] + 0.3).mean() > 0.01
    assert (rgb[..., 0] > rgb[..., 2] + 0.3).mean() > 0.01


def test_panels_all_nonfinite_loss(tmp_path):
    # every run diverged: the log-scale panel has nothing to scale by and must not crash
    cells = pd.DataFrame(dict(
        row=[0, 0, 1, 1], col=[0, 1, 0, 1], stable=False, converged=False,
        final_loss=np.nan, trainable_ratio=np.nan, measure=1.0,
        num_tokens=[1e3, 1e3, 1e4, 1e4], lr=[1e-4, 1e-3, 1e-4, 1e-3],
    ))
    path = panels(cells, "num_tokens", "lr", tmp_path / "p.png")
    assert path.stat().st_size > 0
