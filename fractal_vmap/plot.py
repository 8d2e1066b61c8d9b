"""
Pictures of a trainability grid: the paper-style image (blue trained, red not, grey not computed)
and a 2x2 panel of labels. Rows run up the vertical axis (row 0 at the bottom), cols across.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.colors import LogNorm, Normalize

GREY = (0.5, 0.5, 0.5)  # cells with no value yet
NUM_TICKS = 6  # at most this many labelled ticks per axis


def _rank_fraction(x: np.ndarray) -> np.ndarray:
    """Rank of each entry / count, in (0, 1]; tied entries share the highest rank of their group."""
    return np.searchsorted(np.sort(x), x, side="right") / max(len(x), 1)


def _phase_rgb(trained: np.ndarray, depth: np.ndarray, missing: np.ndarray) -> np.ndarray:
    """
    RGB image [H, W, 3] from a bool phase grid: trained blue, not trained red, missing grey.
    depth says how deep in its phase a cell is; it is rank-stretched within each phase and
    the deepest cells get the most saturated colour.
    """
    H, W = trained.shape
    sat = np.zeros((H, W))
    for phase in (True, False):
        sel = (trained == phase) & ~missing
        sat[sel] = 0.3 + 0.7 * _rank_fraction(depth[sel])  # 0.3 floor keeps the palest cell clearly coloured
    rgb = np.ones((H, W, 3))
    blue = trained & ~missing
    red = ~trained & ~missing
    rgb[blue, 0] = 1 - sat[blue]
    rgb[blue, 1] = 1 - sat[blue]
    rgb[red, 1] = 1 - sat[red]
    rgb[red, 2] = 1 - sat[red]
    rgb[missing] = GREY
    return rgb


def measure_rgb(measure) -> np.ndarray:
    """paper_image's colours as an RGB array [H, W, 3] in [0, 1], row 0 first (not flipped): trained blue,
    not trained red, NaN grey, the palest cells nearest the boundary."""
    m = np.asarray(measure, dtype=np.float64)
    assert m.ndim == 2, f"measure must be 2-D, got shape {m.shape}"
    return _phase_rgb(m < 0, -np.abs(m), np.isnan(m))


def _label_axes(ax, row_values, col_values, row_name: str, col_name: str, log_rows: bool, log_cols: bool) -> None:
    """Ticks at cell centres, labelled with the axis values (log10 of them on a log axis)."""
    for values, name, log, set_ticks, set_labels, set_label in (
        (row_values, row_name, log_rows, ax.set_yticks, ax.set_yticklabels, ax.set_ylabel),
        (col_values, col_name, log_cols, ax.set_xticks, ax.set_xticklabels, ax.set_xlabel),
    ):
        v = np.asarray(values, dtype=np.float64)
        if log:
            with np.errstate(all="ignore"):  # a non-positive value labels as nan / -inf
                v = np.log10(v)
        idx = np.unique(np.linspace(0, len(v) - 1, min(NUM_TICKS, len(v))).round().astype(int))
        set_ticks(idx)
        set_labels([f"{v[i]:.3g}" for i in idx])
        set_label(f"log10 {name}" if log else name)


def _show(ax, rgb_or_values, **kwargs) -> object:
    """imshow with row 0 at the bottom, one rectangle per grid cell, no smoothing."""
    return ax.imshow(rgb_or_values, origin="lower", aspect="auto", interpolation="nearest", **kwargs)


def paper_image(measure, row_values, col_values, row_name: str, col_name: str, path,
                log_rows: bool = True, log_cols: bool = True, title: str | None = None) -> Path:
    """
    The paper-style picture of a [H, W] convergence measure: measure < 0 (trained) blue,
    measure > 0 (not trained) red, NaN grey. Saturation is the rank of -|measure| within
    each phase: small |measure| is far from the boundary and gets the strongest colour.
    """
    m = np.asarray(measure, dtype=np.float64)
    assert m.ndim == 2, f"measure must be 2-D, got shape {m.shape}"
    assert len(row_values) == m.shape[0] and len(col_values) == m.shape[1], \
        f"axis values ({len(row_values)}, {len(col_values)}) do not match measure shape {m.shape}"
    missing = np.isnan(m)
    rgb = _phase_rgb(m < 0, -np.abs(m), missing)
    fig, ax = plt.subplots(figsize=(6, 5))
    _show(ax, rgb)
    _label_axes(ax, row_values, col_values, row_name, col_name, log_rows, log_cols)
    ax.set_title(title if title is not None else "blue: trains, red: diverges")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return path


def _grid(cells: pd.DataFrame, column: str, H: int, W: int, fill) -> np.ndarray:
    """One DataFrame column laid out as an [H, W] grid; cells absent from the frame get fill."""
    out = np.full((H, W), fill, dtype=object)
    out[cells["row"].to_numpy(int), cells["col"].to_numpy(int)] = cells[column].to_numpy()
    return out


def panels(cells: pd.DataFrame, row_name: str, col_name: str, path,
           log_rows: bool = True, log_cols: bool = True) -> Path:
    """
    Four panels in one PNG: trainability shaded by final-loss rank, stability, final loss
    (log colour scale), binary trainability. One DataFrame row per cell, with columns
    row, col, stable, converged, final_loss, plus the axis values under row_name and col_name.
    Cells absent from the frame are grey.
    """
    H, W = int(cells["row"].max()) + 1, int(cells["col"].max()) + 1
    present = _grid(cells, "row", H, W, -1).astype(int) >= 0
    missing = ~present
    stable = _grid(cells, "stable", H, W, False).astype(bool) & present
    converged = _grid(cells, "converged", H, W, False).astype(bool) & present
    final_loss = _grid(cells, "final_loss", H, W, np.nan).astype(np.float64)
    # axis values per index; an index with no cell at all labels as nan
    row_values = cells.groupby("row")[row_name].first().reindex(range(H)).to_numpy(np.float64)
    col_values = cells.groupby("col")[col_name].first().reindex(range(W)).to_numpy(np.float64)

    fig, axes = plt.subplots(2, 2, figsize=(11, 9))
    # (1) trained cells deeper with lower loss, untrained ones deeper with higher (or non-finite) loss
    loss_or_inf = np.where(np.isfinite(final_loss), final_loss, np.inf)
    depth = np.where(converged, -loss_or_inf, loss_or_inf)
    _show(axes[0, 0], _phase_rgb(converged, depth, missing))
    axes[0, 0].set_title("trainability (shade: final-loss rank)")
    # (2) stability: no non-finite loss during the run
    _show(axes[0, 1], _phase_rgb(stable, np.zeros((H, W)), missing))
    axes[0, 1].set_title("stable (blue) / diverged (red)")
    # (3) final loss on a log scale, non-finite and missing grey
    ok = np.isfinite(final_loss) & (final_loss > 0)
    norm = LogNorm(final_loss[ok].min(), final_loss[ok].max()) if ok.any() else Normalize(0, 1)
    cmap = plt.get_cmap("viridis").with_extremes(bad=GREY)
    im = _show(axes[1, 0], np.ma.masked_where(~ok, final_loss), cmap=cmap, norm=norm)
    fig.colorbar(im, ax=axes[1, 0], label="final loss")
    axes[1, 0].set_title("final loss")
    # (4) binary trainability
    _show(axes[1, 1], _phase_rgb(converged, np.zeros((H, W)), missing))
    axes[1, 1].set_title("converged (blue) / not (red)")
    for ax in axes.flat:
        _label_axes(ax, row_values, col_values, row_name, col_name, log_rows, log_cols)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path
