"""The Triton kernels (fractal_vmap/kernels/) against their torch references, at d20 sizes.

CUDA (times with CUDA events: warm-up calls, then the median of --repeats):
  adamw  BatchedAdamW kernels="triton" on a stacked lm_head [L, vocab, n_embd]: achieved bandwidth (the bytes it must
         move, 28 per float32 element) against the device's measured copy bandwidth (a plain tensor copy) and
         against torch.optim.AdamW(fused=True) on the same bytes; the torch path for reference.
  ns     Newton-Schulz (optim.newton_schulz_iterations) on every d20 matrix of L lanes, grouped by shape, against
         the same matmuls as a plain torch.bmm chain; with gram="triton" (kernels/gram.py) too.
  head   the lanes' lm_head + softcap + cross-entropy, forward and backward, bf16 autocast as the trainer runs on
         CUDA, L lanes of d20 width at batch 8 x 1024: peak memory and time of the plain vmapped computation (all
         lanes' logits at once), the torch lane-by-lane path and the Triton path.
CPU (--device cpu): the analytic bytes each path moves per step, op by op, so the fusion gain shows before any GPU run.
Targets (README.md "Targets"): AdamW >= 85% of copy bandwidth; Newton-Schulz within 1.5x of the bmm chain.

    uv run python benchmarks/kernels.py --device cpu
    PYTHONPATH=$PWD python3 benchmarks/kernels.py --device cuda --out $OUT/kernels.json
"""

import gc
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from simple_parsing import ArgumentParser

sys.path.insert(0, str(Path(__file__).parent))  # `common` beside this file, however the script is started
from common import RESULTS_DIR, device_slug, environment, write_json  # noqa: E402

from fractal_vmap.head import head_loss, lanes_head_loss  # noqa: E402
from fractal_vmap.optim import BatchedAdamW, newton_schulz_iterations, normalized  # noqa: E402

console = Console(width=None if sys.stdout.isatty() else 160)


@dataclass
class Options:
    device: str = "cuda"  # cuda: measure; cpu: the analytic bytes per step only
    lanes: int = 16  # lanes of the row
    n_embd: int = 1280  # d20
    n_layer: int = 20  # d20
    vocab: int = 65536  # nanochat's tokenizer
    tokens: int = 8 * 1024  # batch 8 x 1024
    parts: list[str] = field(default_factory=lambda: ["adamw", "ns", "head"])  # which measurements (CUDA)
    warmup: int = 2  # untimed calls first
    repeats: int = 5  # timed calls: the median is reported
    out: str = ""  # result JSON (default benchmarks/results/kernels-<device>.json)


# ---------------------------------------------------------------- the analytic model: bytes per element, op by op
# (the tables live in fractal_vmap/kernels/costs.py: the runtime projection charges the kernels the same bytes)
from fractal_vmap.kernels.costs import (  # noqa: E402
    ADAMW_FUSED,
    ADAMW_TORCH,
    HEAD_FUSED,
    HEAD_TORCH,
    MUON_FUSED,
    MUON_TORCH,
)


def d20_matrices(opts: Options) -> dict[tuple[int, int], int]:
    """Muon's matrices per lane by shape: attention q, k, v, proj (C x C) and the MLP's fc (4C x C) and proj (C x
    4C)."""
    C = opts.n_embd
    return {(C, C): 4 * opts.n_layer, (4 * C, C): opts.n_layer, (C, 4 * C): opts.n_layer}


def analytic(opts: Options) -> dict:
    L, V, C, N = opts.lanes, opts.vocab, opts.n_embd, opts.tokens
    muon_numel = L * sum(r * c * k for (r, c), k in d20_matrices(opts).items())
    cases = {
        "adamw (lm_head)": (L * V * C, ADAMW_TORCH, ADAMW_FUSED),
        "muon (all matrices)": (muon_numel, MUON_TORCH, MUON_FUSED),
        "head (logits)": (L * N * V, HEAD_TORCH, HEAD_FUSED),
    }
    out = {}
    for name, (numel, torch_ops, fused_ops) in cases.items():
        per = {side: sum(r + w for _, r, w in ops) for side, ops in (("torch", torch_ops), ("fused", fused_ops))}
        out[name] = {
            "elements": numel,
            "bytes_per_element": per,
            "gb_per_step": {k: v * numel / 1e9 for k, v in per.items()},
            "ops": {"torch": torch_ops, "fused": fused_ops},
        }
    # peak temporaries of the head (estimates): the torch path holds one lane's bf16 logits and ~5 float32 copies
    # (saved for its backward, and the gradient), the plain vmap all lanes' at once; the Triton path one [L, chunk, V]
    # bf16 buffer
    from fractal_vmap.kernels import chunk_tokens

    chunk = min(N, chunk_tokens(V, torch.bfloat16))
    out["head (logits)"]["peak_temporaries_gb"] = {
        "plain vmap": L * N * V * 22 / 1e9,
        "torch": N * V * 22 / 1e9,
        "fused": L * chunk * V * 2 / 1e9,
    }
    return out


def print_analytic(a: dict) -> None:
    table = Table(title="analytic bytes moved per step (reads + writes)")
    for col in ("step", "elements", "torch B/elt", "fused B/elt", "torch GB", "fused GB", "ratio"):
        table.add_column(col, justify="left" if col == "step" else "right")
    for name, r in a.items():
        b, g = r["bytes_per_element"], r["gb_per_step"]
        table.add_row(
            name,
            f"{r['elements']:,}",
            str(b["torch"]),
            str(b["fused"]),
            f"{g['torch']:.1f}",
            f"{g['fused']:.1f}",
            f"{b['torch'] / b['fused']:.1f}x",
        )
    console.print(table)
    for name, r in a.items():
        ops = Table(title=f"{name}: op by op (read + written bytes per element)")
        ops.add_column("torch path")
        ops.add_column("B", justify="right")
        ops.add_column("fused path")
        ops.add_column("B", justify="right")
        t, f = r["ops"]["torch"], r["ops"]["fused"]
        for i in range(max(len(t), len(f))):
            left = (t[i][0], str(t[i][1] + t[i][2])) if i < len(t) else ("", "")
            right = (f[i][0], str(f[i][1] + f[i][2])) if i < len(f) else ("", "")
            ops.add_row(*left, *right)
        console.print(ops)
    peak = a["head (logits)"]["peak_temporaries_gb"]
    console.print("head peak temporaries (GB): " + ", ".join(f"{k} {v:.1f}" for k, v in peak.items()))


# ---------------------------------------------------------------- CUDA measurements


def cuda_ms(fn: Callable[[], object], opts: Options) -> float:
    """Median milliseconds of fn over opts.repeats calls, each timed with CUDA events, after opts.warmup calls."""
    for _ in range(opts.warmup):
        fn()
    times = []
    for _ in range(opts.repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def copy_ms(numel: int, device: torch.device, opts: Options) -> float:
    """Milliseconds of a plain float32 copy of numel elements: the device's achievable bandwidth."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    return cuda_ms(lambda: dst.copy_(src), opts)


def step_ms(opt, *args, opts: Options) -> float | None:
    """Milliseconds of opt.step(*args); None when it runs out of memory (the torch path's [L, V, C] temporaries)."""
    try:
        return cuda_ms(lambda: opt.step(*args), opts)
    except torch.cuda.OutOfMemoryError:
        return None


def bench_adamw(opts: Options, device: torch.device) -> dict:
    L, V, C = opts.lanes, opts.vocab, opts.n_embd
    numel = L * V * C
    result = {"elements": numel, "copy_ms": copy_ms(numel, device, opts)}
    free()
    result["copy_gbps"] = 8 * numel / result["copy_ms"] / 1e6
    p = torch.randn(L, V, C, device=device, requires_grad=True)
    p.grad = torch.randn_like(p)
    lr = torch.full((L,), 1e-3, dtype=torch.float64, device=device)
    wd, active = torch.full_like(lr, 0.1), torch.ones(L, dtype=torch.bool, device=device)
    for kernels in ("triton", "torch"):
        result[f"{kernels}_ms"] = step_ms(BatchedAdamW([p], kernels=kernels), lr, wd, active, opts=opts)
        free()
    fused = torch.optim.AdamW([p], lr=1e-3, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1, fused=True)
    result["torch_fused_ms"] = step_ms(fused, opts=opts)
    for key in ("triton", "torch_fused"):  # both must read p, g, m, v and write p, m, v: 28 bytes an element
        result[f"{key}_gbps"] = 28 * numel / result[f"{key}_ms"] / 1e6
    result["triton_of_copy"] = result["triton_gbps"] / result["copy_gbps"]
    return result


def plain_bmm_chain(X: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The matmuls of Newton-Schulz, nothing else: A = X X^T, B = A A, X = B X, as three torch.bmm a step."""
    Y = X.mT if X.size(-2) > X.size(-1) else X
    for _ in range(steps):
        A = torch.bmm(Y, Y.mT)
        Y = torch.bmm(torch.bmm(A, A), Y)
    return Y


def ns_row(X: torch.Tensor, opts: Options) -> dict:
    row = {"shape": list(X.shape[1:]), "matrices": X.shape[0]}
    row["bmm_chain_ms"] = cuda_ms(lambda: plain_bmm_chain(X), opts)
    row["torch_ms"] = cuda_ms(lambda: newton_schulz_iterations(X), opts)
    row["gram_triton_ms"] = cuda_ms(lambda: newton_schulz_iterations(X, gram="triton"), opts)
    row["torch_of_chain"] = row["torch_ms"] / row["bmm_chain_ms"]
    row["gram_triton_of_chain"] = row["gram_triton_ms"] / row["bmm_chain_ms"]
    return row


def bench_ns(opts: Options, device: torch.device) -> list[dict]:
    rows = []
    for (r, c), per_lane in d20_matrices(opts).items():
        rows.append(ns_row(normalized(torch.randn(opts.lanes * per_lane, r, c, device=device)), opts))
        free()
    return rows


def bench_head(opts: Options, device: torch.device) -> list[dict]:
    L, V, C, N = opts.lanes, opts.vocab, opts.n_embd, opts.tokens
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(L, N, C, device=device, generator=gen).requires_grad_()
    w = (
        0.02 * torch.randn(L, V, C, device=device, generator=gen)
    ).requires_grad_()  # the trained unembedding: per lane
    targets = torch.randint(0, V, (L, N), device=device, generator=gen)
    targets[torch.rand(L, N, device=device, generator=gen) < 0.3] = -1
    paths = {
        "plain vmap": torch.func.vmap(head_loss, in_dims=(0, 0, 0)),  # all lanes' [N, V] logits at once
        "torch": torch.func.vmap(lambda a, b, t: lanes_head_loss(a, b, t, kernels="torch")),
        "triton": torch.func.vmap(lambda a, b, t: lanes_head_loss(a, b, t, kernels="triton")),
    }
    rows = []
    for name, fn in paths.items():

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                losses = fn(x, w, targets)
            return torch.autograd.grad(losses.sum(), (x, w))

        free()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        try:
            ms = cuda_ms(step, opts)
            peak = (torch.cuda.max_memory_allocated() - base) / 1e9
        except torch.cuda.OutOfMemoryError:
            ms, peak = None, None
        rows.append({"path": name, "ms": ms, "peak_gb": peak})  # peak includes dx and dw (2 x L x V x C floats for dw)
    return rows


def main(opts: Options) -> None:
    device = torch.device(opts.device)
    env = environment(device)
    a = analytic(opts)
    console.print(
        f"kernels on [bold]{env['device']}[/bold] (torch {env['torch']}): {opts.lanes} lanes, n_embd {opts.n_embd}, "
        f"{opts.n_layer} layers, vocab {opts.vocab}, {opts.tokens} tokens"
    )
    print_analytic(a)
    report = {"benchmark": "kernels", "environment": env, "options": asdict(opts), "analytic": a}
    if device.type == "cuda":
        if "adamw" in opts.parts:
            r = report["adamw"] = bench_adamw(opts, device)
            console.print(
                f"adamw: copy {r['copy_gbps']:,.0f} GB/s; triton {r['triton_ms']:.2f} ms = {r['triton_gbps']:,.0f} "
                "GB/s "
                f"({r['triton_of_copy']:.0%} of copy, target >= 85%); torch.optim fused {r['torch_fused_ms']:.2f} ms = "
                f"{r['torch_fused_gbps']:,.0f} GB/s; torch path {r['torch_ms'] or float('nan'):.2f} ms"
            )
        if "ns" in opts.parts:
            rows = report["ns"] = bench_ns(opts, device)
            table = Table(title="Newton-Schulz (5 steps) against the plain bmm chain; target <= 1.5x")
            for col in ("shape", "matrices", "bmm chain ms", "torch ms", "ratio", "gram=triton ms", "ratio"):
                table.add_column(col, justify="right")
            for r in rows:
                table.add_row(
                    str(tuple(r["shape"])),
                    str(r["matrices"]),
                    f"{r['bmm_chain_ms']:.2f}",
                    f"{r['torch_ms']:.2f}",
                    f"{r['torch_of_chain']:.2f}x",
                    f"{r['gram_triton_ms']:.2f}",
                    f"{r['gram_triton_of_chain']:.2f}x",
                )
            console.print(table)
        if "head" in opts.parts:
            rows = report["head"] = bench_head(opts, device)
            table = Table(
                title=(
                    f"lm_head + softcap + cross-entropy, forward + backward, {opts.lanes} lanes x {opts.tokens} tokens"
                )
            )
            for col in ("path", "ms", "peak GB"):
                table.add_column(col, justify="right")
            for r in rows:
                table.add_row(
                    r["path"],
                    "OOM" if r["ms"] is None else f"{r['ms']:.1f}",
                    "OOM" if r["peak_gb"] is None else f"{r['peak_gb']:.1f}",
                )
            console.print(table)
    path = Path(opts.out) if opts.out else RESULTS_DIR / f"kernels-{device_slug(device)}.json"
    console.print(f"wrote {write_json(report, path)}")


if __name__ == "__main__":
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_arguments(Options, dest="opts")
    main(parser.parse_args().opts)
