"""The GPU projection as a table: for each nanochat depth, the lanes and levers the planner picks for the GPU's memory
(perf/choose.py: the fastest configuration that fits, by projected lane-steps/s), one row step against the sequential
loop projected on the datasheet GPU (roofline.py: the CUDA path, matmuls by device.py's model), the speed-up, the MFU,
the ops that dominate and, for d20, the seed's workload (the 64x64 grid of 250K tokens a cell on one 8-GPU node) both
ways (workload.py); next to the targets of benchmarks/README.md. `fractal-vmap bench --project h100` prints it,
`benchmarks/projection.py` also writes it as JSON. Every line says it is a projection."""

import math
from dataclasses import asdict

from rich.table import Table

from fractal_vmap.model import nanochat_depth
from fractal_vmap.perf.choose import weigh
from fractal_vmap.perf.plan import GRID_CELLS, GRID_TOKENS, TARGETS
from fractal_vmap.perf.roofline import GPUS, LAUNCH_US, grid_seconds
from fractal_vmap.perf.workload import workload
from fractal_vmap.tasks.nanochat.levers import Levers


def projection_rows(
    gpu: str = "h100",
    depths: list[int] = (4, 8, 12, 20),
    lanes: int = 16,
    batch: int = 8,
    seq: int = 1024,
    launch_us: float = LAUNCH_US,
    supervised_frac: float = 0.7,
    base: Levers = Levers(),
) -> list[dict]:
    """One row a depth: lanes (as many of `lanes` as fit), levers, the Projection's fields, speed-up, MFU; d20 also the
    projected 64x64 grid (`supervised_frac` of a batch's tokens supervised: ~70% for random batches)."""
    device, rows = GPUS[gpu], []
    memory_bytes = int(device.memory_gb * 1e9)
    for depth in depths:
        config = nanochat_depth(depth)
        best, weighed = weigh(config, lanes, memory_bytes, gpu, batch, seq, "bfloat16", base=base, launch_us=launch_us)
        p = best.projection
        if p is None:  # not even the smallest chunk fits: nothing to project
            rows.append({"depth": depth, "lanes": 0, "levers": asdict(best.levers), "weighed": []})
            continue
        row = {
            "depth": depth,
            "lanes": best.lanes,
            "levers": asdict(best.levers),
            **asdict(p),
            "speedup": p.speedup,
            "mfu": p.mfu(device),
            "weighed": [c.summary() for c in weighed],
        }
        if depth == 20:
            steps = math.ceil(GRID_TOKENS / (batch * seq * supervised_frac))
            row["grid"] = {
                "cells": GRID_CELLS,
                "steps_per_cell": steps,
                "gpus": 8,
                "supervised_frac": supervised_frac,
                "minutes": grid_seconds(p, steps, GRID_CELLS) / 60,
            }
            row["workload"] = workload(p.single_s, p.row_s, best.lanes, steps, GRID_CELLS)
        rows.append(row)
    return rows


ASSUMPTIONS = (
    "assumptions: datasheet peaks; matmuls by wave and tile quantization over 132 SMs at cuBLAS tile sizes, 80% "
    "sustained (perf/device.py); flash attention at 35% of peak; other ops at the roofline of their bytes; eager ops "
    "(the compiled step's fusions not projected); the Triton kernels at the bytes kernels/costs.py counts"
)


def print_projection(rows: list[dict], gpu: str, batch: int, seq: int, launch_us: float, console) -> None:
    """The rows as a rich table, the ops that dominate each row, the seed workload both ways; labelled PROJECTION."""
    table = Table(
        title=f"PROJECTION (not measured): one step on {GPUS[gpu].name}, batch {batch} x {seq}, bf16 autocast, "
        f"the CUDA path, + {launch_us:g} us per launch"
    )
    for name in ("model", "lanes", "levers", "row ms", "L x finetune ms", "per lane-step", "target", "MFU", "target"):
        table.add_column(name, justify="right")
    for row in rows:
        depth, levers = row["depth"], row["levers"]
        if not row["lanes"]:
            table.add_row(f"d{depth}", "0", "does not fit", *[""] * 6)
            continue
        speed_target = TARGETS["speedup_small"] if depth <= 8 else TARGETS["speedup_d20"] if depth == 20 else None
        names = [k for k in ("step_in_backward", "remat") if levers[k]] + [
            f"{k}={v}" for k, v in levers.items() if k.endswith("dtype") and v != "float32"
        ]
        table.add_row(
            f"d{depth}",
            str(row["lanes"]),
            ", ".join(names) or "none",
            f"{row['row_s'] * 1e3:.1f}",
            f"{row['lanes'] * row['single_s'] * 1e3:.1f}",
            f"{row['speedup']:.2f}x",
            f">= {speed_target:g}x" if speed_target else "",
            f"{row['mfu']:.1%}",
            f">= {TARGETS['mfu']:.0%}" if depth >= 12 else "",
        )
    console.print(table)
    console.print(ASSUMPTIONS)
    for row in (r for r in rows if r["lanes"]):
        weighed = "; ".join(
            f"{', '.join(c['levers']) or 'none'} x{c['lanes']}: "
            + (f"{c['lane_steps_per_s']:.1f} lane-steps/s" if c["lane_steps_per_s"] else c["note"])
            for c in row["weighed"]
        )
        console.print(f"d{row['depth']} configurations weighed (projected): {weighed}")
        total = row["row_gpu_s"]
        top = ", ".join(f"{name} {t / total:.0%}" for name, t in list(row["row_by_op"].items())[:8])
        console.print(f"d{row['depth']} row, the ops that dominate its projected GPU time: {top}")
    for row in rows:
        if "grid" in row:
            g, w = row["grid"], row["workload"]
            console.print(
                f"PROJECTED: the 64x64 d20 grid ({g['steps_per_cell']} steps a cell at {g['supervised_frac']:.0%} "
                f"supervised tokens) on 8 GPUs, {row['lanes']} lanes a chunk: {g['minutes']:.1f} min of row steps "
                f"(target: under {TARGETS['grid_minutes']:g} min)"
            )
            d = w["divergence"]
            console.print(
                f"PROJECTED, the seed's workload end to end on 8 GPUs: one process per cell "
                f"{w['seed_s'] / 60:.1f} min ({w['host_per_cell_s']:.1f} s of MEASURED host costs a cell: "
                f"import, checkpoint load, data render, optimizer build; the GPU idle {w['seed_gpu_idle_frac']:.0%} "
                f"of it) against fractal-vmap rows {w['rows_s'] / 60:.1f} min ({w['lanes']} lanes a chunk, "
                f"{d['diverged_frac']:.0%} of lanes diverging early as in a measured grid of {d.get('lanes', 0)} "
                f"lanes): {w['ratio']:.1f}x (target: >= {TARGETS['e2e_ratio']:g}x)"
            )
