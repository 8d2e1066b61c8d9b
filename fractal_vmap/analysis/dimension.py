"""A box-counting dimension a researcher can quote: the raw estimate of fractal.py, its spread over where the box
lattice sits (and over twin maps), what boundaries of known dimension read at the same resolution, a bias-corrected
value, and a verdict against the smooth-boundary null.

Why: box counting on a finite grid reads below the true dimension (by 0.1 to 0.4 at 256^2 for true D of 1.5 to 1.8,
depending on the kind of set), and a smooth boundary reads 1 only within a spread that grows as its edge pixels get
few. Both are measured once, on the synthetic boundaries of `synthetic.py`, by `benchmarks/calibrate_dimension.py`,
into `calibration.json` beside this file; `calibrated_dimension` reads a measured grid against that table.
"""

import json
import math
from functools import cache
from pathlib import Path

import numpy as np

from fractal_vmap.analysis.fractal import box_counting, edge_pixels
from fractal_vmap.errors import UserError

CALIBRATION = Path(__file__).with_name("calibration.json")
# A box-counting dimension needs a slope over >= 3 box sizes (2 points always fit a line) and >= 50 edge pixels (the
# caveat of report.py reads these too). Measured on 3,000 straight and circular boundaries (dimension 1) on 8-128 cell
# grids, 1st-99th percentile of the estimate: 0.00-1.58 with 2 box sizes, 0.00-1.29 under 25 edge pixels, 0.85-1.19
# at 25-50, 0.92-1.14 at 50-100.
MIN_BOX_SIZES, MIN_EDGE_PIXELS = 3, 50
OFFSETS = 16  # placements of the box lattice per map (the origin and 15 random shifts): ~2 s on 4097^2 cells
VERDICTS = ("fractal", "not distinguishable from smooth", "cannot tell at this resolution")


def lattice_counts(edges: np.ndarray, sizes: list[int], shifts: np.ndarray) -> np.ndarray:
    """Occupied boxes [len(shifts), len(sizes)] for power-of-two box sizes 1, 2, 4, ... with the lattice's origin moved
    by each (dy, dx) shift in [0, largest size): pad once, then OR-pool 2 x 2 blocks level by level (a shift of the
    origin by (dy, dx) moves the lattice of every size s by (dy mod s, dx mod s))."""
    assert sizes == [2**k for k in range(len(sizes))], f"sizes must be 1, 2, 4, ..., got {sizes}"
    h, w = edges.shape
    top = sizes[-1]
    counts = np.zeros((len(shifts), len(sizes)), dtype=np.int64)
    for i, (dy, dx) in enumerate(shifts):
        grid = np.zeros((-(-(h + dy) // top) * top, -(-(w + dx) // top) * top), dtype=bool)
        grid[dy : dy + h, dx : dx + w] = edges
        counts[i, 0] = int(edges.sum())
        for k in range(1, len(sizes)):
            grid = grid[0::2, 0::2] | grid[1::2, 0::2] | grid[0::2, 1::2] | grid[1::2, 1::2]
            counts[i, k] = int(np.count_nonzero(grid))
    return counts


def slopes(sizes: list[int], counts: np.ndarray) -> np.ndarray:
    """Least-squares slope of log N(s) against log(1/s) for each row of counts (fractal.box_counting's fit);
    NaN for a row with an empty box count."""
    x = np.log(1.0 / np.asarray(sizes, dtype=np.float64))
    xc = x - x.mean()
    with np.errstate(divide="ignore", invalid="ignore"):  # log 0 = -inf: that row's slope is NaN below
        y = np.log(np.asarray(counts, dtype=np.float64))
        out = ((y - y.mean(axis=-1, keepdims=True)) * xc).sum(axis=-1) / (xc**2).sum()
    return np.where(np.isfinite(y).all(axis=-1), out, np.nan)


def random_shifts(sizes: list[int], offsets: int, rng) -> np.ndarray:
    """The origin (0, 0) first (fractal.py's lattice), then offsets - 1 uniform random ones."""
    shifts = rng.integers(0, sizes[-1], size=(offsets, 2))
    shifts[0] = 0
    return shifts


def box_sizes(H: int, W: int) -> list[int]:
    """Box sizes of the calibrated estimate on an H x W grid: powers of two with >= 8 boxes along the short side (up
    to half of it when that leaves < 3), fractal.py's rule applied to cells rather than edge blocks (H - 1), so that
    a grid of 2^k cells and one refined to 2^k + 1 get the same sizes and read against the same calibration row."""
    sizes = [2**k for k in range(32) if 2**k <= min(H, W) // 8]
    return sizes if len(sizes) >= 3 else [2**k for k in range(32) if 2**k <= min(H, W) // 2]


def lattice_estimates(measure: np.ndarray, offsets: int = OFFSETS, rng=None) -> dict:
    """The raw estimate of fractal.py (`box_counting` as fractal.json has it) and the slopes over `offsets` placements
    of a lattice of `box_sizes` (the first at the origin), with the edge pixels and box sizes they rest on."""
    edges = edge_pixels(measure)
    sizes = box_sizes(*np.shape(measure))
    rng = np.random.default_rng(0) if rng is None else rng
    counts = lattice_counts(edges, sizes, random_shifts(sizes, offsets, rng))
    fits = slopes(sizes, counts) if len(sizes) >= 2 else np.full(offsets, np.nan)  # a slope needs two sizes
    return dict(raw=box_counting(edges), sizes=sizes, edges=int(edges.sum()), slopes=fits, counts=counts)


@cache
def load_calibration(path: str = str(CALIBRATION)) -> dict:
    """The calibration table (benchmarks/calibrate_dimension.py writes it)."""
    return json.loads(Path(path).read_text())


def calibrated_dimension(
    measure, twins: list | None = None, offsets: int = OFFSETS, seed: int = 0, table: dict | None = None
) -> dict:
    """The boundary dimension of a measure grid [H, W] (NaN = not computed), read against the calibration table.
    twins: the same grid retrained with a 1-ulp nudge or another data seed (arrays of its shape), pooled into the
    interval. Returns a strict-JSON-ready dict (None where there is no number):
      dimension, dimension_median_local, sizes, counts, edge_pixel_count: fractal.py's estimate, as fractal.json has it
      estimate_sizes: the box sizes of the calibrated estimate (box_sizes); interval: its 2.5-97.5 percentile over
        `offsets` lattice placements x (1 + twins) maps (interval_kind says so); estimates: their count and median
      by_box_range: {without_smallest, without_largest: [first size, last size, median slope]}, the scale dependence
      null: the smooth boundaries' range (0.5-99.5 percentile) at this resolution and about this many edge pixels
      calibration: resolution (the table's row), detectable_from (the smallest D every family reads above the null,
        None if some family never does), its value by family, same_box_sizes, edges_in_calibrated_range
      corrected: dimension (the median over families of the D whose median reading is this one), interval (the D
        whose reading band meets the interval, in some family), by_family ({family: {dimension, interval}}),
        known_reads ({family: {reads: [2.5, 50, 97.5 percentile], edge_pixels}}: a boundary of the corrected D at
        this resolution), note (when the interval is open or empty)
      verdict: one of VERDICTS; reason: why, in one line."""
    maps = [_grid(measure, "measure")] + [_grid(t, f"twin {i}") for i, t in enumerate(twins or [])]
    if any(m.shape != maps[0].shape for m in maps):
        raise UserError(f"twin maps must have the measure's shape {maps[0].shape}, got {[m.shape for m in maps[1:]]}")
    table = load_calibration() if table is None else table
    runs = [lattice_estimates(m, offsets, np.random.default_rng(seed)) for m in maps]  # the same placements on each
    raw, sizes, edges = runs[0]["raw"], runs[0]["sizes"], runs[0]["edges"]  # sizes: the calibrated estimate's
    pooled = np.concatenate([r["slopes"] for r in runs])
    pooled = pooled[np.isfinite(pooled)]
    H, W = maps[0].shape
    out = dict(
        dimension=_r(raw["dimension"]),
        dimension_median_local=_r(raw["dimension_median_local"]),
        sizes=raw["sizes"],
        counts=raw["counts"],
        edge_pixel_count=edges,
        shape=[H, W],
        twins=len(maps) - 1,
        twin_edge_pixel_counts=[r["edges"] for r in runs[1:]],
        estimate_sizes=sizes,
        interval=None,
        estimates=None,
        by_box_range=None,
        null=None,
        calibration=None,
        corrected=None,
    )
    out["interval_kind"] = (
        f"2.5-97.5 percentile of the least-squares slope over {offsets} placements of the box "
        f"lattice (the origin and {offsets - 1} random shifts) x {len(maps)} map(s)"
    )
    resolution = _table_resolution(table, sizes, min(H, W))
    if edges < MIN_EDGE_PIXELS or len(sizes) < MIN_BOX_SIZES or resolution is None or pooled.size == 0:
        why = (
            f"{edges} edge pixels and {len(sizes)} box sizes on {H} x {W} cells: a dimension needs >= "
            f"{MIN_EDGE_PIXELS} edge pixels, >= {MIN_BOX_SIZES} box sizes and a calibrated resolution (>= "
            f"{min(table['resolutions'])} cells a side)"
        )
        return dict(out, verdict=VERDICTS[2], reason=why)
    lo, med, hi = np.percentile(pooled, [2.5, 50, 97.5])
    counts = np.concatenate([r["counts"] for r in runs])
    out["interval"], out["estimates"] = [_r(lo), _r(hi)], dict(count=int(pooled.size), median=_r(med))
    out["by_box_range"] = dict(  # the slope's dependence on scale: medians over the placements, one end dropped
        without_smallest=[sizes[1], sizes[-1], _r(np.nanmedian(slopes(sizes[1:], counts[:, 1:])))],
        without_largest=[sizes[0], sizes[-2], _r(np.nanmedian(slopes(sizes[:-1], counts[:, :-1])))],
    )
    null = _null_row(table, resolution, edges)
    null_lo, null_hi = null["p0_5"], null["p99_5"]
    out["null"] = dict(
        resolution=resolution,
        edge_bin=null["edge_bin"],
        range=[null_lo, null_hi],
        median=null["p50"],
        samples=null["samples"],
        kind="0.5-99.5 percentile of the smooth families' estimates",
    )
    fine, belts = _belts(table, resolution, null)
    out["calibration"] = _calibration(fine, belts, resolution, edges, null_hi)
    out["calibration"]["same_box_sizes"] = table["sizes"][str(resolution)] == sizes
    out["corrected"] = _corrected(fine, belts, lo, med, hi)
    reading = f"{_r(lo)}-{_r(hi)} on {H} x {W} cells against a smooth null of {null_lo}-{null_hi}"
    if lo > null_hi:
        return dict(out, verdict=VERDICTS[0], reason=f"the interval {reading} lies above it")
    if out["calibration"]["detectable_from"] is None:
        return dict(
            out,
            verdict=VERDICTS[2],
            reason=f"the interval {reading} overlaps it, and at this resolution even "
            f"D = {fine[-1]:.2f} reads inside it for some calibrated family",
        )
    return dict(
        out,
        verdict=VERDICTS[1],
        reason=f"the interval {reading} overlaps it; a boundary of D >= "
        f"{out['calibration']['detectable_from']} would have read above it",
    )


def _grid(a, what: str) -> np.ndarray:
    m = np.asarray(a, dtype=np.float64)
    if m.ndim != 2 or min(m.shape) < 2:
        raise UserError(f"the {what} must be a 2-D grid of at least 2 x 2 cells, got shape {m.shape}")
    return m


def _r(x, digits: int = 4):
    return None if x is None or not math.isfinite(x) else round(float(x), digits)


def _table_resolution(table: dict, sizes: list[int], n: int) -> int | None:
    """The calibrated resolution for a grid of short side n: the largest one <= n with the same box sizes, else the
    largest <= n (then its box sizes differ, and out["calibration"]["same_box_sizes"] says so)."""
    below = [r for r in table["resolutions"] if r <= n]
    same = [r for r in below if table["sizes"][str(r)] == sizes]
    return max(same or below) if below else None


def _null_row(table: dict, resolution: int, edges: int) -> dict:
    """The smooth families' estimates at this resolution with about this many edge pixels: the table's bins cover
    all edge counts, each wide enough to hold >= 64 estimates (a short smooth boundary reads a wider spread)."""
    rows = [r for r in table["smooth"] if r["resolution"] == resolution and r["edge_bin"] is not None]
    assert rows, f"the calibration table has no smooth null at {resolution}"
    return next((r for r in rows if r["edge_bin"][0] <= edges < r["edge_bin"][1]), rows[-1])


def _belts(table: dict, resolution: int, null: dict) -> tuple[np.ndarray, dict]:
    """Per fractal family, its readings (2.5th, 50th, 97.5th percentile) against true D on a 0.001 grid of D,
    linear between the calibrated D, with the smooth null (0.5-99.5 percentile) as its D = 1 end."""
    rows = [r for r in table["fractal"] if r["resolution"] == resolution]
    top = max(r["dimension"] for r in rows)
    fine = np.round(np.linspace(1.0, top, int(round((top - 1.0) / 0.001)) + 1), 3)
    belts = {}
    for family in sorted({r["family"] for r in rows}):
        fam = sorted((r for r in rows if r["family"] == family), key=lambda r: r["dimension"])
        d = [1.0] + [r["dimension"] for r in fam]
        curves = [[null[a]] + [r[b] for r in fam] for a, b in (("p0_5", "p2_5"), ("p50", "p50"), ("p99_5", "p97_5"))]
        edge = [null["edge_pixels"][1]] + [r["edge_pixels"][1] for r in fam]  # median edge pixels
        edge_range = (min(r["edge_pixels"][0] for r in fam), max(r["edge_pixels"][2] for r in fam))
        belts[family] = [np.interp(fine, d, c) for c in curves] + [np.interp(fine, d, edge), edge_range]
    return fine, belts


def _calibration(fine: np.ndarray, belts: dict, resolution: int, edges: int, null_hi: float) -> dict:
    """The smallest D every family reads above the null (None if some family never does up to the table's top D),
    and whether this grid's edge pixels are within the fractal families' range at this resolution."""
    first = {}
    for family, (lo, _, _, _, _) in belts.items():
        above = np.flatnonzero(lo > null_hi)
        first[family] = None if above.size == 0 else float(fine[above[0]])
    worst = None if None in first.values() else max(first.values())
    spans = [b[4] for b in belts.values()]
    return dict(
        resolution=resolution,
        detectable_from=worst,
        detectable_by_family=first,
        edges_in_calibrated_range=bool(min(s[0] for s in spans) <= edges <= max(s[1] for s in spans)),
        calibrated_edge_pixels=[min(s[0] for s in spans), max(s[1] for s in spans)],
    )


def _corrected(fine: np.ndarray, belts: dict, lo: float, med: float, hi: float) -> dict:
    """Bias-corrected D, by family and pooled. Per family: the true D whose median reading is the measured median,
    and the interval of true D whose reading band (2.5-97.5 percentile) meets the measured interval (a Neyman belt
    inversion; it is justified because each family's readings rise with D, within its band's noise). Pooled: the
    median of the families' values, and the span of their intervals, so that not knowing which kind of set the
    boundary is counts as uncertainty. `known_reads`: what each family's boundary of the pooled D reads here."""
    by_family, spans = {}, []
    for family, (b_lo, b_med, b_hi, _, _) in belts.items():
        meets = (b_lo <= hi) & (b_hi >= lo)
        rising = np.maximum.accumulate(b_med)  # flat or falling stretches (Koch near 1.9) keep the smallest D
        d = 1.0 if med <= rising[0] else None if med > rising[-1] else float(fine[np.argmax(rising >= med)])
        span = [float(fine[meets].min()), float(fine[meets].max())] if meets.any() else None
        by_family[family] = dict(dimension=d, interval=span)
        spans += [span] if span else []
    found = [f["dimension"] for f in by_family.values() if f["dimension"] is not None]
    point = float(np.median(found)) if found else None
    interval = [min(s[0] for s in spans), max(s[1] for s in spans)] if spans else None
    note = None
    if interval is None:
        below = all(med < b[0][0] for b in belts.values())
        note = "reads below the smooth null" if below else f"reads above every calibrated boundary (D up to {fine[-1]})"
    elif interval[1] >= fine[-1]:
        note = f"the interval reaches the table's top D = {fine[-1]}: its upper end may be higher"
    known = None
    if point is not None:
        i = int(np.argmin(np.abs(fine - point)))
        known = {
            f: dict(reads=[_r(b[0][i]), _r(b[1][i]), _r(b[2][i])], edge_pixels=int(b[3][i])) for f, b in belts.items()
        }
    return dict(
        dimension=_r(point, 3),
        interval=interval,
        by_family=by_family,
        known_reads=known,
        note=note,
        kind="true D whose calibrated 2.5-97.5 percentile reading meets the measured interval, in some family",
    )
