"""Adaptive refinement against the full grid: the paper's MLP (tanh, width 8, 100 steps, float64) on the notebook's
default view at (n - 1) x 2^K + 1 cells a side, once as a full grid and once as `grid --refine K` from an n x n coarse
grid. Reports the cells each trained, the cells whose label differs (the islands refinement missed), both
dimensions and wall times (one run each, this machine).

    uv run python benchmarks/paper_refine.py                     # 33 x 33 coarse, K = 3: 257 x 257, a few minutes on 2
    cores uv run python benchmarks/paper_refine.py --coarse 17 --levels 2
"""

import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch
from rich.console import Console
from simple_parsing import ArgumentParser

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS_DIR, environment, write_json  # noqa: E402

from fractal_vmap.grid.pipeline import run_grid  # noqa: E402
from fractal_vmap.options import GridConfig  # noqa: E402


@dataclass
class Options:
    coarse: int = 33  # cells a side of the coarse grid
    levels: int = 3  # K: the fine grid has (coarse - 1) x 2^K + 1 cells a side
    steps: int = 100
    out: str = ""  # default: benchmarks/results/paper_refine-cpu.json


def main() -> None:
    parser = ArgumentParser()
    parser.add_arguments(Options, dest="opts")
    opts = parser.parse_args().opts
    console, fine = Console(), (opts.coarse - 1) * 2**opts.levels + 1
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        full = run_grid(
            GridConfig(task="paper-mlp", rows=fine, cols=fine, num_iterations=opts.steps, run_dir=f"{tmp}/full")
        )
        t_full = time.perf_counter() - t0
        t0 = time.perf_counter()
        refined = run_grid(
            GridConfig(
                task="paper-mlp",
                rows=opts.coarse,
                cols=opts.coarse,
                refine=opts.levels,
                num_iterations=opts.steps,
                run_dir=f"{tmp}/refined",
            )
        )
        t_refined = time.perf_counter() - t0
        a = pd.read_parquet(full / "cells.parquet").sort_values(["row", "col"]).reset_index(drop=True)
        b = pd.read_parquet(refined / "cells.parquet").sort_values(["row", "col"]).reset_index(drop=True)
        fa, fb = (json.loads((d / "fractal.json").read_text()) for d in (full, refined))
    assert (a["lr1"].to_numpy() == b["lr1"].to_numpy()).all() and (a["lr0"].to_numpy() == b["lr0"].to_numpy()).all()
    differ = int((a["converged"] != b["converged"]).sum())
    trained = b["trained"].to_numpy()
    same_trained = bool((a["measure"][trained].to_numpy() == b["measure"][trained].to_numpy()).all())
    result = {
        "fine": fine,
        "coarse": opts.coarse,
        "levels": opts.levels,
        "steps": opts.steps,
        "cells": fine * fine,
        "trained": int(trained.sum()),
        "trained_fraction": float(trained.mean()),
        "differ": differ,
        "differ_fraction": differ / fine**2,
        "trained_cells_bit_equal": same_trained,
        "seconds": {"full": t_full, "refined": t_refined},
        "trainable_fraction": {"full": fa["trainable_fraction"], "refined": fb["trainable_fraction"]},
        "dimension": {"full": fa["dimension"], "refined": fb["dimension"]},
        "options": asdict(opts),
        "environment": environment(torch.device("cpu")),
    }
    console.print(
        f"{fine} x {fine}: refined trained {result['trained']} of {fine * fine} cells "
        f"({result['trained_fraction']:.1%}); "
        f"{differ} cells ({result['differ_fraction']:.2%}) differ from the full grid; trained cells bit-equal: "
        f"{same_trained}; "
        f"wall {t_full:.1f} s full vs {t_refined:.1f} s refined; dimension {fa['dimension']:.3f} vs "
        f"{fb['dimension']:.3f}; "
        f"trainable {fa['trainable_fraction']:.3f} vs {fb['trainable_fraction']:.3f}"
    )
    path = write_json(result, Path(opts.out) if opts.out else RESULTS_DIR / "paper_refine-cpu.json")
    console.print(f"results: {path}")


if __name__ == "__main__":
    main()
