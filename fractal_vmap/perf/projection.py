"""The GPU projection as a table: for each nanochat depth, the lanes and levers the memory plan
(tasks/nanochat/memory.py) picks for the GPU's memory, one row step against the sequential loop projected on the
datasheet GPU (roofline.py), the speed-up, the MFU and, for d20, a 64x64 grid of 250K tokens a cell on one 8-GPU node;
next to the targets of benchmarks/README.md. `fractal-vmap bench --project h100` prints it, `benchmarks/projection.py`
also writes it as JSON. Every line says it is a projection."""

import math
from dataclasses import asdict

from rich.table import Table

from fractal_vmap.model import nanochat_depth
from fractal_vmap.perf.plan import GRID_CELLS, GRID_TOKENS, TARGETS
from fractal_vmap.perf.roofline import GPUS, LAUNCH_US, grid_seconds, project_runtime
from fractal_vmap.tasks.nanochat.levers import Levers
from fractal_vmap.tasks.nanochat.memory import plan_levers


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
        memory = plan_levers(config, lanes, memory_bytes, batch, seq, "bfloat16", base=base)
        fit = min(lanes, memory.lanes_that_fit(memory_bytes))
        p = project_runtime(config, fit, gpu, batch, seq, Levers(**memory.levers), launch_us=launch_us)
        row = {
            "depth": depth,
            "lanes": fit,
            "levers": memory.levers,
            **asdict(p),
            "speedup": p.speedup,
            "mfu": p.mfu(device),
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
        rows.append(row)
    return rows


def print_projection(rows: list[dict], gpu: str, batch: int, seq: int, launch_us: float, console) -> None:
    """The rows as a rich table, the row's GPU time by op, and the grid line; all labelled PROJECTION."""
    table = Table(
        title=f"PROJECTION (not measured): one step on {GPUS[gpu].name}, batch {batch} x {seq}, bf16 autocast, "
        f"roofline + {launch_us:g} us per launch"
    )
    for name in ("model", "lanes", "levers", "row ms", "L x finetune ms", "speed-up", "target", "MFU", "target"):
        table.add_column(name, justify="right")
    for row in rows:
        depth, levers = row["depth"], row["levers"]
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
    for row in rows:
        top = ", ".join(f"{name} {t * 1e3:.0f} ms" for name, t in list(row["row_by_op"].items())[:6])
        console.print(f"d{row['depth']} row, projected GPU time by op: {top}")
    for row in rows:
        if "grid" in row:
            g = row["grid"]
            console.print(
                f"PROJECTED: the 64x64 d20 grid ({g['steps_per_cell']} steps a cell at {g['supervised_frac']:.0%} "
                "supervised tokens) on 8 "
                f"GPUs, {row['lanes']} lanes a chunk: {g['minutes']:.1f} min (target: under "
                f"{TARGETS['grid_minutes']:g} min)"
            )
