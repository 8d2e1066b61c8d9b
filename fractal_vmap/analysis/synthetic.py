"""Phase maps whose boundary has a known dimension, to calibrate the box-counting estimator (fractal.py) on.

Box counting on a finite grid reads below the true dimension, by an amount that depends on the resolution, on the
dimension and on the kind of set. To say what a measured dimension means we measure the estimator on boundaries whose
dimension is a theorem, rasterised as a study rasterises a trainability landscape: the phase is read at cell centres
(measure < 0 is one phase, > 0 the other), so structure finer than a cell shows up as it would in a real grid.

Fractal families take the true dimension D in (1, 2): `weierstrass` and `fbm_graph` (the region under a self-affine
graph), `fbm_level_set` (an excursion set of a rough random field: many nested boundaries) and `koch` (the region under
a self-similar curve). Smooth families have D = 1: `line`, `ellipse`, `smooth_graph`, `smooth_level_set`.
Every map is a float32 array [H, W], deterministic given its seed. Coordinates run over the unit square on any shape
(a rectangular grid scales them unequally, which is bi-Lipschitz and so keeps every dimension).
"""

import math
from functools import lru_cache

import numpy as np

FRACTAL_FAMILIES = ("weierstrass", "fbm_graph", "fbm_level_set", "koch")
SMOOTH_FAMILIES = ("line", "ellipse", "smooth_graph", "smooth_level_set")
AMPLITUDE = (0.15, 0.45)  # a graph wanders within +-A of the map's height around its middle, A drawn in this range


def phase_map(family: str, dimension: float, shape: int | tuple[int, int], seed) -> np.ndarray:
    """A signed measure [H, W] (float32) whose zero set is a boundary of the given dimension, from one family."""
    H, W = (shape, shape) if isinstance(shape, int) else shape
    assert H >= 4 and W >= 4, f"a map needs at least 4 x 4 cells, got {H} x {W}"
    rng = np.random.default_rng(seed)
    if family in SMOOTH_FAMILIES:
        assert dimension == 1.0, f"{family} is smooth: its dimension is 1, not {dimension}"
        return SMOOTH[family](H, W, rng).astype(np.float32)
    assert family in FRACTAL_FAMILIES, f"unknown family {family!r}: one of {FRACTAL_FAMILIES + SMOOTH_FAMILIES}"
    assert 1.0 < dimension < 2.0, f"{family} takes a dimension in (1, 2), got {dimension}"
    return FRACTAL[family](H, W, dimension, rng).astype(np.float32)


def _centres(n: int) -> np.ndarray:
    return (np.arange(n) + 0.5) / n  # cell centres on the unit interval


def _region_under(curve: np.ndarray, H: int, rng) -> np.ndarray:
    """The measure y - (c + A * curve(x)) for a curve sampled at the column centres, scaled to [-1, 1]. A graph that
    fits in the map is self-affine: at boxes wider than its wiggles are tall it looks like a line, so the estimate
    depends on its amplitude A as well as on D, and A is drawn (AMPLITUDE) rather than fixed."""
    g = curve - 0.5 * (curve.max() + curve.min())
    g = g / max(np.abs(g).max(), 1e-300)
    c = 0.5 + rng.uniform(-0.05, 0.05)  # a little vertical jitter, so maps do not share a lattice alignment
    return _centres(H)[:, None] - (c + rng.uniform(*AMPLITUDE) * g)[None, :]


def weierstrass(H: int, W: int, D: float, rng, base: float = 2.0) -> np.ndarray:
    """Region under a Weierstrass graph with random phases, w(x) = sum_k base^-(2-D)k cos(2 pi base^k x + phi_k).
    Its graph has box dimension D for every base > 1 and 1 < D < 2 (Kaplan, Mallet-Paret and Yorke 1984, Ergodic
    Theory Dynam. Systems 4; Hunt 1998, Proc. AMS 126, for the Hausdorff dimension with random phases). The sum runs to
    frequency 2^40 (far below a cell, where float64 still resolves the phase): what lies below a cell shows up in the
    values at the cell centres, as it would in a real map."""
    terms = int(40 * math.log(2) / math.log(base)) + 1
    k = np.arange(terms)
    x = _centres(W) + rng.uniform()  # a random window on the period-1 function
    phases = rng.uniform(0, 2 * np.pi, terms)
    arg = np.mod(np.outer(base**k, x), 1.0) * 2 * np.pi + phases[:, None]
    curve = (base ** (-(2 - D) * k))[:, None] * np.cos(arg)
    return _region_under(curve.sum(axis=0), H, rng)


def fbm_path(n: int, hurst: float, rng) -> np.ndarray:
    """n samples of fractional Brownian motion at equal steps, exactly Gaussian with fBm's covariance: the circulant
    embedding of its increments (Davies and Harte 1987, Biometrika 74), whose eigenvalues are >= 0 for fBm's."""
    m = n - 1
    k = np.arange(m + 1, dtype=np.float64)
    gamma = 0.5 * ((k + 1) ** (2 * hurst) - 2 * k ** (2 * hurst) + np.abs(k - 1) ** (2 * hurst))  # increments' cov
    eig = np.fft.fft(np.concatenate([gamma, gamma[-2:0:-1]])).real
    z = rng.standard_normal(2 * m) + 1j * rng.standard_normal(2 * m)
    increments = np.fft.fft(np.sqrt(np.maximum(eig, 0) / (2 * m)) * z).real[:m]
    return np.concatenate([[0.0], np.cumsum(increments)])


def fbm_graph(H: int, W: int, D: float, rng) -> np.ndarray:
    """Region under a fractional Brownian motion path of Hurst index 2 - D, sampled exactly at the column centres.
    Its graph has box and Hausdorff dimension 2 - (2 - D) = D almost surely (Falconer, Fractal Geometry, 3rd ed. 2014,
    Theorem 16.7; Adler 1981)."""
    return _region_under(fbm_path(W, 2 - D, rng), H, rng)


def fbm_level_set(H: int, W: int, D: float, rng) -> np.ndarray:
    """An excursion set of a fractional Brownian field of Hurst index h = 2 - D: its boundary, the level set, has
    dimension 2 - h = D almost surely (Kahane, Some Random Series of Functions, 2nd ed. 1985, ch. 18; Falconer, Fractal
    Geometry, ch. 16). Spectral synthesis (Voss 1985, in Peitgen and Saupe, The Science of Fractal Images, 1988): a
    periodic Gaussian field of power spectrum |k|^-(2h + 2), with the power above the grid's Nyquist folded back (the
    first ring of aliases exactly, the rest as the white floor they nearly are), so the values at cell centres carry the
    sub-cell roughness a sampled fBm field has. Thresholded at its median, so both phases cover half the map."""
    power = _folded_power(H, W, 2 * (2 - D) + 2)
    z = rng.standard_normal(power.shape) + 1j * rng.standard_normal(power.shape)
    field = np.fft.irfft2(np.sqrt(power) * z, s=(H, W))
    return field - np.median(field)


@lru_cache(maxsize=1)  # the calibration draws several seeds of one shape and D in a row
def _folded_power(H: int, W: int, p: float) -> np.ndarray:
    """The power spectrum |k|^-p on the rfft2 layout of an H x W grid, with its aliases folded in."""
    ky = (np.fft.fftfreq(H) * H)[:, None]  # integer wave numbers: cycles per map
    kx = (np.fft.rfftfreq(W) * W)[None, :]
    power = np.zeros((H, W // 2 + 1))
    for my in (-1, 0, 1):
        for mx in (-1, 0, 1):
            k2 = (ky + my * H) ** 2 + (kx + mx * W) ** 2
            power += np.where(k2 > 0, k2, np.inf) ** (-p / 2)
    r = 64  # aliases beyond the first ring, each taken at its centre k = 0: summed out to radius 64, then integrated
    m = np.arange(-r, r + 1, dtype=np.float64)
    mm = m[:, None] ** 2 * H**2 + m[None, :] ** 2 * W**2
    far = (np.maximum(np.abs(m)[:, None], np.abs(m)[None, :]) >= 2) & (m[:, None] ** 2 + m[None, :] ** 2 <= r**2)
    power += (mm[far] ** (-p / 2)).sum() + 2 * np.pi * r ** (2 - p) / (p - 2) * (H * W) ** (-p / 2)
    power[0, 0] = 0.0  # the mean is irrelevant: the threshold is the median
    power.flags.writeable = False
    return power


def koch(H: int, W: int, D: float, rng) -> np.ndarray:
    """Region under a generalized (Cesaro) Koch curve: each segment becomes 4 of ratio r = 1 / (2 + 2 cos theta), a
    tent of base angle theta in the middle. For theta < 90 degrees the open set condition holds, so its dimension is
    log 4 / log(2 + 2 cos theta) (Hutchinson 1981, Indiana Univ. Math. J. 30); theta = 60 is von Koch's 1.2619.
    The polygon is refined until its segments are under half a cell, but to at most 4^11 segments (so on 4096 cells
    above D = 1.65, and on 2048 above 1.85, they are up to 1.7 cells long), tilted by up to 10 degrees, and filled by
    the even-odd rule at the cell centres (measure -1 inside, +1 outside)."""
    theta = math.acos((4 ** (1 / D) - 2) / 2)
    r = 1 / (2 + 2 * math.cos(theta))
    length = 1.25 * max(H, W)  # the curve overshoots the map by 1/8 on each side
    levels = min(11, math.ceil(math.log(length / 0.5) / math.log(1 / r)))
    gen = np.array([0, r, r + r * np.exp(1j * theta), 1 - r])  # where the 4 sub-segments start, on a unit segment
    pts = np.array([0, 1], dtype=np.complex128)
    for _ in range(levels):
        starts, steps = pts[:-1], np.diff(pts)
        pts = np.concatenate([(starts[:, None] + steps[:, None] * gen[None, :]).ravel(), pts[-1:]])
    height = pts.imag.max()
    pts = 1.25 * (pts - 0.5) + 0.5  # x from -1/8 to 9/8
    pts = pts + 1j * (0.5 - 1.25 * height / 2 + rng.uniform(-0.05, 0.05))  # centred vertically, jittered
    pts = (pts - (0.5 + 0.5j)) * np.exp(1j * np.deg2rad(rng.uniform(-10, 10))) + (0.5 + 0.5j)
    x, y = pts.real * W - 0.5, pts.imag * H - 0.5  # in cell-index units: cell (i, j) has its centre at (j, i)
    x = np.concatenate([x, [x[-1], x[0], x[0]]])  # close the polygon below the map (y < 0)
    y = np.concatenate([y, [-2.0, -2.0, y[0]]])
    return np.where(_even_odd(x, y, H, W), -1.0, 1.0)


def _even_odd(x: np.ndarray, y: np.ndarray, H: int, W: int) -> np.ndarray:
    """Cells whose centre lies inside the closed polygon (x, y) by the even-odd rule, one scanline per cell row."""
    x0, y0, x1, y1 = x[:-1], y[:-1], x[1:], y[1:]
    lo = np.clip(np.ceil(np.minimum(y0, y1)), 0, H).astype(np.int64)  # an edge crosses rows lo <= i < hi
    hi = np.clip(np.ceil(np.maximum(y0, y1)), 0, H).astype(np.int64)
    count = hi - lo
    edge = np.repeat(np.arange(len(x0)), count)
    row = lo[edge] + np.arange(edge.size) - np.repeat(np.cumsum(count) - count, count)
    t = (row - y0[edge]) / (y1[edge] - y0[edge])
    col = np.clip(np.floor(x0[edge] + t * (x1[edge] - x0[edge])) + 1, 0, W).astype(np.int64)  # cells right of it
    toggles = np.bincount(row * (W + 1) + col, minlength=H * (W + 1)).reshape(H, W + 1)[:, :W]
    return (np.cumsum(toggles, axis=1) % 2).astype(bool)


def line(H: int, W: int, rng) -> np.ndarray:
    """A straight boundary at a random angle through a random point of the map's middle 80%."""
    phi, (py, px) = rng.uniform(0, np.pi), rng.uniform(0.1, 0.9, 2)
    return (_centres(W)[None, :] - px) * math.cos(phi) + (_centres(H)[:, None] - py) * math.sin(phi)


def ellipse(H: int, W: int, rng) -> np.ndarray:
    """An ellipse of random orientation and aspect (1 to 2.5) whose long radius is log-uniform from 3 cells to 0.45 of
    the map: small ones give the short smooth boundaries (few edge pixels) the null must cover too."""
    a = math.exp(rng.uniform(math.log(3 / min(H, W)), math.log(0.45)))
    b = a * rng.uniform(0.4, 1.0)
    (cy, cx), phi = rng.uniform(0.3, 0.7, 2), rng.uniform(0, np.pi)
    dy, dx = _centres(H)[:, None] - cy, _centres(W)[None, :] - cx
    u, v = dx * math.cos(phi) + dy * math.sin(phi), -dx * math.sin(phi) + dy * math.cos(phi)
    return (u / a) ** 2 + (v / b) ** 2 - 1


def smooth_graph(H: int, W: int, rng) -> np.ndarray:
    """Region under a trigonometric polynomial of degree 4 (a smooth graph: rectifiable, dimension 1)."""
    k = np.arange(1, 5)
    coef, phases = rng.standard_normal(4) / k**2, rng.uniform(0, 2 * np.pi, 4)
    curve = (coef[:, None] * np.cos(2 * np.pi * k[:, None] * _centres(W)[None, :] + phases[:, None])).sum(axis=0)
    return _region_under(curve, H, rng)


def smooth_level_set(H: int, W: int, rng) -> np.ndarray:
    """The median level set of a random trigonometric polynomial in x and y of degree <= 3: almost surely a regular
    value (Bulinskaya's lemma), so the boundary is a finite union of smooth closed curves, dimension 1."""
    ky, kx = np.meshgrid(np.arange(-3, 4), np.arange(0, 4), indexing="ij")
    coef = (rng.standard_normal(ky.shape) + 1j * rng.standard_normal(ky.shape)) * ((kx > 0) | (ky > 0))  # one of +-k
    ey = np.exp(2j * np.pi * np.outer(_centres(H), np.arange(-3, 4)))  # [H, 7]
    ex = np.exp(2j * np.pi * np.outer(np.arange(0, 4), _centres(W)))  # [4, W]
    field = (ey @ coef @ ex).real  # sum of c_k exp(2 pi i k.(y, x)) over the wave vectors, as a rank-7 product
    return field - np.median(field)


FRACTAL = dict(weierstrass=weierstrass, fbm_graph=fbm_graph, fbm_level_set=fbm_level_set, koch=koch)
SMOOTH = dict(line=line, ellipse=ellipse, smooth_graph=smooth_graph, smooth_level_set=smooth_level_set)
