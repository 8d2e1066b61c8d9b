"""PROJECTION, not a measurement: one grid step of d4/d8/d12/d20 rows on a datasheet H100 (or H200), made on a machine
without a GPU (fractal_vmap/projection.py: FakeTensorMode + torch's RuntimeEstimator roofline pinned to the datasheet
device + a host cost per kernel launch), against the sequential loop of the same lanes as single `finetune` steps;
with the lanes per chunk and the levers that the memory plan (plan.py) picks for the GPU's memory, the projected
speed-up, MFU, and the time of the seed project's 64x64 d20 grid (250K supervised tokens a cell) on one 8-GPU node.

    uv run python benchmarks/projection.py                      # d4 d8 d12 d20 on an H100, several minutes on 2 cores
    uv run python benchmarks/projection.py --gpu h200 --depths 20
"""

import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from simple_parsing import ArgumentParser

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS_DIR, environment, write_json  # noqa: E402

from fractal_vmap.lanes import Levers  # noqa: E402
from fractal_vmap.plan import GRID_CELLS, GRID_TOKENS, TARGETS, nanochat_depth, plan_levers  # noqa: E402
from fractal_vmap.projection import GPUS, LAUNCH_US, grid_seconds, project_runtime  # noqa: E402


@dataclass
class Options:
    gpu: str = "h100"
    depths: list[int] = field(default_factory=lambda: [4, 8, 12, 20])
    lanes: int = 16  # lanes wanted per chunk (fewer where fewer fit)
    batch: int = 8
    seq: int = 1024
    launch_us: float = LAUNCH_US
    supervised_frac: float = 0.7  # supervised share of a batch's tokens (benchmarks/lanes_step.py's random batches: ~70%)
    momentum_dtype: str = "float32"
    master_dtype: str = "float32"
    out: str = ""  # default: benchmarks/results/projection-<gpu>.json


def main() -> None:
    parser = ArgumentParser()
    parser.add_arguments(Options, dest="opts")
    opts = parser.parse_args().opts
    console, gpu = Console(), GPUS[opts.gpu]
    base = Levers(momentum_dtype=opts.momentum_dtype, master_dtype=opts.master_dtype)
    table = Table(title=f"PROJECTION (not measured): one step on {gpu.name}, batch {opts.batch} x {opts.seq}, bf16 autocast, "
                        f"roofline + {opts.launch_us:g} us per launch")
    for name in ("model", "lanes", "levers", "row ms", "L x finetune ms", "speed-up", "target", "MFU", "target"):
        table.add_column(name, justify="right")
    rows = []
    for depth in opts.depths:
        config = nanochat_depth(depth)
        memory = plan_levers(config, opts.lanes, int(gpu.memory_gb * 1e9), opts.batch, opts.seq, "bfloat16", base=base)
        fit = memory.lanes_that_fit(int(gpu.memory_gb * 1e9))
        lanes = min(opts.lanes, fit)
        levers = Levers(**memory.levers)
        p = project_runtime(config, lanes, opts.gpu, opts.batch, opts.seq, levers, launch_us=opts.launch_us)
        row = {"depth": depth, "lanes": lanes, "levers": memory.levers, **asdict(p), "speedup": p.speedup, "mfu": p.mfu(gpu)}
        speed_target = TARGETS["speedup_small"] if depth <= 8 else TARGETS["speedup_d20"] if depth == 20 else None
        if depth == 20:
            steps = math.ceil(GRID_TOKENS / (opts.batch * opts.seq * opts.supervised_frac))
            row["grid"] = {"cells": GRID_CELLS, "steps_per_cell": steps, "gpus": 8, "supervised_frac": opts.supervised_frac,
                           "minutes": grid_seconds(p, steps, GRID_CELLS) / 60}
        rows.append(row)
        names = [k for k in ("step_in_backward", "remat") if memory.levers[k]] + [f"{k}={v}" for k, v in memory.levers.items()
                                                                                 if k.endswith("dtype") and v != "float32"]
        table.add_row(f"d{depth}", str(lanes), ", ".join(names) or "none", f"{p.row_s * 1e3:.1f}", f"{lanes * p.single_s * 1e3:.1f}",
                      f"{p.speedup:.2f}x", f">= {speed_target:g}x" if speed_target else "", f"{p.mfu(gpu):.1%}",
                      f">= {TARGETS['mfu']:.0%}" if depth >= 12 else "")
    console.print(table)
    for row in rows:
        top = ", ".join(f"{name} {t * 1e3:.0f} ms" for name, t in list(row["row_by_op"].items())[:6])
        console.print(f"d{row['depth']} row, GPU time by op: {top}")
    for row in rows:
        if "grid" in row:
            g = row["grid"]
            console.print(f"PROJECTED: the 64x64 d20 grid ({g['steps_per_cell']} steps a cell at {g['supervised_frac']:.0%} supervised tokens) on 8 "
                          f"GPUs, {row['lanes']} lanes a chunk: {g['minutes']:.1f} min (target: under {TARGETS['grid_minutes']:g} min)")
    results = {"projection": True, "gpu": asdict(gpu), "options": asdict(opts), "rows": rows, "environment": environment(torch.device("cpu"))}
    path = write_json(results, Path(opts.out) if opts.out else RESULTS_DIR / f"projection-{opts.gpu}.json")
    console.print(f"results: {path}")


if __name__ == "__main__":
    main()
