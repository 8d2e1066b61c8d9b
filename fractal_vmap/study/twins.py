"""The noise floor of a map from its twins (grid/twin.py: the map retrained on its boundary neighbourhood with base
weights nudged by 1 ulp, or another data order): the cells that flip (analysis/compare.py), and how many of the map's
boundary pixels are signal, i.e. edge pixels (fractal.edge_pixels) that every twin has too. A boundary pixel that a
1-ulp nudge moves is chaos, not structure; the dimension's interval pools the twins for the same reason."""

from pathlib import Path

import numpy as np

from fractal_vmap.analysis.compare import CompareConfig, compare_runs
from fractal_vmap.analysis.fractal import edge_pixels
from fractal_vmap.analysis.runs import read_grid


def twin_cells_trained(run_dir: Path) -> int:
    """The cells a grid trained (a refined map's or a twin's `trained` column; every cell of a plain grid)."""
    import pandas as pd

    cells = pd.read_parquet(run_dir / "cells.parquet", columns=None)
    return int(cells["trained"].sum()) if "trained" in cells.columns else len(cells)


def signal_edges(measure: np.ndarray, twins: list[np.ndarray]) -> dict:
    """The map's edge pixels, and those every twin shares (signal): a fraction near 1 means the boundary's pixels are
    where the boundary is, whatever the rounding or data order."""
    edges = edge_pixels(measure)
    shared = edges.copy()
    for t in twins:
        shared &= edge_pixels(t)
    total = int(edges.sum())
    return dict(
        edge_pixels=total, signal=int(shared.sum()), signal_fraction=float(shared.sum() / total) if total else None
    )


def noise_floor(map_dir: Path, twin_dirs: dict[str, Path]) -> dict:
    """Per twin: cells compared and trained, cells that flip (on the map's boundary, near it, far), and the map's
    edge pixels that are signal (shared by every twin)."""
    _, _, measure = read_grid(str(map_dir))
    out, twins = {}, []
    for kind, run_dir in twin_dirs.items():
        report = compare_runs(CompareConfig(str(map_dir), str(run_dir)))
        out[kind] = {
            k: report[k]
            for k in (
                "cells",
                "flipped",
                "flipped_fraction",
                "flipped_on_boundary",
                "flipped_near_boundary",
                "flipped_far",
                "dimension_of_flips",
            )
        }
        out[kind]["trained"] = twin_cells_trained(run_dir)
        twins.append(read_grid(str(run_dir))[2])
    return dict(twins=out, **signal_edges(measure, twins))
