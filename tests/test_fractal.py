import math

import numpy as np
import pytest

from fractal_vmap.fractal import (
    box_counting,
    convergence_measure,
    edge_pixels,
    fractal_dimension,
    trainability,
)

# ---------------------------------------------------------------------------
# trainability


def test_trainability_falling_curve_converges():
    losses = np.linspace(4.0, 1.0, 50)
    t = trainability(losses)
    assert t["stable"] and t["converged"]
    assert t["trainable_loss0"] == 4.0
    assert t["trainable_mean_last_k"] == pytest.approx(losses[-20:].mean())
    assert t["trainable_ratio"] == pytest.approx(losses[-20:].mean() / 4.0)
    assert all(type(t[k]) is bool for k in ("stable", "converged"))
    assert all(type(t[k]) is float for k in ("trainable_loss0", "trainable_mean_last_k", "trainable_ratio"))


def test_trainability_rising_curve_is_stable_but_not_converged():
    t = trainability(np.linspace(2.0, 3.0, 30))
    assert t["stable"] and not t["converged"]
    assert t["trainable_ratio"] > 1


def test_trainability_nan_then_padding():
    # finite for steps 0..4, NaN at step 5 (the divergence), then NaN padding
    losses = [3.0, 2.9, 2.8, 5.0, 40.0, float("nan")] + [float("nan")] * 10
    t = trainability(losses, window=20)
    assert not t["stable"] and not t["converged"]
    assert t["trainable_loss0"] == 3.0
    # the run includes its non-finite entry, so the mean and the ratio are non-finite
    assert not math.isfinite(t["trainable_mean_last_k"])
    assert not math.isfinite(t["trainable_ratio"])


def test_trainability_inf_ends_the_run():
    # an inf followed by finite-looking garbage: everything after the inf is ignored
    t = trainability([3.0, 2.0, float("inf"), 0.1, 0.1, 0.1])
    assert not t["stable"] and not t["converged"]
    assert t["trainable_mean_last_k"] == math.inf


def test_trainability_window_shorter_than_run():
    losses = np.array([10.0] * 40 + [1.0] * 5)
    t = trainability(losses, window=5)
    assert t["trainable_mean_last_k"] == 1.0
    assert t["trainable_ratio"] == pytest.approx(0.1)
    # a wider window sees the plateau at 10 too, and with threshold 0.5 the run no longer counts
    t10 = trainability(losses, window=10)
    assert t10["trainable_mean_last_k"] == pytest.approx(5.5)
    assert not trainability(losses, window=10, threshold=0.5)["converged"]
    assert trainability(losses, window=5, threshold=0.5)["converged"]


def test_trainability_window_longer_than_run():
    t = trainability([4.0, 2.0, 1.0], window=20)
    assert t["trainable_mean_last_k"] == pytest.approx(7.0 / 3.0)


def test_trainability_empty():
    t = trainability([])
    assert not t["stable"] and not t["converged"]
    assert math.isnan(t["trainable_ratio"])


# ---------------------------------------------------------------------------
# convergence_measure


def test_convergence_measure_signs():
    steps = 40
    falling = np.linspace(3.0, 1.0, steps)
    rising = np.linspace(3.0, 6.0, steps)
    diverging = np.concatenate([[3.0, 4.0, 50.0], np.full(steps - 3, np.nan)])
    m = convergence_measure(np.stack([falling, rising, diverging]))
    assert m.shape == (3,)
    v = falling / 3.0
    assert m[0] == pytest.approx(-v.sum())
    assert m[1] == pytest.approx((3.0 / rising).sum())
    assert m[2] > 0
    # a NaN run is capped at 1e6: 1/v of the NaN entries is 1e-6 each
    assert m[2] == pytest.approx(1 + 3 / 4 + 3 / 50 + (steps - 3) * 1e-6)


def test_convergence_measure_bad_first_loss_is_diverged():
    m = convergence_measure(np.array([[np.nan, 1.0, 0.5], [0.0, 1.0, 0.5], [-1.0, -2.0, -3.0]]))
    assert np.allclose(m, 3 * 1e-6)


def test_convergence_measure_vectorised_matches_loop():
    rng = np.random.default_rng()
    steps = 30
    # random walks in log space, some trending up and some down, some cut by NaN padding
    drift = rng.uniform(-0.1, 0.1, size=(4, 5, 1))
    losses = 2.0 * np.exp(np.cumsum(drift + 0.05 * rng.standard_normal((4, 5, steps)), axis=-1))
    cut = rng.integers(5, 2 * steps, size=(4, 5))  # cut >= steps: no padding
    losses[np.arange(steps) >= cut[..., None]] = np.nan
    losses[0, 0] = np.linspace(3.0, 1.0, steps)  # one sure trained run
    losses[0, 1, 10:] = np.nan  # one sure diverged run
    m = convergence_measure(losses)
    assert (m < 0).any() and (m > 0).any()
    assert m.shape == (4, 5)
    loop = np.array([[convergence_measure(losses[i, j]) for j in range(5)] for i in range(4)])
    np.testing.assert_array_equal(m, loop)
    # a run with NaN padding has mean(last 20) = 1e6 and so lands in the positive phase
    assert (m[~np.isfinite(losses).all(-1)] > 0).all()


# ---------------------------------------------------------------------------
# edge pixels


def test_edge_pixels_tiny():
    measure = np.array(
        [
            [-1.0, -2.0, 3.0],
            [-1.0, -1.0, 2.0],
            [-5.0, -1.0, -1.0],
        ]
    )
    expected = np.array(
        [
            [False, True],
            [False, True],
        ]
    )
    np.testing.assert_array_equal(edge_pixels(measure), expected)
    # zero counts with the trained phase (phase is measure > 0)
    np.testing.assert_array_equal(edge_pixels(np.zeros((3, 3))), np.zeros((2, 2), bool))


def test_edge_pixels_ignore_nan_blocks():
    measure = np.array(
        [
            [-1.0, 1.0, 1.0],
            [np.nan, 1.0, 1.0],
        ]
    )
    # the block at (0,0) mixes phases but touches a NaN; the block at (0,1) is all positive
    np.testing.assert_array_equal(edge_pixels(measure), np.array([[False, False]]))


# ---------------------------------------------------------------------------
# box counting on images of known dimension


def test_box_counting_counts_partial_boxes():
    e = np.zeros((5, 5), bool)
    e[4, 4] = True  # only in the partial box at the corner
    e[0, 0] = True
    out = box_counting(e, sizes=[1, 2, 4])
    assert out["sizes"] == [1, 2, 4]
    assert out["counts"] == [2, 2, 2]


def test_box_counting_no_edges():
    out = box_counting(np.zeros((64, 64), bool))
    assert out["counts"] == [0] * len(out["sizes"]) and len(out["sizes"]) >= 3
    assert math.isnan(out["dimension"]) and math.isnan(out["dimension_median_local"])
    f = fractal_dimension(np.ones((64, 64)))
    assert f["edge_pixel_count"] == 0 and math.isnan(f["dimension"])


def test_default_sizes_are_powers_of_two():
    assert box_counting(np.ones((511, 600), bool))["sizes"] == [1, 2, 4, 8, 16, 32]  # up to 511 // 8 = 63
    assert box_counting(np.ones((100, 70), bool))["sizes"] == [1, 2, 4, 8]  # up to 70 // 8 = 8
    assert box_counting(np.ones((20, 30), bool))["sizes"] == [1, 2, 4, 8]  # 20 // 8 = 2 is too few: up to 20 // 2


def test_dimension_straight_line():
    rng = np.random.default_rng()
    yy, xx = np.mgrid[0:512, 0:512]
    slope, c = rng.uniform(-0.8, 0.8), rng.uniform(150, 350)
    f = fractal_dimension(xx + slope * yy - c)
    assert abs(f["dimension"] - 1) < 0.05, f


def test_dimension_circle():
    rng = np.random.default_rng()
    yy, xx = np.mgrid[0:512, 0:512]
    cy, cx, r = rng.uniform(230, 280), rng.uniform(230, 280), rng.uniform(120, 200)
    f = fractal_dimension(np.hypot(yy - cy, xx - cx) - r)
    assert abs(f["dimension"] - 1) < 0.05, f


def sierpinski_carpet(levels: int) -> np.ndarray:
    c = np.ones((1, 1), bool)
    for _ in range(levels):
        z = np.zeros_like(c)
        c = np.block([[c, c, c], [c, z, c], [c, c, c]])
    return c


def test_dimension_sierpinski_carpet():
    carpet = sierpinski_carpet(6)  # 729 x 729
    target = math.log(8) / math.log(3)  # 1.8928
    # with powers of 3 the carpet is self-similar box for box: N(3^k) = 8^(6-k) exactly
    out = box_counting(carpet, sizes=[3**k for k in range(6)])
    assert out["counts"] == [8 ** (6 - k) for k in range(6)]
    assert abs(out["dimension"] - target) < 1e-9
    # with the default powers of two the box grid does not line up with the carpet's base-3 holes,
    # which biases the estimate low (about 1.84 here); still far from both 1 and 2
    out2 = box_counting(carpet)
    assert abs(out2["dimension"] - target) < 0.1, out2


def test_dimension_random_signs_fills_the_plane():
    rng = np.random.default_rng()
    measure = rng.choice([-1.0, 1.0], size=(512, 512))
    f = fractal_dimension(measure)
    assert abs(f["dimension"] - 2) < 0.05, f
    assert abs(f["dimension_median_local"] - 2) < 0.05, f


@pytest.mark.parametrize("window, threshold", [(20, 1.0), (5, 1.0), (3, 0.8), (50, 1.3)])
def test_measure_sign_follows_the_labels_window_and_threshold(window, threshold):
    """The picture (measure sign) and the label (converged) use the same K and threshold: they agree on every run,
    including runs that stop at a non-finite loss and runs shorter than K."""
    from fractal_vmap.recipe import FinetuneConfig, cell_result

    rng = np.random.default_rng()
    cfg = FinetuneConfig(trainable_window_steps=window, trainable_loss_ratio_threshold=threshold)
    agree = []
    for _ in range(300):
        steps = int(rng.integers(1, 40))
        losses = list(4.0 * np.exp(np.cumsum(rng.normal(0, 0.08, steps))))  # random walks around the start, both ways
        if rng.random() < 0.2:
            losses[int(rng.integers(0, steps))] = float("nan")
        cell = cell_result(cfg, losses, steps, 0, 0.0)
        assert (cell.measure < 0) == cell.converged, (losses, cell)
        agree.append(cell.converged)
    assert 0 < sum(agree) < len(agree)  # both labels occurred
