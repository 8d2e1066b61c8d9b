"""`fractal-vmap bench`: the training throughput of a grid row three ways, in one process on one device.

Modes (each trains the same lanes on the same batches):
- sequential: L single models one after another, each doing the `finetune` step (forward, loss.item(), backward,
  torch.optim AdamW + Muon, zero_grad): how grids were run before, minus process start-up (benchmarks/e2e_row.py).
- row: the eager vmapped row step, lanes.lanes_step (what `grid --compile off` trains with).
- fast: the compiled row step (compiled.py), with the Triton kernels where they run (CUDA: kernels "auto").

Models: the embedded default model on its real SFT batches (float32), the CPU default; random-init nanochat models by
depth (n_layer = depth, n_embd = 64 x depth, heads of 128 dims, vocab 65536, context 2048) on random 8 x 1024 batches
with ~30% of targets ignored, bf16 autocast on CUDA, the GPU default.

Per model, L and mode: lane-steps/s and tokens/s over all lanes (CPU: the best timed window; CUDA: the median, CUDA
events); the speed-up against sequential at the same L, in the same run; model-FLOPs utilization against the matmul
rate measured here (FLOPs per token as roofline.flops_per_token); peak memory per lane (CUDA: the allocator's peak over
the timed steps, above what was allocated before; CPU: the profiler's peak of the allocations made while building the
mode and running one step); kernel launches per step (one profiled step: CUDA kernels; on CPU, aten ops that do work,
i.e. leaf ops less views and allocations, plus Inductor's fused kernels).
"""

import math
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from fractal_vmap.errors import UserError
from fractal_vmap.kernels import resolve as resolve_kernels
from fractal_vmap.lanes import lanes_step, to_device
from fractal_vmap.machine import device_name, device_slug
from fractal_vmap.model import GPTConfig, init_params, nanochat_depth, param_shapes
from fractal_vmap.options import BenchConfig, FinetuneConfig
from fractal_vmap.perf.timing import free_memory, matmul_ceiling, profile_mode, time_mode, wait_for_quiet
from fractal_vmap.recipe import resolve_device
from fractal_vmap.reference import ReferenceModel
from fractal_vmap.tasks.nanochat.compiled import bucket
from fractal_vmap.tasks.nanochat.row import nanochat_row

MODES = ("sequential", "row", "fast")  # options.BenchConfig.modes


@dataclass
class Plan:
    primers: int  # first untimed steps: one batch of each padded shape, so that `fast` compiles before any timing
    warmup: int
    steps: int
    repeats: int

    def windows(self) -> list[tuple[int, int]]:
        first = self.primers + self.warmup
        return [(first + r * self.steps, first + (r + 1) * self.steps) for r in range(self.repeats)]


# ---------------------------------------------------------------------------------------------------------------
# models and batches


def random_batches(config: GPTConfig, n: int, cfg: BenchConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n random SFT-like batches [B, T] in host memory: random tokens and targets, ~30% of targets ignored (-1)."""
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(n):
        shape = (cfg.batch_size, cfg.seq_len)
        inputs = torch.randint(0, config.vocab_size, shape, generator=gen)
        targets = torch.randint(0, config.vocab_size, shape, generator=gen)
        targets[torch.rand(shape, generator=gen) < 0.3] = -1  # unsupervised positions (prompts, padding)
        batches.append((inputs, targets))
    return batches


def default_model_setup(cfg: FinetuneConfig, n: int, device: torch.device):
    """The embedded default model and the first n batches of its real training stream (what `finetune` trains on)."""
    from fractal_vmap.data import make_stream, render_split
    from fractal_vmap.sources import load_model

    config, params, tokenizer = load_model(cfg.model, cfg.tokenizer, device)
    examples, _ = render_split(cfg, tokenizer, config, "train")
    stream = make_stream(cfg, tokenizer, examples, cfg.seed)
    return config, params, [stream.batch(i) for i in range(n)]


def padded_to_one_length(batches: list) -> list:
    """Every batch right-padded to the longest (inputs with 0, targets with -1: no loss changes): one shape."""
    T = max(x.shape[-1] for x, _ in batches)
    return [(F.pad(x, (0, T - x.shape[-1])), F.pad(y, (0, T - y.shape[-1]), value=-1)) for x, y in batches]


def flops_per_token(config: GPTConfig, seq: int) -> int:
    """nanochat's estimate: 6 x non-embedding params + 12 x layers x heads x head_dim x seq (seq: the batch's,
    attention's real span)."""
    non_embedding = sum(math.prod(s) for name, s in param_shapes(config).items() if name != "transformer.wte.weight")
    return 6 * non_embedding + 12 * config.n_layer * config.n_head * config.head_dim * seq


# ---------------------------------------------------------------------------------------------------------------
# the three modes: each builds its state and returns step(i, batch)


def build(
    mode: str,
    cfg: FinetuneConfig,
    config: GPTConfig,
    params: dict,
    lanes: int,
    device: torch.device,
    total: int,
    shared: bool = False,
):
    """The mode's state for `lanes` lanes of `total` steps, and its step(i, batch). sequential with `shared`: one model
    takes all L models' steps (the same work and kernels), for when L full models do not fit in GPU memory."""
    if mode == "sequential":
        if shared:
            models = [ReferenceModel(cfg, config, params, device)] * lanes
        else:
            models = [ReferenceModel(cfg, config, params, device) for _ in range(lanes)]

        def sequential_step(i: int, batch) -> None:  # train_single's step, minus its logging
            for model in models:
                inputs, targets = (t.to(device) for t in batch)  # each run moves its own batch
                loss = model.loss(inputs, targets)
                loss.item()  # finetune reads every loss: one host sync per step
                int((targets != -1).sum())  # and counts the supervised tokens: another
                model.update(i, total, loss)

        return sequential_step
    fast = mode == "fast"
    cfgs = [replace(cfg, run_name=f"lane{i}") for i in range(lanes)]
    row = nanochat_row(
        cfgs,
        config,
        params,
        [total] * lanes,
        device,
        kernels=resolve_kernels("auto", device) if fast else "torch",
        compile=fast,
    )

    def row_step(i: int, batch) -> None:
        lanes_step(row, i, *(to_device(t, device) for t in batch))

    return row_step


def summarize(
    result: dict, lanes: int, plan: Plan, tokens_per_window: list[int], cuda: bool, fpt: int, ceiling: dict
) -> dict:
    """lane-steps/s and tokens/s (the median window on CUDA, the best on CPU), MFU, peak MiB per lane."""
    if result["oom"]:
        return result
    pick = statistics.median if cuda else max
    result["lane_steps_per_s"] = pick(lanes * plan.steps / t for t in result["window_s"])
    result["tokens_per_s"] = pick(lanes * n / t for n, t in zip(tokens_per_window, result["window_s"]))
    result["mfu"] = result["tokens_per_s"] * fpt / (ceiling["tflops"] * 1e12)
    result["peak_mib_per_lane"] = result.pop("peak_bytes") / 2**20 / result.get("models", lanes)
    return result


# ---------------------------------------------------------------------------------------------------------------


def resolve(cfg: BenchConfig, device: torch.device) -> tuple[str, list[int], Plan]:
    """The model kind, the L values and the plan (before primers) that cfg asks for; bad values: one line each."""
    cuda = device.type == "cuda"
    unknown = [m for m in cfg.modes if m not in MODES]
    if unknown or not cfg.modes:
        raise UserError(f"--modes {' '.join(cfg.modes)}: use one or more of {', '.join(MODES)}")
    if cfg.model not in ("auto", "default", "depth"):
        raise UserError(f"--model {cfg.model!r} is not one of auto, default, depth")
    if (
        any(n < 1 for n in cfg.lanes + cfg.depths)
        or min(cfg.warmup, cfg.steps, cfg.batch_size - 1, cfg.seq_len - 2) < 0
        or cfg.repeats < 1
    ):
        raise UserError(
            "--lanes, --depths, --repeats, --batch_size must be >= 1, --seq_len >= 2, --warmup and --steps >= 0"
        )
    if cfg.quick:
        return "default", cfg.lanes or [1, 8], Plan(0, cfg.warmup or 1, cfg.steps or 3, 1)
    model = cfg.model if cfg.model != "auto" else ("depth" if cuda else "default")
    return (
        model,
        cfg.lanes or ([1, 4, 16, 64] if cuda else [1, 2, 4, 8, 16]),
        Plan(0, cfg.warmup or (3 if cuda else 2), cfg.steps or (4 if cuda else 8), cfg.repeats),
    )


def with_primers(batches: list, plan: Plan, limit: int) -> tuple[list, Plan]:
    """One batch of each padded shape first (the compiled step's shapes), then the plan's batches."""
    seen, primers = set(), []
    for x, y in batches:
        shape = (*x.shape[:-1], bucket(x.shape[-1], limit))
        if shape not in seen:
            seen.add(shape)
            primers.append((x, y))
    return primers + batches, replace(plan, primers=len(primers))


def run_bench(cfg: BenchConfig, environment: dict | None = None, say=print) -> dict:
    """Every (model, L, mode) measurement; the report (JSON-ready) is written to cfg.out after each one."""
    from fractal_vmap.machine import tune_allocator

    tune_allocator()  # as every fractal-vmap command does at start, for all modes alike
    device = resolve_device(cfg.device)
    cuda = device.type == "cuda"
    model, lanes_list, plan = resolve(cfg, device)
    out = Path(cfg.out or f"runs/bench/bench-{device_slug(device)}.json")
    if cfg.max_load > 0 and not cuda and not cfg.quick:
        wait_for_quiet(cfg.max_load, say=say)
    env = environment or {
        "device": device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    say(f"bench on [bold]{env['device']}[/bold]: model {model}, lanes {lanes_list}, modes {' '.join(cfg.modes)}")
    ceiling = matmul_ceiling(device)
    report = {
        "benchmark": "bench",
        "device_type": device.type,
        "environment": env,
        "config": asdict(cfg),
        "model": model,
        "matmul_ceiling": ceiling,
        "results": [],
    }
    # finetune's defaults: lr 0.02, matrix + unembedding, bf16 autocast on CUDA
    finetune = FinetuneConfig(device=str(device))
    for name, depth in [("default", None)] if model == "default" else [(f"d{d}", d) for d in cfg.depths]:
        n = plan.warmup + plan.steps * plan.repeats
        if depth is None:
            config, params, batches = default_model_setup(finetune, n, device)
        else:
            config = nanochat_depth(depth, cfg.vocab_size, cfg.context)
            params, batches = init_params(config, seed=0, device=device), random_batches(config, n, cfg)
        batches = padded_to_one_length(batches) if cfg.quick else batches
        tokens_per_window = [sum(batches[s][0].numel() for s in range(i, j)) for i, j in plan.windows()]
        steps, run_plan = with_primers(batches, plan, config.sequence_len * 10)
        # a token's mean context
        seq = round(sum(x.numel() * x.shape[-1] for x, _ in batches) / sum(x.numel() for x, _ in batches))
        fpt = flops_per_token(config, seq)
        say(
            f"[bold]{name}[/bold]: {config}, batch {tuple(batches[0][0].shape)}, {fpt / 1e6:,.1f} MFLOP/token, "
            f"{run_plan.primers} padded shapes"
        )
        for lanes in lanes_list:
            entry = {
                "model": name,
                "config": config.to_dict(),
                "batch": list(batches[0][0].shape),
                "lanes": lanes,
                "flops_per_token": fpt,
                "modes": {},
            }
            for mode in cfg.modes:
                result = measure_mode(
                    mode,
                    finetune,
                    config,
                    params,
                    lanes,
                    device,
                    steps,
                    run_plan,
                    not cfg.quick and cfg.max_load > 0,
                    say,
                )
                entry["modes"][mode] = summarize(result, lanes, run_plan, tokens_per_window, cuda, fpt, ceiling)
            base = entry["modes"].get("sequential", {})
            for result in entry["modes"].values():
                if not result["oom"] and not base.get("oom", True):
                    result["speedup"] = result["lane_steps_per_s"] / base["lane_steps_per_s"]
            report["results"].append(entry)
            say("  " + f"L={lanes}: " + ", ".join(f"{m} {fmt(r)}" for m, r in entry["modes"].items()))
            write_report(report, out)  # after every measurement: a run cut short keeps what it measured
        del params, batches, steps
        free_memory()
    report["out"] = str(out)
    return report


def measure_mode(
    mode: str,
    finetune: FinetuneConfig,
    config: GPTConfig,
    params: dict,
    lanes: int,
    device: torch.device,
    batches: list,
    plan: Plan,
    redo: bool,
    say,
) -> dict:
    """Time the mode, then profile one step of a fresh state. Sequential models that do not fit: one model, L steps."""
    args = (mode, finetune, config, params, lanes, device, len(batches))
    result = time_mode(lambda: build(*args), batches, plan, device, redo, say)
    shared = mode == "sequential" and result["oom"] and lanes > 1
    if shared:
        result = time_mode(lambda: build(*args, shared=True), batches, plan, device, redo, say)
    if result["oom"]:
        return result
    result["models"] = 1 if shared else lanes
    profiled = profile_mode(lambda: build(*args, shared=shared), batches[plan.primers], device)
    result["launches_per_step"] = profiled["launches"]
    result.setdefault("peak_bytes", profiled.get("peak_bytes"))
    if mode == "fast":
        from fractal_vmap.tasks.nanochat import compiled

        result["compiled_shapes"] = len(compiled.shapes_compiled)  # in this process so far: one compile each
    return result


def fmt(result: dict) -> str:
    return "OOM" if result["oom"] else f"{result['lane_steps_per_s']:.1f} lane-steps/s"


COLUMNS = ("model", "L", "mode", "lane-steps/s", "tokens/s", "vs sequential", "MFU", "MiB/lane", "launches/step")


def rows(report: dict) -> list[list[str]]:
    """The report as table rows, one per (model, L, mode)."""
    table = []
    for e in report["results"]:
        for mode, r in e["modes"].items():
            cells = [
                e["model"],
                str(e["lanes"]),
                mode + (" (1 model x L)" if r.get("models", e["lanes"]) != e["lanes"] else ""),
            ]
            if r["oom"]:
                cells += ["OOM"] + ["-"] * 5
            else:
                cells += [
                    f"{r['lane_steps_per_s']:,.2f}",
                    f"{r['tokens_per_s']:,.0f}",
                    f"{r['speedup']:.2f}x" if "speedup" in r else "-",
                    f"{r['mfu']:.1%}",
                    f"{r['peak_mib_per_lane']:,.1f}",
                    str(r["launches_per_step"]),
                ]
            if r.get("contended"):
                cells[2] += " (contended!)"
            table.append(cells)
    return table


def markdown(report: dict) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "| " + " | ".join("---" for _ in COLUMNS) + " |"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows(report)]) + "\n"


def write_report(report: dict, out: Path) -> None:
    from fractal_vmap.files import strict_json, write_atomic

    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, strict_json(report))
    write_atomic(out.with_suffix(".md"), markdown(report))


def print_report(report: dict, console) -> None:
    from rich.table import Table

    pick = "median" if report["device_type"] == "cuda" else "best"
    table = Table(
        title=(
            f"bench on {report['environment']['device']} ({pick} timed window); matmul ceiling "
            f"{report['matmul_ceiling']['tflops']:.2f} TFLOP/s"
        )
    )
    for col in COLUMNS:
        table.add_column(col, justify="left" if col in ("model", "mode") else "right")
    for r in rows(report):
        table.add_row(*r)
    console.print(table)
    console.print(f"results: [bold]{report['out']}[/bold] (markdown table: {Path(report['out']).with_suffix('.md')})")
