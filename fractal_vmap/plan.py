"""How many lanes fit, without a GPU: the real training step (`engine.lanes_step` on a `lanes.nanochat_row`) traced
under FakeTensorMode (tensors with shapes and no storage) with torch's own memory tracker, MemTracker, which sees every
allocation and free. So `fractal-vmap plan --model d20 --lanes 16 --gpu_mem 80GB` answers on a laptop.

A step's peak memory is linear in the lanes: every per-lane tensor is stacked [L, ...], and what is not (the frozen
weights, the head's one-lane-at-a-time logits) is a fixed cost. So two traces (2 and 4 lanes) give the fixed bytes and
the bytes per lane, by kind: the lanes' weights, their optimizer state, the activations kept for the backward, what the
head keeps (each lane's lm_head and input gradients), and what the backward and update add at the peak (gradients
and temporaries). tests/test_plan.py checks the estimate against the allocations of real CPU steps.

Not in the trace: the CUDA context and cuBLAS workspaces (a few hundred MB, outside torch's allocator) and the
caching allocator's fragmentation: HEADROOM leaves room for both.
"""

import contextlib
import functools
import json
import math
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from fractal_vmap.engine import MIN_LANES, lanes_step
from fractal_vmap.errors import UserError
from fractal_vmap.head import lanes_head_loss
from fractal_vmap.lanes import Levers, nanochat_row
from fractal_vmap.model import GPTConfig, param_shapes
from fractal_vmap.options import PlanConfig
from fractal_vmap.recipe import FinetuneConfig, trainable_groups

HEADROOM = 0.9  # plan chunks to use at most 90% of the memory: CUDA context, cuBLAS workspaces, fragmentation
TRACE_LANES = (MIN_LANES, 2 * MIN_LANES)  # the two traced widths: the smallest a chunk runs with, and twice that
KINDS = ("params", "optimizer", "activations", "head", "backward")  # per-lane bytes, in the order they are printed
KIND_NAMES = {
    "params": "trained weights (float32)",
    "optimizer": "optimizer state",
    "activations": "activations kept for the backward",
    "head": "head (lm_head and input gradients)",
    "backward": "gradients and temporaries at the peak",
}
# lever settings tried in turn until the lanes fit: the default path first, then the levers that change no number
LEVER_LADDER = (Levers(), Levers(step_in_backward=True), Levers(remat=True), Levers(step_in_backward=True, remat=True))


def nanochat_depth(depth: int) -> GPTConfig:
    """nanochat's model of a given depth: width 64 x depth, heads of 128, vocab 65536, context 2048 (d20: 1280 wide)."""
    width = 64 * depth
    heads = max(1, math.ceil(width / 128))
    return GPTConfig(sequence_len=2048, vocab_size=65536, n_layer=depth, n_head=heads, n_kv_head=heads, n_embd=width)


def model_config(model: str) -> GPTConfig:
    """`d<N>` (nanochat's depth-N config, random weights: only shapes matter here), "default", or a model source."""
    if re.fullmatch(r"d\d+", model):
        if int(model[1:]) < 1:
            raise UserError(f"--model {model}: a depth must be at least 1, e.g. d20")
        return nanochat_depth(int(model[1:]))
    if model == "default":
        from fractal_vmap.default import CONFIG

        return CONFIG
    from fractal_vmap.checkpoint import last_step, model_files_dir
    from fractal_vmap.sft import model_dir

    files = model_files_dir(Path(model_dir(model)))
    meta = files / f"meta_{last_step(files.parent if files.name == 'checkpoints' else files):06d}.json"
    return GPTConfig.from_dict(json.loads(meta.read_text())["model_config"])


def parse_bytes(text: str) -> int:
    """ "80GB" -> 80e9, "74.5GiB" -> 74.5 * 2^30, "500MB", or a plain number of bytes."""
    units = {
        "": 1,
        "B": 1,
        "KB": 1e3,
        "MB": 1e6,
        "GB": 1e9,
        "TB": 1e12,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "TIB": 2**40,
    }
    match = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if match is None or match.group(2).upper() not in units:
        raise UserError(f"memory size {text!r} is not a size: write e.g. 80GB, 74.5GiB or 500MB")
    return int(float(match.group(1)) * units[match.group(2).upper()])


@dataclass
class Trace:
    """One traced step of a row of `lanes` lanes: bytes alive at its landmarks."""

    lanes: int
    static: int  # before the step: the base model, the stacked weights, the optimizer state
    params: int  # of which the stacked trained weights
    before_backward: int  # after the forward: static + activations + what the head keeps
    head: int  # what the head's forward keeps for the backward
    peak: int  # the step's peak


def trace_step(
    config: GPTConfig,
    lanes: int,
    batch: int,
    seq: int,
    dtype: str = "float32",
    groups: str = "matrix,unembedding",
    levers: Levers = Levers(),
    fake: bool = True,
) -> Trace:
    """Trace one training step of `lanes` lanes with MemTracker, under FakeTensorMode (no memory used, nothing computed);
    fake=False runs the step for real on CPU, random weights (to check the estimate against)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    cpu = torch.device("cpu")  # fake CPU tensors: CUDA ones would need a CUDA driver for the backward
    cfg = FinetuneConfig(device="cpu", dtype=dtype, trainable_param_groups=groups)
    marks: dict[str, int] = {}
    with FakeTensorMode() if fake else contextlib.nullcontext():
        params = {
            k: torch.randn(s) * 0.02 for k, s in param_shapes(config).items()
        }  # the base model, as a grid holds it
        idx = torch.randint(0, config.vocab_size, (batch, seq))
        tracker = MemTracker()
        tracker.track_external(*params.values(), idx)

        def alive() -> int:
            return tracker.get_tracker_snapshot()[cpu]["Total"]

        def head(x, w, targets):  # the lanes' head, noting what its forward keeps
            before = alive()
            loss = lanes_head_loss(x, w, targets)
            marks["head"] = alive() - before
            return loss

        with tracker:
            row = nanochat_row([cfg] * lanes, config, params, [1] * lanes, cpu, head=head, levers=levers)
            marks["static"] = alive()
            prepare = row.prepare

            def noting(step, active):  # called by lanes_step just before the backward
                marks["before_backward"] = alive()
                if prepare is not None:
                    prepare(step, active)

            row.prepare = noting
            lanes_step(row, 0, idx, idx)
        peak = tracker.get_tracker_snapshot("peak")[cpu]["Total"]
        params_bytes = sum(p.numel() * p.element_size() for p in row.params.values())
    return Trace(lanes, marks["static"], params_bytes, marks["before_backward"], marks["head"], peak)


@dataclass
class MemoryPlan:
    """Peak bytes of a step as fixed + lanes x per lane, per lane split by kind (KINDS)."""

    config: dict
    batch: int
    seq: int
    dtype: str
    levers: dict
    fixed: int
    per_lane: dict[str, int] = field(default_factory=dict)

    @property
    def lane_bytes(self) -> int:
        return sum(self.per_lane.values())

    def peak(self, lanes: int) -> int:
        """The estimated peak of a chunk of `lanes` lanes (never fewer than the engine runs with)."""
        return self.fixed + max(lanes, MIN_LANES) * self.lane_bytes

    def lanes_that_fit(self, memory: int, headroom: float = HEADROOM) -> int:
        """The most lanes whose peak stays within headroom x memory; 0 if not even the smallest chunk (MIN_LANES, a
        single lane runs with an idle one) does."""
        lanes = int((memory * headroom - self.fixed) // self.lane_bytes)
        return lanes if lanes >= MIN_LANES else 0


@functools.lru_cache(maxsize=64)
def estimate_memory(
    config: GPTConfig,
    batch: int,
    seq: int,
    dtype: str = "float32",
    groups: str = "matrix,unembedding",
    levers: Levers = Levers(),
) -> MemoryPlan:
    """The linear memory model from two traced steps (TRACE_LANES lanes). Cached: a grid's rows ask it again."""
    a, b = (trace_step(config, n, batch, seq, dtype, groups, levers) for n in TRACE_LANES)

    def slope(get) -> int:
        return round((get(b) - get(a)) / (b.lanes - a.lanes))

    per_lane = {
        "params": slope(lambda t: t.params),
        "optimizer": slope(lambda t: t.static - t.params),
        "activations": slope(lambda t: t.before_backward - t.static - t.head),
        "head": slope(lambda t: t.head),
        "backward": slope(lambda t: t.peak - t.before_backward),
    }
    fixed = a.peak - a.lanes * sum(per_lane.values())
    return MemoryPlan(asdict(config), batch, seq, dtype, asdict(levers), fixed, per_lane)


def plan_levers(
    config: GPTConfig,
    lanes: int,
    memory: int,
    batch: int,
    seq: int,
    dtype: str,
    groups: str = "matrix,unembedding",
    base: Levers = Levers(),
) -> MemoryPlan:
    """The first of LEVER_LADDER (with `base`'s number-changing settings) under which `lanes` lanes fit in `memory`;
    if none does, the most frugal one (then fewer lanes than asked fit)."""
    for rung in LEVER_LADDER:
        levers = replace(
            base, step_in_backward=rung.step_in_backward or base.step_in_backward, remat=rung.remat or base.remat
        )
        if levers.micro_batches > 1 and levers.step_in_backward:
            continue
        plan = estimate_memory(config, batch, seq, dtype, groups, levers)
        if plan.lanes_that_fit(memory) >= lanes:
            return plan
    return plan


# ----------------------------------------------------------------------------- the `plan` command


def parse_levers(
    text: str,
    micro_batches: int = 1,
    momentum_dtype: str = "float32",
    master_dtype: str = "float32",
    dtype: str = "bfloat16",
) -> Levers | None:
    """--levers as Levers with the number-changing settings (None for auto); one UserError line for a bad value."""
    for name, value in (("momentum_dtype", momentum_dtype), ("master_dtype", master_dtype)):
        if value not in ("float32", "bfloat16"):
            raise UserError(f"--{name} {value!r} is not one of float32, bfloat16")
    if master_dtype == "bfloat16" and dtype != "bfloat16":
        raise UserError("--master_dtype bfloat16 needs the bfloat16 autocast: add --dtype bfloat16")
    if micro_batches < 1:
        raise UserError(f"--micro_batches is {micro_batches}: it must be at least 1")
    if text == "auto":
        return None
    names = [] if text == "none" else [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in ("step_in_backward", "remat")]
    if unknown or (text != "none" and not names):
        raise UserError(f"--levers {text!r}: use auto, none, or a comma list of step_in_backward, remat")
    if "step_in_backward" in names and micro_batches > 1:
        raise UserError(
            "--micro_batches > 1 keeps every gradient between micro-batches: it does not combine with step_in_backward"
        )
    return Levers(
        step_in_backward="step_in_backward" in names,
        remat="remat" in names,
        micro_batches=micro_batches,
        momentum_dtype=momentum_dtype,
        master_dtype=master_dtype,
    )


def check_plan(cfg: PlanConfig) -> tuple[GPTConfig, int, Levers | None]:
    """Every check before any tracing: one clear line for each bad option."""
    config = model_config(cfg.model)
    memory = parse_bytes(cfg.gpu_mem)
    levers = parse_levers(cfg.levers, cfg.micro_batches, cfg.momentum_dtype, cfg.master_dtype, cfg.dtype)
    if cfg.lanes < 1 or cfg.batch < 1 or cfg.seq < 2:
        raise UserError(
            f"--lanes {cfg.lanes}, --batch {cfg.batch}, --seq {cfg.seq}: lanes and batch must be at least 1, seq at least 2"
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
    return config, memory, levers


GRID_CELLS, GRID_TOKENS = 64 * 64, 250_000  # the seed project's d20 grid: 64 x 64 cells of 250K supervised tokens
TARGETS = {"speedup_small": 10.0, "speedup_d20": 2.0, "mfu": 0.40, "grid_minutes": 30.0}  # DESIGN section 8


def run_plan(cfg: PlanConfig) -> dict:
    """The `plan` command's numbers: the memory model, the lanes that fit, and (--project) the runtime projection."""
    config, memory, levers = check_plan(cfg)
    groups = cfg.trainable_param_groups
    if levers is None:
        base = Levers(micro_batches=cfg.micro_batches, momentum_dtype=cfg.momentum_dtype, master_dtype=cfg.master_dtype)
        plan = plan_levers(config, cfg.lanes, memory, cfg.batch, cfg.seq, cfg.dtype, groups, base)
    else:
        plan = estimate_memory(config, cfg.batch, cfg.seq, cfg.dtype, groups, levers)
    sizes = {cfg.gpu_mem: memory, "80GB": 80 * 10**9, "141GB": 141 * 10**9}
    out = {
        "model": cfg.model,
        "lanes": cfg.lanes,
        "headroom": HEADROOM,
        "memory": asdict(plan),
        "lane_bytes": plan.lane_bytes,
        "peak_bytes": plan.peak(cfg.lanes),
        "lanes_that_fit": {name: plan.lanes_that_fit(size) for name, size in sizes.items()},
    }
    if cfg.project != "none":
        from fractal_vmap.projection import GPUS, grid_seconds, project_runtime

        gpu = GPUS[cfg.project]
        fit = plan.lanes_that_fit(int(gpu.memory_gb * 1e9))
        # the lanes that fit; if none, the lanes asked (they would not fit)
        lanes = min(cfg.lanes, fit) if fit else cfg.lanes
        projection = project_runtime(
            config, lanes, cfg.project, cfg.batch, cfg.seq, Levers(**plan.levers), groups, cfg.launch_us
        )
        steps = math.ceil(GRID_TOKENS / (cfg.batch * cfg.seq * cfg.supervised_frac))
        out["projection"] = {
            **asdict(projection),
            "fits": fit >= lanes,
            "speedup": projection.speedup,
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
    table = Table(
        title=f"{out['model']}: memory of one training step (FakeTensorMode + MemTracker estimate), levers: {levers}"
    )
    table.add_column("per lane")
    table.add_column("GiB", justify="right")
    for kind in KINDS:
        table.add_row(KIND_NAMES[kind], gib(memory["per_lane"][kind]))
    table.add_row("[bold]one lane[/bold]", f"[bold]{gib(out['lane_bytes'])}[/bold]")
    table.add_row("fixed (base model, one lane's head logits, ...)", gib(memory["fixed"]))
    table.add_row(f"peak of {out['lanes']} lanes", gib(out["peak_bytes"]))
    console.print(table)
    fits = ", ".join(f"{n} on {size}" for size, n in out["lanes_that_fit"].items())
    console.print(f"lanes per chunk (peak within {out['headroom']:.0%} of the memory): {fits}")
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
        table.add_row(
            f"{p['lanes']} x one model (finetune)",
            f"{p['lanes'] * p['single_s'] * 1e3:.1f}",
            f"{p['lanes'] * p['single_gpu_s'] * 1e3:.1f}",
            str(p["lanes"] * p["single_launches"]),
            "1x",
            "",
        )
        console.print(table)
        g = p["grid"]
        console.print(
            f"projected: a {int(math.sqrt(g['cells']))}x{int(math.sqrt(g['cells']))} grid of {g['tokens_per_cell']:,} supervised tokens a cell "
            f"({g['steps_per_cell']} steps at {g['supervised_frac']:.0%} supervised) on {g['gpus']} GPUs: {g['seconds'] / 60:.1f} min"
            + ("" if p["fits"] else f" [yellow](but {p['lanes']} lanes do not fit)[/yellow]")
        )
        console.print(
            f"targets (DESIGN section 8): speed-up >= {TARGETS['speedup_small']:g}x for d4-d8, >= {TARGETS['speedup_d20']:g}x for d20; "
            f"MFU >= {TARGETS['mfu']:.0%} for d12+; the 64x64 d20 grid under {TARGETS['grid_minutes']:g} min"
        )
