"""Rules of thumb from phase maps (numpy only): the critical learning rate per token budget and its power law, a safe
learning rate, and which parameter group's learning rate sets trainability.

Phases are grids [rows, cols] of 1.0 (trained), 0.0 (not) and NaN (no cell), the map first, then its twins.

Per row of the num_tokens x lr plane (lr ascending along the row), in each map: the first cell that fails after the
first one that trained, the last trainable lr before it, and the last trainable lr anywhere. lr* of a row is the
geometric mean of the map's last trainable and first failing lr; the row's bracket [lower, upper] runs from the
smallest last-trainable-before-a-failure to the largest first-failure-after-the-last-success over the map and its
twins, so it holds both the grid's spacing and the band where the twins' labels mix; the safe lr is `lower` (below it
every cell of the row and of its twins trained).

The law lr*(tokens) = B tokens^-beta is a least-squares line in log10-log10; its 95% interval is a bootstrap: rows
resampled with replacement, each row's log10 lr* drawn uniformly inside its bracket.
"""

import math

import numpy as np

BOOTSTRAP = 2000  # resamples of the power-law fit: the 2.5-97.5 percentiles move by < 0.01 in beta beyond ~1000


def row_crossing(phase_row: np.ndarray) -> dict | None:
    """In one row (lr ascending): the index of the first failure after the first trained cell, and of the last
    trained cell; None when the row never trains or never fails after training (its lr* lies outside the grid)."""
    known = ~np.isnan(phase_row)
    ok = np.flatnonzero(known & (phase_row == 1))
    if ok.size == 0:
        return None
    fail = np.flatnonzero(known & (phase_row == 0) & (np.arange(len(phase_row)) > ok[0]))
    if fail.size == 0:
        return None
    before = np.flatnonzero(known[: fail[0]] & (phase_row[: fail[0]] == 1))
    return dict(first_fail=int(fail[0]), last_ok_before=int(before[-1]), last_ok=int(ok[-1]))


def critical_lrs(phases: list[np.ndarray], lrs, tokens) -> list[dict]:
    """Per row: tokens, last trainable and first untrainable lr of the map, lr*, the bracket over the map and twins,
    the mixed band (where some map trains above another's first failure; None if labels never mix), safe lr and its
    fraction of lr*; `censored` says why a row has no lr* (never trains, or never fails, inside the grid)."""
    lrs = np.asarray(lrs, dtype=np.float64)
    out = []
    for i, t in enumerate(tokens):
        crossings = [row_crossing(p[i]) for p in phases]
        row = dict(tokens=float(t), censored=None)
        if crossings[0] is None or any(c is None for c in crossings):
            trained = [float(np.nanmean(p[i])) for p in phases]
            row["censored"] = "never fails inside the grid" if min(trained) > 0 else "never trains inside the grid"
            out.append(row)
            continue
        c = crossings[0]
        last, first = lrs[c["last_ok_before"]], lrs[c["first_fail"]]
        lower = min(lrs[x["last_ok_before"]] for x in crossings)
        upper = max(lrs[min(x["last_ok"] + 1, len(lrs) - 1)] for x in crossings)
        band_lo = min(lrs[x["first_fail"]] for x in crossings)
        band_hi = max(lrs[x["last_ok"]] for x in crossings)
        lr_star = math.sqrt(last * first)
        row.update(
            last_trainable=float(last),
            first_untrainable=float(first),
            lr_star=lr_star,
            bracket=[float(lower), float(max(upper, first))],
            mixed_band=[float(band_lo), float(band_hi)] if band_hi > band_lo else None,
            safe_lr=float(lower),
            safe_fraction=float(lower / lr_star),
        )
        out.append(row)
    return out


def fit_line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares slope and intercept of y on x."""
    slope, intercept = np.polyfit(x, y, 1)
    return float(slope), float(intercept)


def power_law(rows: list[dict], bootstrap: int = BOOTSTRAP, seed: int = 0) -> dict | None:
    """lr*(tokens) = B tokens^-beta from the rows with an lr* (critical_lrs); None when fewer than 3 distinct token
    budgets have one. beta_interval and B_interval: 2.5-97.5 percentile over `bootstrap` resamples."""
    used = [r for r in rows if r["censored"] is None]
    x = np.log10([r["tokens"] for r in used]) if used else np.zeros(0)
    if len(set(x.tolist())) < 3:
        return None
    y = np.log10([r["lr_star"] for r in used])
    lo, hi = (np.log10([r["bracket"][k] for r in used]) for k in (0, 1))
    slope, intercept = fit_line(x, y)
    rng = np.random.default_rng(seed)
    betas, logB = [], []
    for _ in range(bootstrap):
        pick = rng.integers(0, len(used), len(used))
        if len(set(x[pick].tolist())) < 2:  # a line needs two distinct budgets
            continue
        s, c = fit_line(x[pick], rng.uniform(lo[pick], hi[pick]))
        betas.append(-s)
        logB.append(c)
    b_lo, b_hi = np.percentile(betas, [2.5, 97.5])
    c_lo, c_hi = np.percentile(logB, [2.5, 97.5])
    return dict(
        beta=-slope,
        B=10**intercept,
        beta_interval=[float(b_lo), float(b_hi)],
        B_interval=[float(10**c_lo), float(10**c_hi)],
        rows_used=len(used),
        rows_censored=len(rows) - len(used),
        tokens_range=[float(10 ** x.min()), float(10 ** x.max())],
        bootstrap=len(betas),
        kind="least squares in log10-log10; 2.5-97.5 percentile over bootstrap resamples of the rows, each row's "
        "log10 lr* drawn uniformly inside its bracket",
    )


def synthetic_phases(lrs, tokens, B: float, beta: float, band: float = 0.0, seed: int = 0) -> np.ndarray:
    """A num_tokens x lr phase map whose boundary is lr*(t) = B t^-beta, the labels mixed at random within +-band
    decades of it (band 0: a sharp boundary): what the fit reads on a known case."""
    rng = np.random.default_rng(seed)
    log_lr = np.log10(np.asarray(lrs, dtype=np.float64))[None, :]
    star = np.log10(B) - beta * np.log10(np.asarray(tokens, dtype=np.float64))[:, None]
    jitter = rng.uniform(-band, band, size=(len(tokens), len(lrs))) if band else 0.0
    return (log_lr < star + jitter).astype(np.float64)


def known_case(lrs, tokens, B: float, beta: float, twins: int) -> dict | None:
    """What the fit reads on synthetic maps of this law on the same grid (a sharp map, and `twins` maps mixed within
    one lr step of it): its beta and interval, and whether the interval holds the true beta."""
    step = float(np.mean(np.diff(np.log10(np.asarray(lrs, dtype=np.float64)))))
    phases = [synthetic_phases(lrs, tokens, B, beta)] + [
        synthetic_phases(lrs, tokens, B, beta, band=step, seed=k + 1) for k in range(twins)
    ]
    fit = power_law(critical_lrs(phases, lrs, tokens))
    if fit is None:
        return None
    lo, hi = fit["beta_interval"]
    return dict(true_beta=beta, beta=fit["beta"], beta_interval=[lo, hi], covers=bool(lo <= beta <= hi))


def orientation(phase: np.ndarray, row_step: float, col_step: float) -> dict | None:
    """Which axis sets trainability: the boundary's normal from the phase changes between neighbours. A boundary
    crosses V vertical neighbour pairs per col it spans and H horizontal pairs per row, so in axis units (decades on a
    log axis: row_step, col_step per cell) its normal is (V x col_step, H x row_step). angle: degrees of the normal from
    the rows axis (0: trainability changes with the rows axis' value only); rows_share: its rows component's share."""
    a = np.asarray(phase, dtype=np.float64)
    vertical = ~np.isnan(a[1:]) & ~np.isnan(a[:-1]) & (a[1:] != a[:-1])
    horizontal = ~np.isnan(a[:, 1:]) & ~np.isnan(a[:, :-1]) & (a[:, 1:] != a[:, :-1])
    V, H = int(vertical.sum()), int(horizontal.sum())
    if V + H == 0:
        return None
    n_rows, n_cols = V * abs(col_step), H * abs(row_step)
    return dict(
        angle=math.degrees(math.atan2(n_cols, n_rows)),
        rows_share=n_rows / (n_rows + n_cols),
        vertical_changes=V,
        horizontal_changes=H,
    )


def safe_box(phases: list[np.ndarray]) -> dict:
    """The largest leading stretch of each axis that trains everywhere: `rows` = the last row index r such that every
    cell of rows 0..r (all cols) trained in every map (None if row 0 does not), `cols` likewise; `corner` = the (r, c)
    of the largest (most cells) rectangle rows 0..r x cols 0..c that trained in every map (None if cell 0, 0 did not).
    """
    ok = np.logical_and.reduce([np.nan_to_num(p, nan=0.0) == 1 for p in phases])
    rows_ok, cols_ok = ok.all(axis=1), ok.all(axis=0)
    lead = lambda v: None if not v[0] else int(np.argmin(v)) - 1 if not v.all() else len(v) - 1  # noqa: E731
    inside = np.logical_and.accumulate(np.logical_and.accumulate(ok, axis=0), axis=1)  # rectangle 0..r x 0..c all ok
    area = np.where(inside, np.outer(np.arange(1, ok.shape[0] + 1), np.arange(1, ok.shape[1] + 1)), 0)
    r, c = np.unravel_index(int(np.argmax(area)), area.shape)
    return dict(rows=lead(rows_ok), cols=lead(cols_ok), corner=[int(r), int(c)] if inside[0, 0] else None)
