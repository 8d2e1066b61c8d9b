"""
Pictures of a trainability grid: the paper-style image (blue trained, red not, shaded by how deep in its phase a
cell is) and a 2x2 panel of labels. Cells are drawn over the axis values themselves (row 0 at the bottom), so a log
axis is ticked in values (10^-2, 10^-1, ...); every shading has a colour bar or a legend, and grey is always named.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.colors import ListedColormap, LogNorm, Normalize
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter

GREY = (0.5, 0.5, 0.5)  # cells with no value
BLUE, RED = (0.0, 0.0, 1.0), (1.0, 0.0, 0.0)  # the two phases at full depth
PALEST = 0.3  # the palest cell of a phase still gets 30% colour: clearly blue or red, never white
CAPTION_SIZE = 7  # points
MAX_SHOWN_LOSS = 1e30  # the final-loss panel's colour scale ends here (larger losses get its top colour)
PAPER_INCHES, PANELS_INCHES = (7, 5), (13, 9)  # figure sizes of trainability.png and panels.png
MESH_CELLS = 1 << 20  # above this many cells a picture draws its map as an image (_mesh)
MAX_PIXELS = 2**28  # the largest canvas drawn: 1 GiB of RGBA (at --dpi 100000 matplotlib ran out of memory mid-draw)


def max_dpi() -> int:
    """The highest dpi at which the larger picture (panels.png) stays within MAX_PIXELS."""
    return int((MAX_PIXELS / (PANELS_INCHES[0] * PANELS_INCHES[1])) ** 0.5)


def _rank_fraction(x: np.ndarray) -> np.ndarray:
    """Rank of each entry / count, in (0, 1]; tied entries share the highest rank of their group."""
    return np.searchsorted(np.sort(x), x, side="right") / max(len(x), 1)


def phase_shade(trained: np.ndarray, depth: np.ndarray, missing: np.ndarray) -> np.ma.MaskedArray:
    """One number a cell in [-1, 1]: + for trained, - for not, its size PALEST..1 the rank of `depth` within its phase
    (the deepest cell of a phase is 1). Missing cells are masked (drawn grey)."""
    shade = np.zeros(trained.shape)
    for phase, sign in ((True, 1.0), (False, -1.0)):
        sel = (trained == phase) & ~missing
        shade[sel] = sign * (PALEST + (1 - PALEST) * _rank_fraction(depth[sel]))
    return np.ma.masked_where(missing, shade)


def _phase_cmap() -> ListedColormap:
    """[-1, 1] -> deep red .. pale red | white | pale blue .. deep blue (the gap is where no cell's shade falls)."""
    s = np.linspace(-1, 1, 257)
    sat = np.where(np.abs(s) >= PALEST, np.abs(s), 0.0)[:, None]
    colour = np.where(s[:, None] > 0, np.array(BLUE), np.array(RED))
    return ListedColormap((1 - sat) * 1.0 + sat * colour).with_extremes(bad=GREY)


PHASE_CMAP = _phase_cmap()
BINARY_CMAP = ListedColormap([RED, BLUE]).with_extremes(bad=GREY)


def _edges(values, log: bool) -> np.ndarray | None:
    """Cell edges around the axis values (midpoints, in log space on a log axis), or None when the values do not
    increase strictly (e.g. an integer axis rounded onto itself): then cells are drawn by index."""
    v = np.asarray(values, dtype=np.float64)
    if log and not (v > 0).all():
        return None
    t = np.log10(v) if log else v
    if len(t) == 1:
        e = t[0] + np.array([-0.5, 0.5])  # one value: a cell half a decade (log) or half a unit (linear) each side
    elif (np.diff(t) > 0).all():
        mid = (t[1:] + t[:-1]) / 2
        e = np.concatenate([[2 * t[0] - mid[0]], mid, [2 * t[-1] - mid[-1]]])
    else:
        return None
    return 10**e if log else e


def _uniform(edges, log: bool) -> tuple[float, float] | None:
    """The first and last edge (in log10 on a log axis) when the cells are equally wide there, else None."""
    if edges is None:
        return None
    t = np.log10(edges) if log else np.asarray(edges)
    widths = np.diff(t)
    return (float(t[0]), float(t[-1])) if np.allclose(widths, widths[0], rtol=1e-6, atol=0) else None


def _mesh(ax, row_values, col_values, row_name: str, col_name: str, log_rows: bool, log_cols: bool, shade, **kwargs):
    """pcolormesh of an [H, W] grid over the axis values, labelled; returns the mesh (for a colour bar). A map of more
    than MESH_CELLS cells on equally wide cells is drawn as an image over the same extent (a log axis in log10 units,
    ticked 10^k), since a mesh of 16.8M quads takes 30 s and 2 GB a panel."""
    x, y = _edges(col_values, log_cols), _edges(row_values, log_rows)
    ux, uy = _uniform(x, log_cols), _uniform(y, log_rows)
    if np.size(shade) > MESH_CELLS and ux is not None and uy is not None:
        mesh = ax.imshow(shade, origin="lower", extent=(*ux, *uy), aspect="auto", interpolation="antialiased", **kwargs)
        for log, axis in ((log_cols, ax.xaxis), (log_rows, ax.yaxis)):
            if log:
                axis.set_major_formatter(FuncFormatter(lambda v, _: f"$10^{{{v:g}}}$"))
        ax.set_xlabel(col_name)
        ax.set_ylabel(row_name)
        return mesh
    mesh = ax.pcolormesh(
        np.arange(len(col_values) + 1) - 0.5 if x is None else x,
        np.arange(len(row_values) + 1) - 0.5 if y is None else y,
        shade,
        **kwargs,
    )
    for edges, values, log, set_scale, axis in (
        (x, col_values, log_cols, ax.set_xscale, ax.xaxis),
        (y, row_values, log_rows, ax.set_yscale, ax.yaxis),
    ):
        if edges is not None and log:
            set_scale("log")
        elif edges is None:  # by index: label a few cells with their values
            idx = np.unique(np.linspace(0, len(values) - 1, min(6, len(values))).round().astype(int))
            axis.set_ticks(idx, [f"{values[i]:.3g}" for i in idx])
    ax.set_xlabel(col_name)
    ax.set_ylabel(row_name)
    return mesh


def _phase_colorbar(fig, ax, mesh, per_step: bool = False) -> None:
    bar = fig.colorbar(mesh, ax=ax, ticks=[-1, -PALEST, PALEST, 1])
    bar.ax.set_yticklabels(["fails hardest", "barely fails", "barely trains", "trains fastest"])
    what = "the convergence measure per step (cells differ in steps)" if per_step else "the convergence measure"
    bar.set_label(f"shade: rank of {what} in its phase", fontsize=7)


def _grey_note(fig, shade: np.ma.MaskedArray, label: str) -> None:
    """Name the grey cells, where there are any (below the figure, right)."""
    if np.ma.getmaskarray(shade).any():
        fig.legend(
            handles=[Patch(color=GREY, label=label)],
            loc="upper right",
            bbox_to_anchor=(1.0, 0.0),
            fontsize=CAPTION_SIZE,
            frameon=False,
        )


def _caption(fig, caption: str | None) -> None:
    if caption:
        fig.text(
            0.0, 0.0, caption, ha="left", va="top", fontsize=CAPTION_SIZE, family="monospace", transform=fig.transFigure
        )


def _save(fig, path) -> Path:
    """Saved at the figure's dpi; trimmed to its artists unless a layout engine placed them (a constrained figure
    fits its canvas already, and trimming it would draw it, and lay it out, twice: half of a grid's picture time)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=fig.dpi, bbox_inches=None if fig.get_layout_engine() else "tight")
    plt.close(fig)
    return path


def varies(steps) -> bool:
    """Whether the cells' step counts differ (then the measure, a sum over steps, is shaded per step)."""
    if steps is None:
        return False
    s = np.asarray(steps, dtype=np.float64)
    return len(np.unique(s[np.isfinite(s)])) > 1


def measure_shade(measure: np.ndarray, steps: np.ndarray | None = None) -> np.ma.MaskedArray:
    """The paper's shading of a [H, W] convergence measure: trained where measure < 0; small |measure| is deep in its
    phase (fast training, or fast divergence) and gets the strongest colour; NaN masked.
    The measure sums over a run's steps (fractal.convergence_measure), so a cell with more steps would always look
    nearer the boundary: where `steps` (each cell's step count) differ, the depth is |measure| / steps, the mean
    normalised loss of a trained run (the mean inverse of a diverged one). With equal steps nothing changes."""
    m = np.asarray(measure, dtype=np.float64)
    depth = -np.abs(m) / np.asarray(steps, dtype=np.float64) if varies(steps) else -np.abs(m)
    return phase_shade(m < 0, depth, np.isnan(m) | np.isnan(depth))


def measure_rgb(measure, steps=None) -> np.ndarray:
    """paper_image's colours as an RGB array [H, W, 3] in [0, 1], row 0 first (not flipped): for the animation
    frames."""
    return PHASE_CMAP((measure_shade(measure, steps) + 1) / 2)[..., :3]


def paper_image(
    measure,
    row_values,
    col_values,
    row_name: str,
    col_name: str,
    path,
    log_rows: bool = True,
    log_cols: bool = True,
    title: str | None = None,
    caption: str | None = None,
    dpi: int = 150,
    steps=None,
) -> Path:
    """The paper-style picture of a [H, W] convergence measure: blue trained, red not, grey no result. `steps` [H, W]:
    each cell's step count, for the shading (measure_shade)."""
    m = np.asarray(measure, dtype=np.float64)
    assert m.ndim == 2, f"measure must be 2-D, got shape {m.shape}"
    assert len(row_values) == m.shape[0] and len(col_values) == m.shape[1], (
        f"axis values ({len(row_values)}, {len(col_values)}) do not match measure shape {m.shape}"
    )
    fig, ax = plt.subplots(figsize=PAPER_INCHES, dpi=dpi)
    shade = measure_shade(m, steps)
    mesh = _mesh(
        ax,
        row_values,
        col_values,
        row_name,
        col_name,
        log_rows,
        log_cols,
        shade,
        cmap=PHASE_CMAP,
        norm=Normalize(-1, 1),
    )
    _phase_colorbar(fig, ax, mesh, varies(steps))
    _grey_note(fig, shade, "grey: no result (cell not trained yet)")
    ax.set_title(title if title is not None else "blue: trains, red: does not")
    _caption(fig, caption)
    return _save(fig, path)


def full_map(measure: np.ndarray, steps: np.ndarray | None, path) -> Path:
    """map.png: paper_image's colours at one pixel a cell (row 0 at the bottom, no axes): the map at full resolution,
    which the figures (a few inches at --dpi) cannot show once it has more cells than they have pixels."""
    rgb = PHASE_CMAP((measure_shade(measure, steps) + 1) / 2, bytes=True)[::-1, :, :3]  # grey: masked (cmap's bad)
    plt.imsave(path, np.ascontiguousarray(rgb), format="png")
    return Path(path)


def _grid(cells: pd.DataFrame, column: str, H: int, W: int) -> np.ndarray:
    """One DataFrame column laid out as a float [H, W] grid; cells absent from the frame are NaN."""
    out = np.full((H, W), np.nan)
    out[cells["row"].to_numpy(int), cells["col"].to_numpy(int)] = cells[column].to_numpy(
        dtype=np.float64, na_value=np.nan
    )
    return out


def _binary(fig, ax, mesh_args, values: np.ndarray, yes: str, no: str, title: str) -> None:
    _mesh(ax, *mesh_args, np.ma.masked_invalid(values), cmap=BINARY_CMAP, norm=Normalize(0, 1))
    handles = [Patch(color=BLUE, label=yes), Patch(color=RED, label=no)]
    if np.isnan(values).any():
        handles.append(Patch(color=GREY, label="no result"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax.set_title(title)


def panels(
    cells: pd.DataFrame,
    row_name: str,
    col_name: str,
    path,
    log_rows: bool = True,
    log_cols: bool = True,
    caption: str | None = None,
    dpi: int = 150,
    values: tuple | None = None,
) -> Path:
    """
    Four panels in one PNG: trainability shaded exactly as the paper image, stability, final loss (log colour scale),
    and the binary trainable label. One DataFrame row per cell, with columns row, col, stable, converged, final_loss,
    measure, plus the axis values under row_name and col_name (and total_steps, if any: the shading's step counts).
    Cells absent from the frame are grey. `cells` may instead be those columns laid out [H, W] (a dict of arrays,
    NaN where no cell), with `values` the axes' (row values, col values).
    """
    if isinstance(cells, dict):
        maps, (row_values, col_values) = cells, values
    else:
        H, W = int(cells["row"].max()) + 1, int(cells["col"].max()) + 1
        # axis values per index; an index with no cell at all labels as nan (and the axis is drawn by index)
        row_values = cells.groupby("row")[row_name].first().reindex(range(H)).to_numpy(np.float64)
        col_values = cells.groupby("col")[col_name].first().reindex(range(W)).to_numpy(np.float64)
        columns = ("measure", "total_steps", "stable", "converged", "final_loss")
        maps = {c: _grid(cells, c, H, W) for c in columns if c in cells}
    mesh_args = (row_values, col_values, row_name, col_name, log_rows, log_cols)
    final_loss = maps["final_loss"]

    fig, axes = plt.subplots(2, 2, figsize=PANELS_INCHES, dpi=dpi, layout="constrained")  # room for bars, legends
    steps = maps.get("total_steps")
    shade = measure_shade(maps["measure"], steps)
    mesh = _mesh(axes[0, 0], *mesh_args, shade, cmap=PHASE_CMAP, norm=Normalize(-1, 1))
    _phase_colorbar(fig, axes[0, 0], mesh, varies(steps))
    axes[0, 0].set_title("trainable (blue) or not (red), as trainability.png")
    _binary(
        fig,
        axes[0, 1],
        mesh_args,
        maps["stable"],
        "stable: every loss finite",
        "diverged: a loss went NaN/inf",
        "stable or diverged",
    )
    ok = np.isfinite(final_loss) & (final_loss > 0)
    # float64 losses of a diverging run reach ~1e300, where the colour bar's log ticks overflow: losses above 1e30
    # saturate
    norm = (
        LogNorm(min(final_loss[ok].min(), MAX_SHOWN_LOSS), min(final_loss[ok].max(), MAX_SHOWN_LOSS), clip=True)
        if ok.any()
        else Normalize(0, 1)
    )
    mesh = _mesh(
        axes[1, 0],
        *mesh_args,
        np.ma.masked_where(~ok, final_loss),
        cmap=plt.get_cmap("viridis").with_extremes(bad=GREY),
        norm=norm,
    )
    fig.colorbar(mesh, ax=axes[1, 0], label="final loss (log scale)")
    axes[1, 0].set_title("final loss (grey: not finite, or no result)")
    _binary(
        fig,
        axes[1, 1],
        mesh_args,
        maps["converged"],
        "trainable",
        "not trainable",
        "trainable label (last losses / first < threshold)",
    )
    _caption(fig, caption)
    return _save(fig, path)
