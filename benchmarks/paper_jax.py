"""The paper's MLP grid in our torch trainer against an independent JAX jit(vmap(...)) of the same computation.

Same task on both sides (fractal_vmap.tasks.paper.mlp: one hidden layer of width 8, tanh, mean-field parameterization,
full-batch gradient descent with one lr per layer, 100 steps, float64), same initial weights and data (made by
fractal_vmap.tasks.paper.mlp and handed to JAX as arrays), same grid (default: 256 x 256 lanes, log10 lr in [-3, 6] on
both axes: columns = layer-0 lr, rows = layer-1 lr), same CPU cores. The JAX side is written from the formulas, not from
our code: a per-lane training loop (lax.scan over the steps: value_and_grad, then the update; a lane whose loss is
not finite stops updating) under jax.vmap over the lanes and jax.jit, run over the lanes in chunks of one shape.

Work: our trainer drops the lanes that stopped (non-finite loss) from its chunks every 10 steps (17% of the
default grid's lane-steps come after a divergence); a jitted scan has a fixed batch, so the JAX side computes every
lane to the end. The `torch full` side is ours doing that same work (no dropping), for the engines' own speed.

Every measurement runs in a fresh process of its own (this script with --side), so neither engine's idle
threads (OpenMP's, XLA's) share the cores with the other's work; the time is taken inside it, imports excluded.
Reported per side: wall time (JAX's compile time apart), CPU time, trainable fraction (convergence measure < 0),
box-counting dimension of the boundary; and how many cells agree in sign between the sides (near the boundary
training is chaotic and float64 rounding differences between the engines flip cells). Target (benchmarks/README.md
"Targets" section 8): ours no slower than JAX on the same cores.

    uv run --group bench python benchmarks/paper_jax.py
    uv run --group bench python benchmarks/paper_jax.py --size 64 --jax_chunks 4096   # a quick look
"""

import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from simple_parsing import ArgumentParser

sys.path.insert(0, str(Path(__file__).parent))  # `common` beside this file, however the script is started
from common import (
    FOREIGN_MAX,
    RESULTS_DIR,
    CpuWatch,
    check_unchanged,
    device_slug,
    environment,
    wait_for_quiet,
    write_json,
)  # noqa: E402

from fractal_vmap.analysis.fractal import edge_pixels, fractal_dimension  # noqa: E402
from fractal_vmap.analysis.labels import convergence_measure  # noqa: E402
from fractal_vmap.machine import tune_allocator  # noqa: E402
from fractal_vmap.tasks.paper import mlp as paper  # noqa: E402
from fractal_vmap.tasks.paper.mlp import (  # noqa: E402
    DEFAULT_VIEW,
    PaperConfig,
    init_params,
    lane_loss_and_grads,
    make_data,
    phase_lanes,
    train_paper_lanes,
    vmap_loss_and_grads,
)

console = Console(width=None if sys.stdout.isatty() else 160)
MAX_TRIES = 3  # a contended measurement is redone at most this many times in all


@dataclass
class Options:
    size: int = 256  # cells per side of the grid
    width: int = 8
    activation: str = "tanh"
    steps: int = 100
    dtype: str = "float64"
    seed: int = 0
    view: list[float] = field(default_factory=lambda: list(DEFAULT_VIEW))  # log10 lr range of both axes
    torch_chunks: list[int] = field(default_factory=lambda: [256, 1024])  # lanes per chunk of our hand-derived trainer
    # ours again, computing stopped lanes to the end as JAX does
    full_chunks: list[int] = field(default_factory=lambda: [256])
    vmap_chunks: list[int] = field(default_factory=lambda: [256])  # lanes per chunk of our vmap(grad) trainer
    jax_chunks: list[int] = field(default_factory=lambda: [1024, 4096, 65536])  # lanes per jit call on the JAX side
    max_load: float = 1.2  # wait until the 1-minute load average is below this before starting
    wait: bool = True  # wait for a quiet machine before each measurement; false: measure at once, contention recorded
    repeats: int = 1  # rounds over all sides, interleaved (each side's best round is reported)
    out: str = ""  # default benchmarks/results/paper_jax-<device>.json
    # internal: run one side (torch, torch_full, torch_vmap or jax) with --chunk, write --side_out and exit
    side: str = ""
    chunk: int = 0  # internal, with --side
    side_out: str = ""  # internal, with --side: a .npz with the measure and the timings


def jax_trainer(opts: Options, x: np.ndarray, y: np.ndarray, W0: np.ndarray, W1: np.ndarray):
    """A jitted function (lr0 [C], lr1 [C]) -> losses [C, steps] for chunks of C lanes, written from the formulas."""
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    dtype = {"float64": jnp.float64, "float32": jnp.float32}[opts.dtype]
    x, y, W0, W1 = (jnp.asarray(a, dtype=dtype) for a in (x, y, W0, W1))
    n = W0.shape[0]
    act = {
        "tanh": lambda z: jnp.tanh(math.sqrt(2) * z),
        "relu": lambda z: math.sqrt(2) * jax.nn.relu(z),
        "identity": lambda z: z,
    }[opts.activation]

    def loss(p):
        h = act(x @ p[0] / math.sqrt(n))
        out = h @ p[1] / math.sqrt(n) / math.sqrt(n)
        return jnp.mean((out - y) ** 2)

    def lane(lr0, lr1):
        def step(carry, _):
            (w0, w1), active = carry
            value, (g0, g1) = jax.value_and_grad(loss)((w0, w1))
            logged = jnp.where(active, value, jnp.nan)
            active = active & jnp.isfinite(value)
            w0 = jnp.where(active, w0 - lr0.astype(dtype) * g0, w0)
            w1 = jnp.where(active, w1 - lr1.astype(dtype) * g1, w1)
            return ((w0, w1), active), logged

        _, losses = jax.lax.scan(step, ((W0, W1), jnp.array(True)), None, length=opts.steps)
        return losses

    return jax.jit(jax.vmap(lane))


def run_jax(fn, lr0: np.ndarray, lr1: np.ndarray, chunk: int) -> np.ndarray:
    """All lanes in chunks of one shape (the last one padded with copies), losses [steps, L] as numpy float64."""
    L = len(lr0)
    pad = -L % chunk
    lr0, lr1 = np.concatenate([lr0, np.repeat(lr0[-1:], pad)]), np.concatenate([lr1, np.repeat(lr1[-1:], pad)])
    parts = [np.asarray(fn(lr0[i : i + chunk], lr1[i : i + chunk])) for i in range(0, L + pad, chunk)]
    return np.concatenate(parts, axis=0)[:L].T.astype(np.float64)


def run_side(opts: Options) -> None:
    """One side in this process: build the grid's lanes, warm up (JAX: compile the chunk shape), time the whole grid."""
    tune_allocator()  # as the CLI does at start
    cfg = PaperConfig(width=opts.width, activation=opts.activation, steps=opts.steps, dtype=opts.dtype, seed=opts.seed)
    values = np.logspace(opts.view[0], opts.view[1], opts.size)
    lr0, lr1, _ = phase_lanes("lr_vs_lr", values, values)
    warm = slice(0, min(opts.chunk, len(lr0)))
    t0 = time.perf_counter()
    if opts.side == "jax":
        params, (x, y) = init_params(cfg), make_data(cfg)
        fn = jax_trainer(opts, x.numpy(), y.numpy(), params["W0"].numpy(), params["W1"].numpy())
        lr0, lr1 = lr0.numpy(), lr1.numpy()
        run_jax(fn, lr0[warm], lr1[warm], opts.chunk)  # compiles the chunk shape
        run = lambda: run_jax(fn, lr0, lr1, opts.chunk)  # noqa: E731
    else:
        if opts.side == "torch_full":
            paper.COMPACT_EVERY = opts.steps + 1  # never drop the lanes that stopped: the same work as the JAX side
        grads = {"torch": lane_loss_and_grads, "torch_full": lane_loss_and_grads, "torch_vmap": vmap_loss_and_grads}[
            opts.side
        ]
        train_paper_lanes(cfg, lr0[warm], lr1[warm], chunk=opts.chunk, loss_and_grads=grads)  # first-call set-up
        run = lambda: train_paper_lanes(cfg, lr0, lr1, chunk=opts.chunk, loss_and_grads=grads).numpy()  # noqa: E731
    warm_s = time.perf_counter() - t0
    cpu0 = time.process_time()
    with CpuWatch() as watch:
        losses = run()
    cpu = time.process_time() - cpu0
    m = convergence_measure(np.asarray(losses).T).reshape(opts.size, opts.size)
    np.savez(opts.side_out, measure=m, wall_s=watch.wall_s, cpu_s=cpu, foreign=watch.foreign, warm_s=warm_s)


def measured(label: str, side: str, chunk: int, opts: Options, argv: list[str]) -> tuple[dict, np.ndarray]:
    """One side in a fresh process, on a quiet machine (redone while others used the cores); its timings and the
    grid's picture numbers."""
    for attempt in range(MAX_TRIES if opts.wait else 1):
        if opts.wait:
            wait_for_quiet(opts.max_load, check_load=attempt == 0, say=console.print)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "side.npz"
            subprocess.run(
                [sys.executable, __file__, *argv, "--side", side, "--chunk", str(chunk), "--side_out", str(out)],
                check=True,
            )
            res = dict(np.load(out))
        foreign = float(res["foreign"])
        if foreign <= FOREIGN_MAX or not opts.wait or attempt == MAX_TRIES - 1:
            break
        console.print(f"[yellow]{label}: other processes used {foreign:.0%} of the cores: measuring again[/yellow]")
    m = res["measure"]
    dim = fractal_dimension(m)
    row = {
        "side": label,
        "wall_s": float(res["wall_s"]),
        "cpu_s": float(res["cpu_s"]),
        "foreign_cpu": foreign,
        "contended": foreign > FOREIGN_MAX,
        "warm_up_s": float(res["warm_s"]),
        "trainable_fraction": float((m < 0).mean()),
        "dimension": dim["dimension"],
        "dimension_median_local": dim["dimension_median_local"],
        "edge_pixels": dim["edge_pixel_count"],
    }
    console.print(
        f"{label}: {row['wall_s']:.1f} s wall, {row['cpu_s']:.1f} s CPU (others used {foreign:.0%} of the cores), "
        f"trainable {row['trainable_fraction']:.3f}, dimension {dim['dimension']:.3f}"
    )
    return row, m


def main() -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_arguments(Options, dest="opts")
    opts: Options = parser.parse_args().opts
    if opts.side:
        return run_side(opts)
    argv = [a for a in sys.argv[1:]]  # the children get the same task options
    device = torch.device("cpu")
    env = environment(device)
    import jax

    env.update(jax=jax.__version__, jax_devices=str(jax.devices()), xla_flags=os.environ.get("XLA_FLAGS", ""))
    console.print(
        f"paper MLP: {opts.size}x{opts.size} lanes, width {opts.width}, {opts.activation}, {opts.steps} steps, "
        f"{opts.dtype}; {env['device']}"
    )
    sides = [
        (f"torch chunk {c}", "torch", c, {"engine": "torch (hand-derived grads)", "chunk": c})
        for c in opts.torch_chunks
    ]
    sides += [
        (
            f"torch full chunk {c}",
            "torch_full",
            c,
            {"engine": "torch (hand-derived grads, stopped lanes computed on)", "chunk": c},
        )
        for c in opts.full_chunks
    ]
    sides += [
        (f"torch vmap chunk {c}", "torch_vmap", c, {"engine": "torch (vmap(grad))", "chunk": c})
        for c in opts.vmap_chunks
    ]
    sides += [(f"jax chunk {c}", "jax", c, {"engine": "jax jit(vmap)", "chunk": c}) for c in opts.jax_chunks]
    rounds, measures = [], {}
    # rounds interleave the sides, so on a noisy machine all of them meet the same noise
    for rep in range(opts.repeats):
        for label, side, chunk, info in sides:
            row, m = measured(label, side, chunk, opts, argv)
            if label in measures and not np.array_equal(np.sign(m), np.sign(measures[label])):
                console.print(
                    f"[bold red]{label}: another round gave other signs: the engine is not deterministic[/bold red]"
                )
            measures[label] = m
            rounds.append(row | info | {"round": rep})
    # best round per side
    rows = [min((r for r in rounds if r["side"] == label), key=lambda r: r["wall_s"]) for label, *_ in sides]

    # sign agreement of every side with our first one, and where the disagreeing cells lie
    ref_name = next(iter(measures))
    ref = measures[ref_name]
    near = np.zeros_like(ref, dtype=bool)  # cells of a 2x2 block that holds both phases in the reference
    e = edge_pixels(ref)
    near[:-1, :-1] |= e
    near[1:, :-1] |= e
    near[:-1, 1:] |= e
    near[1:, 1:] |= e
    for row, (_name, m) in zip(rows, measures.items()):
        differ = (m > 0) != (ref > 0)
        row.update(
            sign_agree_cells=int((~differ).sum()),
            sign_agree_fraction=float((~differ).mean()),
            disagree_on_boundary=int((differ & near).sum()),
            agree_with=ref_name,
        )

    best = {
        engine: min(r["wall_s"] for r in rows if r["engine"] == engine)
        for engine in dict.fromkeys(r["engine"] for r in rows)
    }
    best_cpu = {engine: min(r["cpu_s"] for r in rows if r["engine"] == engine) for engine in best}
    ours, theirs = best["torch (hand-derived grads)"], best["jax jit(vmap)"]
    table = Table(
        title=(
            f"paper MLP {opts.size}x{opts.size}, width {opts.width}, {opts.activation}, {opts.steps} steps, "
            f"{opts.dtype} ({env['device']}; shared machine)"
        )
    )
    for col in (
        "engine",
        "chunk",
        "wall s",
        "CPU s",
        "warm-up s",
        "trainable",
        "dimension (median local)",
        f"sign agrees with {ref_name}",
        "flips on boundary",
    ):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["engine"],
            str(r["chunk"]),
            f"{r['wall_s']:.1f}" + (f" (others {r['foreign_cpu']:.0%})" if r["contended"] else ""),
            f"{r['cpu_s']:.1f}",
            f"{r['warm_up_s']:.1f}",
            f"{r['trainable_fraction']:.4f}",
            f"{r['dimension']:.3f} ({r['dimension_median_local']:.3f})",
            f"{r['sign_agree_cells']} / {opts.size**2}",
            f"{r['disagree_on_boundary']} of {opts.size**2 - r['sign_agree_cells']}",
        )
    console.print(table)
    verdict = "met" if ours <= theirs else "NOT met"
    console.print(
        f"best wall: ours {ours:.1f} s, JAX {theirs:.1f} s: ours / JAX = {ours / theirs:.2f} (target <= 1: {verdict})"
    )
    for engine in best:
        console.print(
            f"  {engine}: best wall {best[engine]:.1f} s ({best[engine] / theirs:.2f} x JAX), best CPU "
            f"{best_cpu[engine]:.1f} s "
            f"({best_cpu[engine] / best_cpu['jax jit(vmap)']:.2f} x JAX)"
        )
    check_unchanged(env, say=console.print)
    out = Path(opts.out) if opts.out else RESULTS_DIR / f"paper_jax-{device_slug(device)}.json"
    write_json(
        {
            "options": asdict(opts),
            "environment": env,
            "rows": rows,
            "rounds": rounds,
            "best_wall_s": best,
            "best_cpu_s": best_cpu,
            "ours_over_jax": ours / theirs,
        },
        out,
    )
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
