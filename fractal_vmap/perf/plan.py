"""`fractal-vmap plan`: how many lanes of a model fit on a GPU, without a GPU (the memory model of
tasks/nanochat/memory.py: the real training step traced under FakeTensorMode with torch's MemTracker), and with
--project h100|h200 how fast they would run (perf/roofline.py: a projection), LoRA lanes too (--lora_rank: with the
shared base's matmuls against the adapters', perf/shared_base.py)."""

import json
import math
import re
from dataclasses import asdict
from pathlib import Path

from fractal_vmap import lora
from fractal_vmap.errors import UserError
from fractal_vmap.model import GPTConfig, nanochat_depth
from fractal_vmap.options import FinetuneConfig, PlanConfig
from fractal_vmap.recipe import trainable_groups
from fractal_vmap.tasks.nanochat.levers import Levers
from fractal_vmap.tasks.nanochat.memory import (
    HEADROOM,
    KIND_NAMES,
    KINDS,
    estimate_memory,
    parse_bytes,
    parse_levers,
    plan_levers,
)


def model_config(model: str) -> GPTConfig:
    """`d<N>` (nanochat's depth-N config, random weights: only shapes matter here), "default", or a model source."""
    if re.fullmatch(r"d\d+", model):
        if int(model[1:]) < 1:
            raise UserError(f"--model {model}: a depth must be at least 1, e.g. d20")
        return nanochat_depth(int(model[1:]))
    if model == "default":
        from fractal_vmap.default_model import CONFIG

        return CONFIG
    from fractal_vmap.checkpoint import last_step, model_files_dir
    from fractal_vmap.sources import resolve_source

    files = model_files_dir(Path(resolve_source(model)))
    meta = files / f"meta_{last_step(files.parent if files.name == 'checkpoints' else files):06d}.json"
    return GPTConfig.from_dict(json.loads(meta.read_text())["model_config"])


# ----------------------------------------------------------------------------- the `plan` command


def check_plan(cfg: PlanConfig) -> tuple[GPTConfig, int, Levers | None]:
    """Every check before any tracing: one clear line for each bad option."""
    config = model_config(cfg.model)
    memory = parse_bytes(cfg.gpu_mem)
    levers = parse_levers(cfg.levers, cfg.micro_batches, cfg.momentum_dtype, cfg.master_dtype, cfg.dtype)
    if cfg.lanes < 1 or cfg.batch < 1 or cfg.seq < 2:
        raise UserError(
            f"--lanes {cfg.lanes}, --batch {cfg.batch}, --seq {cfg.seq}: lanes and batch must be at least 1, seq at "
            "least 2"
        )
    if cfg.seq > config.sequence_len * 10:
        raise UserError(f"--seq {cfg.seq} exceeds the model's rotary table ({config.sequence_len * 10}): lower it")
    if cfg.batch % cfg.micro_batches:
        raise UserError(f"--batch {cfg.batch} does not split into {cfg.micro_batches} micro-batches: pick a divisor")
    if cfg.dtype not in ("float32", "bfloat16"):
        raise UserError(f"--dtype {cfg.dtype!r} is not one of float32, bfloat16")
    if cfg.project not in ("none", "h100", "h200"):
        raise UserError(f"--project {cfg.project!r} is not one of none, h100, h200")
    if not 0 < cfg.supervised_frac <= 1 or cfg.launch_us < 0:
        raise UserError("--supervised_frac must be in (0, 1] and --launch_us at least 0")
    trainable_groups(FinetuneConfig(trainable_param_groups=cfg.trainable_param_groups))
    lora.check(cfg.lora_rank, 16.0, cfg.lora_targets)  # alpha changes no byte
    return config, memory, levers


GRID_CELLS, GRID_TOKENS = 64 * 64, 250_000  # the reference d20 workload: 64 x 64 cells of 250K supervised tokens
TARGETS = {
    "speedup_small": 2.0,  # d4-d8 row against a loop of single models, in process
    "speedup_d20": 0.95,  # d20 row per lane-step against the single model's
    "mfu": 0.45,
    "grid_minutes": 20.0,  # the 64x64 d20 grid on one 8-GPU node
    "e2e_ratio": 10.0,  # ... against the one-process-per-cell way
}  # benchmarks/README.md "Targets"


def run_plan(cfg: PlanConfig) -> dict:
    """The `plan` command's numbers: the memory model, the lanes that fit, and (--project) the runtime projection."""
    config, memory, levers = check_plan(cfg)
    groups, lora_kw = cfg.trainable_param_groups, dict(lora_rank=cfg.lora_rank, lora_targets=cfg.lora_targets)
    base = Levers(micro_batches=cfg.micro_batches, momentum_dtype=cfg.momentum_dtype, master_dtype=cfg.master_dtype)
    weighed, projection = None, None
    # memory on the path CUDA runs: the Triton optimizer steps and lanes' head (kernels/ops.py), traced as fakes
    if levers is None and cfg.project != "none":  # the fastest configuration that fits, by projection (choose.py)
        from fractal_vmap.perf.choose import weigh

        best, weighed = weigh(
            config,
            cfg.lanes,
            memory,
            cfg.project,
            cfg.batch,
            cfg.seq,
            cfg.dtype,
            groups,
            base,
            cfg.launch_us,
            **lora_kw,
        )
        plan, projection = best.memory, best.projection
    elif levers is None:
        plan = plan_levers(config, cfg.lanes, memory, cfg.batch, cfg.seq, cfg.dtype, groups, base, "triton", **lora_kw)
    else:
        plan = estimate_memory(config, cfg.batch, cfg.seq, cfg.dtype, groups, levers, "triton", **lora_kw)
    sizes = {cfg.gpu_mem: memory, "80GB": 80 * 10**9, "141GB": 141 * 10**9}
    out = {
        "model": cfg.model,
        "lora_rank": cfg.lora_rank,
        "lanes": cfg.lanes,
        "batch": cfg.batch,
        "seq": cfg.seq,
        "headroom": HEADROOM,
        "kernels": "triton",
        "memory": asdict(plan),
        "lane_bytes": plan.lane_bytes,
        "peak_bytes": plan.peak(cfg.lanes),
        "lanes_that_fit": {name: plan.lanes_that_fit(size) for name, size in sizes.items()},
    }
    if cfg.project != "none":
        from fractal_vmap.perf.roofline import GPUS, grid_seconds, project_runtime

        gpu = GPUS[cfg.project]
        fit = min(cfg.lanes, plan.lanes_that_fit(memory))
        lanes = fit or cfg.lanes  # the lanes that fit; if none, the lanes asked (they would not fit)
        if projection is None:
            projection = project_runtime(
                config, lanes, cfg.project, cfg.batch, cfg.seq, Levers(**plan.levers), groups, cfg.launch_us, **lora_kw
            )
        steps = math.ceil(GRID_TOKENS / (cfg.batch * cfg.seq * cfg.supervised_frac))
        out["projection"] = {
            **asdict(projection),
            "fits": fit >= lanes,
            "speedup": projection.speedup,
            "lane_steps_per_s": projection.lanes / projection.row_s,
            "single_steps_per_s": 1 / projection.single_s,
            "mfu": projection.mfu(gpu),
            "grid": {
                "cells": GRID_CELLS,
                "tokens_per_cell": GRID_TOKENS,
                "steps_per_cell": steps,
                "gpus": 8,
                "supervised_frac": cfg.supervised_frac,
                "seconds": grid_seconds(projection, steps, GRID_CELLS),
            },
        }
        if weighed is not None:
            out["weighed"] = [c.summary() for c in weighed]
            out["chosen"] = next(i for i, c in enumerate(weighed) if c.memory is plan)
    if cfg.json:
        from fractal_vmap.files import write_atomic

        write_atomic(Path(cfg.json), json.dumps(out, indent=2))
    return out


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def print_plan(out: dict, console) -> None:
    """The plan as rich tables: bytes per lane by kind, the lanes that fit; the projection, labelled as one."""
    from rich.table import Table

    memory = out["memory"]
    levers = ", ".join(f"{k}={v}" for k, v in memory["levers"].items())
    what = f"LoRA lanes of rank {out['lora_rank']}" if out.get("lora_rank") else "one training step"
    table = Table(title=f"{out['model']}: memory of {what} (FakeTensorMode + MemTracker estimate), levers: {levers}")
    table.add_column("per lane")
    table.add_column("GiB", justify="right")
    for kind in KINDS:
        table.add_row(KIND_NAMES[kind], gib(memory["per_lane"][kind]))
    table.add_row("[bold]one lane[/bold]", f"[bold]{gib(out['lane_bytes'])}[/bold]")
    table.add_row("fixed (base model and frozen embedding, shared; the head's buffers, ...)", gib(memory["fixed"]))
    table.add_row(f"peak of {out['lanes']} lanes", gib(out["peak_bytes"]))
    console.print(table)
    fits = ", ".join(f"{n} on {size}" for size, n in out["lanes_that_fit"].items())
    console.print(f"lanes per chunk (peak within {out['headroom']:.0%} of the memory): {fits}")
    if "weighed" in out:
        print_weighed(out, console)
    if "projection" in out:
        p = out["projection"]
        table = Table(
            title=f"PROJECTION (not a measurement): one step on {p['gpu']}, roofline + {p['launch_us']:g} us per launch"
        )
        for name in ("", "step ms", "GPU-only ms", "launches", "speed-up", "MFU"):
            table.add_column(name, justify="right")
        table.add_row(
            f"row of {p['lanes']} lanes",
            f"{p['row_s'] * 1e3:.1f}",
            f"{p['row_gpu_s'] * 1e3:.1f}",
            str(p["row_launches"]),
            f"{p['speedup']:.2f}x",
            f"{p['mfu']:.1%}",
        )
        loop = f"finetune --lora_rank {out['lora_rank']}" if out.get("lora_rank") else "finetune"
        table.add_row(
            f"{p['lanes']} x one model ({loop})",
            f"{p['lanes'] * p['single_s'] * 1e3:.1f}",
            f"{p['lanes'] * p['single_gpu_s'] * 1e3:.1f}",
            str(p["lanes"] * p["single_launches"]),
            "1x",
            "",
        )
        console.print(table)
        console.print(
            f"projected lane-steps/s: {p['lane_steps_per_s']:.2f} in the row, {p['single_steps_per_s']:.2f} one run at "
            "a time"
        )
        if p.get("shared_base"):
            from fractal_vmap.perf.shared_base import print_shared_base

            print_shared_base(p["shared_base"], p["lanes"], out["batch"], out["seq"], console)
        g = p["grid"]
        console.print(
            f"projected: a {int(math.sqrt(g['cells']))}x{int(math.sqrt(g['cells']))} grid of {g['tokens_per_cell']:,} "
            "supervised tokens a cell "
            f"({g['steps_per_cell']} steps at {g['supervised_frac']:.0%} supervised) on {g['gpus']} GPUs: "
            f"{g['seconds'] / 60:.1f} min"
            + ("" if p["fits"] else f" [yellow](but {p['lanes']} lanes do not fit)[/yellow]")
        )
        console.print(
            f"targets (benchmarks/README.md): speed-up >= {TARGETS['speedup_small']:g}x for d4-d8, >= "
            f"{TARGETS['speedup_d20']:g}x per lane-step for d20; MFU >= {TARGETS['mfu']:.0%} for d12+; the 64x64 d20 "
            f"grid under {TARGETS['grid_minutes']:g} min and >= {TARGETS['e2e_ratio']:g}x the one-process-per-cell way"
        )


def print_weighed(out: dict, console) -> None:
    """The configurations the planner weighed (choose.py), the chosen one marked: a projection, labelled so."""
    from rich.table import Table

    table = Table(title="configurations weighed on --gpu_mem (PROJECTED lane-steps/s; the fastest that fits is chosen)")
    for name in ("", "levers", "lanes", "peak GiB", "row step ms", "lane-steps/s", "note"):
        table.add_column(name, justify="right")
    for i, c in enumerate(out["weighed"]):
        table.add_row(
            "[bold]chosen[/bold]" if i == out["chosen"] else "",
            ", ".join(c["levers"]) or "none",
            str(c["lanes"]),
            gib(c["peak_bytes"]) if c["peak_bytes"] else "",
            f"{c['row_s'] * 1e3:.1f}" if c["row_s"] else "",
            f"{c['lane_steps_per_s']:.2f}" if c["lane_steps_per_s"] else "",
            c["note"],
        )
    console.print(table)
