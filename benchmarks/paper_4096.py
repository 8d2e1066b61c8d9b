"""The paper's own resolution on a CPU (issue 17 item 4): the calibrated boundary dimension
(analysis/dimension.calibrated_dimension) of finished paper-mlp grids, e.g. the 4097^2 map of
`fractal-vmap grid --task paper-mlp --rows 257 --cols 257 --refine 4` and a chain of `fractal-vmap zoom`s inside it,
beside the paper's reported range (Sohl-Dickstein 2024: 1.17-1.98 for MLPs at 4096^2). The grids themselves are
trained by the commands (timed with /usr/bin/time -v: benchmarks/README.md "paper_4096"); this reads their run dirs.

    uv run python benchmarks/paper_4096.py RUN [RUN ...] [--out benchmarks/results/paper_4096-cpu.json]
"""

import argparse
import json
import time
from pathlib import Path

from rich.table import Table

from fractal_vmap.analysis.dimension import calibrated_dimension
from fractal_vmap.analysis.runs import read_maps
from fractal_vmap.console import console
from fractal_vmap.files import strict_json, write_atomic

PAPER_RANGE = (1.17, 1.98)  # Sohl-Dickstein 2024, the MLP experiments' dimensions at 4096^2


def measure_run(run_dir: Path) -> dict:
    """One run's calibrated dimension, with its shape, trained cells and the box it zoomed into (if a zoom)."""
    grid = json.loads((run_dir / "grid.json").read_text())
    axes = grid["spec"]["axes"]
    H, W = len(axes["rows"]["values"]), len(axes["cols"]["values"])
    maps = read_maps(run_dir, ["measure", "trained"], H, W)
    t0 = time.perf_counter()
    d = calibrated_dimension(maps["measure"])
    trained = int(maps["trained"].sum()) if "trained" in maps else H * W
    return {
        "run": str(run_dir),
        "shape": [H, W],
        "rows": [axes["rows"]["values"][0], axes["rows"]["values"][-1]],
        "cols": [axes["cols"]["values"][0], axes["cols"]["values"][-1]],
        "trained_cells": trained,
        "parent": grid["spec"].get("parent"),
        "seconds": time.perf_counter() - t0,
        **d,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="finished paper-mlp run dirs, the full view first, then its zooms")
    parser.add_argument("--out", default="benchmarks/results/paper_4096-cpu.json")
    args = parser.parse_args()
    results = [measure_run(Path(run)) for run in args.runs]
    table = Table(title=f"calibrated boundary dimension (the paper: {PAPER_RANGE[0]}-{PAPER_RANGE[1]})")
    for column in ("run", "cells", "edge px", "raw D", "interval", "smooth null", "corrected D", "verdict"):
        table.add_column(column)
    for r in results:
        corrected = r["corrected"] or {}
        interval = corrected.get("interval")
        table.add_row(
            Path(r["run"]).name,
            f"{r['shape'][0]} x {r['shape'][1]}",
            str(r["edge_pixel_count"]),
            f"{r['dimension']:.3f}",
            "-" if r["interval"] is None else f"{r['interval'][0]:.3f}-{r['interval'][1]:.3f}",
            "-" if r["null"] is None else f"{r['null']['range'][0]:.3f}-{r['null']['range'][1]:.3f}",
            "-"
            if corrected.get("dimension") is None
            else f"{corrected['dimension']:.3f}"
            + ("" if not interval or None in interval else f" ({interval[0]:.2f}-{interval[1]:.2f})"),
            r["verdict"],
        )
    console.print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, strict_json({"paper_range": PAPER_RANGE, "runs": results}))
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
