import matplotlib

matplotlib.use("Agg")
import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

from fractal_vmap.analysis.pictures import panels, paper_image

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
        trained_part, untrained_part = box[int(0.6 * h) :], box[: int(0.4 * h)]
    else:
        trained_part, untrained_part = box[:, : int(0.35 * w)], box[:, int(0.65 * w) :]
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
    centre = centre[h // 3 : 2 * h // 3, w // 3 : 2 * w // 3]
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
    cells = pd.DataFrame(
        dict(
            row=rows.ravel(),
            col=cols.ravel(),
            stable=stable.ravel(),
            converged=converged.ravel(),
            final_loss=final_loss.ravel(),
            trainable_ratio=rng.uniform(0.1, 2.0, H * W),
            measure=m.ravel(),
            num_tokens=ROWS[rows.ravel()],
            lr=COLS[cols.ravel()],
        )
    )
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
    cells = pd.DataFrame(
        dict(
            row=[0, 0, 1, 1],
            col=[0, 1, 0, 1],
            stable=False,
            converged=False,
            final_loss=np.nan,
            trainable_ratio=np.nan,
            measure=1.0,
            num_tokens=[1e3, 1e3, 1e4, 1e4],
            lr=[1e-4, 1e-3, 1e-4, 1e-3],
        )
    )
    path = panels(cells, "num_tokens", "lr", tmp_path / "p.png")
    assert path.stat().st_size > 0


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions draw, kept open for inspection (plt.close is intercepted)."""
    import matplotlib.pyplot as plt

    from fractal_vmap.analysis import pictures as plot

    kept, close = [], plt.close
    monkeypatch.setattr(plot.plt, "close", kept.append)
    yield kept
    for fig in kept:
        close(fig)


def tick_labels(axis) -> list[str]:
    lo, hi = axis.get_view_interval()
    return [
        t.get_text()
        for t in axis.get_ticklabels()
        if lo <= t.get_position()[axis is axis.axes.yaxis] <= hi and t.get_text()
    ]


def test_log_axes_are_ticked_in_values_and_the_shading_has_a_colour_bar(tmp_path, figures):
    rng = np.random.default_rng()
    m = half_trained_measure(rng, "cols")
    paper_image(m, ROWS, COLS, "num_tokens", "lr", tmp_path / "p.png", caption="model x · dataset y")
    (fig,) = figures
    fig.canvas.draw()
    ax, bar = fig.axes
    assert ax.get_xscale() == ax.get_yscale() == "log"
    # cells span the axis values: the first and last cells are centred on the first and last values (geometric
    # midpoints)
    lo, hi = ax.get_xlim()
    assert np.sqrt(lo * hi) == pytest.approx(np.sqrt(COLS[0] * COLS[-1]), rel=1e-9)
    assert tick_labels(ax.xaxis) == [
        "$\\mathdefault{10^{-5}}$",
        "$\\mathdefault{10^{-4}}$",
        "$\\mathdefault{10^{-3}}$",
        "$\\mathdefault{10^{-2}}$",
        "$\\mathdefault{10^{-1}}$",
    ]  # values, not exponents
    assert [t.get_text() for t in bar.get_yticklabels()] == [
        "fails hardest",
        "barely fails",
        "barely trains",
        "trains fastest",
    ]
    assert "convergence measure" in bar.get_ylabel()
    texts = [t.get_text() for t in fig.texts] + [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    assert "model x · dataset y" in texts and any("grey" in t for t in texts)  # the caption, and the NaN cells named


def test_panels_shade_trainability_as_the_paper_image(tmp_path, figures):
    rng = np.random.default_rng()
    m = half_trained_measure(rng, "rows")
    rows, cols = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    keep = ~np.isnan(m.ravel())
    cells = pd.DataFrame(
        {
            "row": rows.ravel(),
            "col": cols.ravel(),
            "stable": True,
            "converged": m.ravel() < 0,
            "final_loss": rng.uniform(1.0, 5.0, H * W),
            "measure": m.ravel(),
            "num_tokens": ROWS[rows.ravel()],
            "lr": COLS[cols.ravel()],
        }
    )[keep]
    paper_image(m, ROWS, COLS, "num_tokens", "lr", tmp_path / "p.png")
    panels(cells, "num_tokens", "lr", tmp_path / "panels.png")
    paper, grid = figures
    paper_colours = paper.axes[0].collections[0].get_facecolors()
    panel_colours = grid.axes[0].collections[0].get_facecolors()
    np.testing.assert_array_equal(panel_colours, paper_colours)  # the same rule, cell for cell
    for ax in grid.axes[:4]:
        assert ax.get_xscale() == "log" and ax.get_yscale() == "log"


# ----------------------------------------------------------------------------- shading across rows of unequal length


def issue_cells() -> pd.DataFrame:
    """The default num_tokens x lr grid's four cells of issue 15, from synthetic loss curves: rows of 1000 tokens (25
    steps) and 8000 tokens (200 steps), cols lr 0.01 (both train) and lr 100 (neither does)."""
    from fractal_vmap.analysis.labels import convergence_measure, trainability

    rng = np.random.default_rng()
    loss0 = rng.uniform(2.0, 4.0)
    t25, t200 = np.arange(25.0), np.arange(200.0)
    curves = {
        (0, 0): 1 - 0.48 * t25 / 24,  # 1000 tokens, lr 0.01: slowly down, ratio 0.71
        (1, 0): 0.33 + 0.67 * np.exp(-t200 / 40),  # 8000 tokens, lr 0.01: well down, ratio 0.34
        (0, 1): 1 + 0.5 * t25,  # 1000 tokens, lr 100: up, finite throughout
        (1, 1): np.concatenate([1 + 0.2 * t200[:58], np.full(142, np.nan)]),  # 8000 tokens, lr 100: NaN at step 58
    }
    records = []
    for (i, j), v in curves.items():
        losses = loss0 * v
        run = losses[:59] if (i, j) == (1, 1) else losses
        labels = trainability(run)
        records.append(
            {
                "row": i,
                "col": j,
                "num_tokens": (1000.0, 8000.0)[i],
                "lr": (0.01, 100.0)[j],
                **labels,
                "measure": float(convergence_measure(losses)),
                "steps": len(run),
                "total_steps": len(losses),
                "final_loss": float(run[-1]),
            }
        )
    cells = pd.DataFrame.from_records(records)
    ratio = {(r.row, r.col): r.trainable_ratio for r in cells.itertuples()}
    assert ratio[(0, 0)] == pytest.approx(0.71, abs=0.01) and ratio[(1, 0)] == pytest.approx(0.34, abs=0.01)
    assert list(cells["converged"]) == [True, True, False, False] and list(cells["stable"]) == [True, True, True, False]
    return cells


def test_shading_compares_rows_of_unequal_length():
    """As the issue found it: the summed measure draws (1000, 0.01) "trains fastest" and (8000, 100) paler than
    (1000, 100); per step, the faster-training and the earlier-diverging cell are the deeper ones."""
    from fractal_vmap.analysis.pictures import measure_shade
    from fractal_vmap.analysis.runs import measure_grid

    cells = issue_cells()
    measure, steps = measure_grid(cells, 2, 2), measure_grid(cells, 2, 2, "total_steps")
    summed = measure_shade(measure)  # the old shading: the misleading order
    assert summed[0, 0] > summed[1, 0] and abs(summed[1, 1]) < abs(summed[0, 1])
    shade = measure_shade(measure, steps)
    assert shade[1, 0] > shade[0, 0] > 0  # ratio 0.34 is deeper blue than ratio 0.71
    assert shade[1, 1] < shade[0, 1] < 0  # NaN at step 58 is deeper red than a run that stayed finite


def test_pictures_shade_per_step_and_say_so(tmp_path, figures):
    """trainability.png and panels.png, as the grid draws them from its files: the issue's cells in the order above,
    the same colours in both pictures, and the colour bar naming the per-step measure."""
    from fractal_vmap.analysis.report import draw_pictures

    cells = issue_cells()
    axis = lambda name, values: {"name": name, "values": values, "scale": "log"}  # noqa: E731
    grid = {
        "spec": {
            "axes": {"rows": axis("num_tokens", [1000.0, 8000.0]), "cols": axis("lr", [0.01, 100.0])},
            "settings": {
                "device": "cpu",
                "dtype": "float32",
                "trainable_window_steps": 20,
                "trainable_loss_ratio_threshold": 1.0,
            },
            "group_lrs": {},
            "model": {"source": "default"},
            "dataset": {"source": "default"},
        }
    }
    fractal = {"sizes": [], "edge_pixel_count": 1, "dimension": None, "dimension_median_local": None, "caveat": "few"}
    draw_pictures(grid, cells, fractal, tmp_path, "run")
    paper, grid_fig = figures
    colours = paper.axes[0].collections[0].get_facecolors()[:, :3].reshape(2, 2, 3)  # row-major over [rows, cols]
    np.testing.assert_array_equal(grid_fig.axes[0].collections[0].get_facecolors()[:, :3].reshape(2, 2, 3), colours)
    saturation = colours.max(-1) - colours.min(-1)
    assert saturation[1, 0] > saturation[0, 0] and colours[1, 0, 2] > colours[1, 0, 0]  # deeper blue at 8000 tokens
    assert saturation[1, 1] > saturation[0, 1] and colours[1, 1, 0] > colours[1, 1, 2]  # deeper red at 8000 tokens
    for fig in (paper, grid_fig):
        bars = [ax.get_ylabel() for ax in fig.axes if ax.get_label() == "<colorbar>" and "shade" in ax.get_ylabel()]
        assert len(bars) == 1 and "per step" in bars[0], bars


def test_equal_steps_keep_the_shading():
    """The paper-mlp task trains every cell the same steps: its shading (and the animation's colours) are unchanged."""
    from fractal_vmap.analysis.pictures import measure_rgb, measure_shade

    m = half_trained_measure(np.random.default_rng(), "rows")
    steps = np.full(m.shape, 100.0)
    np.testing.assert_array_equal(measure_shade(m, steps).filled(9), measure_shade(m).filled(9))
    np.testing.assert_array_equal(measure_rgb(m, steps), measure_rgb(m))
