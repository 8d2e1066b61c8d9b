"""
The box-counting dimension of the trainable / not-trainable boundary of a measure grid (Sohl-Dickstein 2024,
arXiv 2402.06184): edge pixels (2x2 blocks holding both phases), boxes of power-of-two sizes, the slope. The phase of
a cell is the sign of its convergence measure (labels.py: measure < 0 trained). Numpy only.
"""

import math

import numpy as np


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
