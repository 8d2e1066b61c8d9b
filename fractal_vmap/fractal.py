"""
Trainability labels, the paper's convergence measure, and the box-counting dimension of the
trainable / not-trainable boundary (Sohl-Dickstein 2024, arXiv 2402.06184). Numpy only.

Sign convention used everywhere: measure < 0 means the run trained, measure > 0 means it did not.
"""

import math

import numpy as np

MAX_VAL = 1e6  # cap on normalised losses, and the value given to non-finite ones (the paper's choice)


def trainability(losses, window: int = 20, threshold: float = 1.0) -> dict:
    """
    Labels of one run from its loss curve.
    The run is the prefix up to and including the first non-finite entry (what follows is NaN padding).
    Returns JSON-friendly Python floats and bools:
      stable: every entry of the run is finite (and there is at least one)
      trainable_loss0: the first loss
      trainable_mean_last_k: mean of the last min(window, len(run)) entries of the run
        (the run includes its non-finite entry, so a diverged run gets a non-finite mean)
      trainable_ratio: mean_last_k / loss0
      converged: stable and ratio < threshold
    """
    assert window >= 1, f"window must be >= 1, got {window}"
    x = np.asarray(losses, dtype=np.float64).reshape(-1)
    bad = np.flatnonzero(~np.isfinite(x))
    run = x if len(bad) == 0 else x[: bad[0] + 1]
    if len(run) == 0:
        nan = float("nan")
        return dict(stable=False, converged=False, trainable_loss0=nan, trainable_mean_last_k=nan, trainable_ratio=nan)
    stable = bool(np.isfinite(run).all())
    loss0 = float(run[0])
    with np.errstate(all="ignore"):  # inf - inf or x / 0 give nan / inf, which is what we want to report
        mean_last_k = float(np.mean(run[-min(window, len(run)) :]))
        ratio = float(np.float64(mean_last_k) / np.float64(loss0))
    converged = bool(stable and ratio < threshold)
    return dict(
        stable=stable,
        converged=converged,
        trainable_loss0=loss0,
        trainable_mean_last_k=mean_last_k,
        trainable_ratio=ratio,
    )


def convergence_measure(losses, window: int = 20, threshold: float = 1.0) -> np.ndarray:
    """
    The paper's convergence measure, vectorised over leading dims: losses [..., steps] -> [...].
    v = losses / losses[..., :1], with non-finite entries and entries above 1e6 set to 1e6
    (a non-finite or non-positive first loss makes the whole v equal to 1e6: diverged).
    If mean(v[..., -window:]) < threshold the run trained and the measure is -sum(v) (negative);
    otherwise it did not and the measure is sum(1/v) (positive).
    So: measure < 0 is trained, measure > 0 is not, and |measure| grows towards the boundary
    (slow training gives a large sum(v), slow divergence a large sum(1/v)).
    """
    x = np.asarray(losses, dtype=np.float64)
    assert x.ndim >= 1 and x.shape[-1] >= 1, f"losses must have shape [..., steps>=1], got {x.shape}"
    first = x[..., :1]
    with np.errstate(all="ignore"):
        v = x / first
    first_ok = np.isfinite(first) & (first > 0)
    v = np.where(first_ok, v, MAX_VAL)
    v = np.where(np.isfinite(v) & (v <= MAX_VAL), v, MAX_VAL)
    trained = v[..., -window:].mean(axis=-1) < threshold  # the rule of trainability()'s `converged`
    trained_value = -v.sum(axis=-1)
    diverged_value = (1.0 / np.maximum(v, 1.0 / MAX_VAL)).sum(axis=-1)  # floor keeps a zero loss from giving inf
    return np.where(trained, trained_value, diverged_value)


def edge_pixels(measure: np.ndarray) -> np.ndarray:
    """
    Boundary pixels of a [H, W] measure: a bool array [H-1, W-1], True where the 2x2 block starting
    at that pixel holds both phases (phase = measure > 0). Blocks touching a NaN cell
    (not computed yet) are never edges, so a half-finished grid has no fake boundary.
    """
    m = np.asarray(measure, dtype=np.float64)
    assert m.ndim == 2, f"measure must be 2-D, got shape {m.shape}"
    p = m > 0
    a, b, c, d = p[:-1, :-1], p[1:, :-1], p[:-1, 1:], p[1:, 1:]
    mixed = ~((a == b) & (a == c) & (a == d))
    n = np.isnan(m)
    has_nan = n[:-1, :-1] | n[1:, :-1] | n[:-1, 1:] | n[1:, 1:]
    return mixed & ~has_nan


def box_counting(edges: np.ndarray, sizes: list[int] | None = None) -> dict:
    """
    Box-counting dimension of a bool image. For each box size s, N(s) is the number of s x s boxes
    (tiled from the origin, partial boxes at the border included) holding at least one True pixel.
    sizes defaults to the powers of two up to min(H, W) // 8 (up to min(H, W) // 2 on small images).
    dimension: least-squares slope of log N(s) against log(1/s);
    dimension_median_local: median of the slopes between consecutive sizes.
    NaN dimensions when there are no edge pixels or fewer than two sizes.
    """
    e = np.asarray(edges, dtype=bool)
    assert e.ndim == 2, f"edges must be 2-D, got shape {e.shape}"
    H, W = e.shape
    if sizes is None:
        # powers of two with at least 8 boxes along the short side: bigger boxes are about as large
        # as the shape itself and bias the slope (a circle reads 0.94-1.10 with them, 0.98-1.02 without)
        sizes = [2**k for k in range(32) if 2**k <= min(H, W) // 8]
        if len(sizes) < 3:  # small grid: take boxes up to half the short side rather than fit < 3 points
            sizes = [2**k for k in range(32) if 2**k <= min(H, W) // 2]
    sizes = sorted({int(s) for s in sizes})
    assert all(s >= 1 for s in sizes), f"box sizes must be >= 1, got {sizes}"
    counts = []
    for s in sizes:
        hb, wb = -(-H // s), -(-W // s)  # number of boxes along each side, partial ones included
        padded = np.zeros((hb * s, wb * s), dtype=bool)
        padded[:H, :W] = e
        counts.append(int(padded.reshape(hb, s, wb, s).any(axis=(1, 3)).sum()))
    dimension = median_local = float("nan")
    if len(sizes) >= 2 and min(counts) > 0:
        x = np.log(1.0 / np.array(sizes, dtype=np.float64))
        y = np.log(np.array(counts, dtype=np.float64))
        dimension = float(np.polyfit(x, y, 1)[0])
        median_local = float(np.median(np.diff(y) / np.diff(x)))
    return dict(dimension=dimension, dimension_median_local=median_local, sizes=sizes, counts=counts)


def fractal_dimension(measure: np.ndarray, sizes: list[int] | None = None) -> dict:
    """Box-counting dimension of the boundary of a measure grid, plus the number of edge pixels."""
    edges = edge_pixels(measure)
    out = box_counting(edges, sizes)
    out["edge_pixel_count"] = int(edges.sum())
    return out


if __name__ == "__main__":
    # quick look: a straight boundary has dimension ~1, iid random signs ~2
    yy, xx = np.mgrid[0:512, 0:512]
    print("line ", fractal_dimension(xx + 0.37 * yy - 200.5)["dimension"])
    print("noise", fractal_dimension(np.random.default_rng().standard_normal((512, 512)))["dimension"])
    print("log8/log3 =", math.log(8) / math.log(3))
