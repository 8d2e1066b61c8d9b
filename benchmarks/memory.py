"""Memory of a row of lanes, and what the levers and dead-lane compaction buy.

1. `d20`: bytes per lane by kind and lanes per chunk on 80 GB and 141 GB for nanochat d20 (batch 8 x 1024, bf16
   autocast, embeddings frozen) under each lever setting: the plan's estimate (tasks/nanochat/memory.py: the real step
   traced under FakeTensorMode with MemTracker), no GPU needed.
2. `drift`: what the levers that change the numbers do to them: a row of lanes at tame learning rates, trained as is
   and with micro-batches, bfloat16 momentum, bfloat16 master weights; the largest per-step |dloss| against the plain
   row, next to the noise floor (tests/test_lanes.py: LOSS_TOL_PER_LR x lr in float32, BF16_TOL under bf16 autocast).
3. `dead`: a row of 16 lanes of the default model where half diverge in the first steps, trained with and without
   dead-lane compaction: lane-steps computed (exact) and CPU seconds (noisy on a shared machine).

    uv run python benchmarks/memory.py                    # all three, several minutes on 2 cores
    uv run python benchmarks/memory.py --parts dead
"""

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from simple_parsing import ArgumentParser

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS_DIR, CpuWatch, environment, own_seconds, write_json  # noqa: E402

from fractal_vmap import lanes  # noqa: E402
from fractal_vmap.data import make_stream, render_split, total_steps  # noqa: E402
from fractal_vmap.machine import tune_allocator  # noqa: E402
from fractal_vmap.model import nanochat_depth  # noqa: E402
from fractal_vmap.options import FinetuneConfig  # noqa: E402
from fractal_vmap.sources import load_model  # noqa: E402
from fractal_vmap.tasks.nanochat.levers import Levers  # noqa: E402
from fractal_vmap.tasks.nanochat.memory import KIND_NAMES, KINDS, estimate_memory  # noqa: E402
from fractal_vmap.tasks.nanochat.row import train_lanes  # noqa: E402

FIXTURE = Path(__file__).parent.parent / "tests" / "fixtures" / "nanochat-d2"
CPU = torch.device("cpu")
GiB = 2**30
D20_LEVERS = {
    "none": Levers(),
    "step_in_backward": Levers(step_in_backward=True),
    "remat": Levers(remat=True),
    "step_in_backward + remat": Levers(step_in_backward=True, remat=True),
    "+ bf16 momentum": Levers(step_in_backward=True, remat=True, momentum_dtype="bfloat16"),
    "+ bf16 momentum and master weights": Levers(
        step_in_backward=True, remat=True, momentum_dtype="bfloat16", master_dtype="bfloat16"
    ),
}
DRIFT_LEVERS = {
    "micro_batches=2": Levers(micro_batches=2),
    "bf16 momentum": Levers(momentum_dtype="bfloat16"),
    "bf16 master weights": Levers(master_dtype="bfloat16"),
    "bf16 momentum and master": Levers(momentum_dtype="bfloat16", master_dtype="bfloat16"),
}


@dataclass
class Options:
    parts: list[str] = field(default_factory=lambda: ["d20", "drift", "dead"])
    lrs: list[float] = field(default_factory=lambda: [0.0003, 0.001, 0.003, 0.01])
    steps: int = 30  # steps of the drift rows
    out: str = ""  # default: benchmarks/results/memory-cpu.json


def d20_table(console: Console) -> list[dict]:
    rows = []
    table = Table(
        title="nanochat d20, batch 8 x 1024, bf16 autocast, embeddings frozen: GiB per lane (estimate, no GPU)"
    )
    for name in ("levers", *KINDS, "one lane", "fixed", "lanes on 80 GB", "lanes on 141 GB"):
        table.add_column(name, justify="right")
    for name, levers in D20_LEVERS.items():
        t0 = time.perf_counter()
        plan = estimate_memory(nanochat_depth(20), 8, 1024, "bfloat16", levers=levers)
        row = {
            "levers": name,
            "per_lane": plan.per_lane,
            "lane_bytes": plan.lane_bytes,
            "fixed": plan.fixed,
            "lanes_80GB": plan.lanes_that_fit(80 * 10**9),
            "lanes_141GB": plan.lanes_that_fit(141 * 10**9),
            "trace_s": time.perf_counter() - t0,
        }
        rows.append(row)
        table.add_row(
            name,
            *(f"{plan.per_lane[k] / GiB:.2f}" for k in KINDS),
            f"{plan.lane_bytes / GiB:.2f}",
            f"{plan.fixed / GiB:.2f}",
            str(row["lanes_80GB"]),
            str(row["lanes_141GB"]),
        )
    console.print(table)
    console.print("kinds: " + "; ".join(f"{k} = {KIND_NAMES[k]}" for k in KINDS))
    return rows


def drift(console: Console, opts: Options) -> list[dict]:
    config, params, _ = load_model(str(FIXTURE))
    traj = torch.load(FIXTURE / "trajectories.pt")

    def batches(step):
        return traj["batch_inputs"][step % 30], traj["batch_targets"][step % 30]

    rows = []
    table = Table(
        title=(
            f"drift against the plain row: max per-step |dloss| over {opts.steps} steps (nanochat fixture, bf16 "
            "autocast)"
        )
    )
    table.add_column("lever")
    for lr in opts.lrs:
        table.add_column(f"lr {lr:g}", justify="right")
    cfgs = [
        FinetuneConfig(
            learning_rate=lr,
            dtype="bfloat16",
            device="cpu",
            trainable_param_groups="all",
            weight_decay=0.0,
            warmup_frac=0.0,
            final_lr_frac=1.0,
        )
        for lr in opts.lrs
    ]
    plain = train_lanes(cfgs, config, params, batches, [opts.steps] * len(cfgs), CPU)
    for name, levers in DRIFT_LEVERS.items():
        other = train_lanes(cfgs, config, params, batches, [opts.steps] * len(cfgs), CPU, levers=levers)
        gaps = [max(abs(a - b) for a, b in zip(p.losses, o.losses)) for p, o in zip(plain, other)]
        rows.append({"lever": name, "lrs": opts.lrs, "max_abs_dloss": gaps})
        table.add_row(name, *(f"{g:.2e}" for g in gaps))
    console.print(table)
    console.print(
        "noise floor under bf16 autocast (tests/test_lanes.py, BF16_TOL): 1.9e-3 to 4.6e-3 over 12 steps at lr "
        "3e-4..1e-2"
    )
    return rows


def dead_lanes(console: Console) -> dict:
    """16 lanes of the default model, 40 steps; lanes 8..15 at a diverging lr (NaN within a few steps)."""
    base = FinetuneConfig(device="cpu")
    config, params, tokenizer = load_model(base.model, base.tokenizer, CPU)
    examples, _ = render_split(base, tokenizer, config, "train")
    lrs = [0.003 * 1.2**i for i in range(8)] + [3e12] * 8
    cfgs = [FinetuneConfig(device="cpu", learning_rate=lr, num_iterations=40) for lr in lrs]
    stream = make_stream(cfgs[0], tokenizer, examples, cfgs[0].seed)
    steps = [total_steps(c, stream.batch(0)[1]) for c in cfgs]
    widths = []
    step = lanes.lanes_step

    def counting(row, *args):
        widths.append(row.total_steps.shape[0])
        step(row, *args)

    out = {}
    lanes.lanes_step = counting
    try:
        for compact in (False, True):
            widths.clear()
            cpu0 = own_seconds()
            with CpuWatch() as watch:
                results = train_lanes(cfgs, config, params, stream.batch, steps, CPU, compact=compact)
            out["compacted" if compact else "uncompacted"] = {
                "lane_steps": sum(widths),
                "cpu_s": own_seconds() - cpu0,
                "wall_s": watch.wall_s,
                "foreign": watch.foreign,
                "losses": [r.losses for r in results],
            }
    finally:
        lanes.lanes_step = step
    a, b = out["uncompacted"], out["compacted"]
    same = all(x == y or (x != x and y != y) for p, q in zip(a["losses"], b["losses"]) for x, y in zip(p, q))
    diverged = sum(1 for r in a["losses"] if len(r) < 40)
    console.print(
        f"dead lanes: 16 lanes x 40 steps, {diverged} diverged early: lane-steps {a['lane_steps']} -> "
        f"{b['lane_steps']} with compaction; "
        f"CPU {a['cpu_s']:.1f} s -> {b['cpu_s']:.1f} s, wall {a['wall_s']:.1f} s -> {b['wall_s']:.1f} s "
        f"(others used {a['foreign']:.0%} / {b['foreign']:.0%} of the cores meanwhile); results identical: {same}"
    )
    for side in out.values():
        side.pop("losses")
    return {**out, "diverged": diverged, "identical": same}


def main() -> None:
    parser = ArgumentParser()
    parser.add_arguments(Options, dest="opts")
    opts = parser.parse_args().opts
    tune_allocator()
    console = Console()
    results = {"environment": environment(CPU)}
    if "d20" in opts.parts:
        results["d20"] = d20_table(console)
    if "drift" in opts.parts:
        results["drift"] = drift(console, opts)
    if "dead" in opts.parts:
        results["dead"] = dead_lanes(console)
    path = write_json(results, Path(opts.out) if opts.out else RESULTS_DIR / f"memory-cpu-{'-'.join(opts.parts)}.json")
    console.print(f"results: {path}")


if __name__ == "__main__":
    main()
