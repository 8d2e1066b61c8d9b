"""In-process training-step throughput: one vmapped row of L lanes against a Python loop over L single models.

(a) row:  fractal_vmap.lanes.train_lanes itself (vmapped forward, sum-backward, BatchedAdamW + BatchedMuon, the
          grid's real loop with its every-10-steps host sync), timed from inside through its batches callback.
(b) loop: L separate models, each doing per step what `finetune` (train_single) does: forward, loss.item(),
          backward, torch.optim.AdamW + torch.optim.Muon step, zero_grad: what L separate finetune runs do per step.
Same device, same batches, one process. Models: on CPU the embedded default model on its real SFT batches
(float32, as the trainer runs there); on CUDA random-init nanochat models by depth (n_layer = depth,
n_embd = 64 * depth, head_dim 128, vocab 65536, context 2048) on random batches of 8 x 1024, bf16 autocast.

Targets (DESIGN.md section 8): CUDA (H100/H200) row >= 10x the loop for d4-d8, >= 2x for d20; row MFU >= 40%
of the measured bf16 matmul ceiling for d12 and up. CPU: the cores are the limit and the two are close: report.

    uv run python benchmarks/lanes_step.py                                  # CPU, default model
    PYTHONPATH=$PWD python3 benchmarks/lanes_step.py --device cuda           # GPU machine
    PYTHONPATH=$PWD python3 benchmarks/lanes_step.py --device cuda --depths 20 --lanes 1 4 16
"""

import gc
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from simple_parsing import ArgumentParser

sys.path.insert(0, str(Path(__file__).parent))  # `common` beside this file, however the script is started
from common import RESULTS_DIR, CpuWatch, check_unchanged, device_slug, environment, wait_for_quiet, write_json  # noqa: E402

from fractal_vmap.cli import tune_allocator  # noqa: E402
from fractal_vmap.recipe import (  # noqa: E402
    ADAMW_BETAS, ADAMW_EPS, MUON_MOMENTUM, FinetuneConfig, autocast_dtype, group_lrs, resolve_device, trainable_groups,
)
from fractal_vmap.sft import load_source, make_stream, render_split  # noqa: E402
from fractal_vmap.lanes import train_lanes  # noqa: E402
from fractal_vmap.model import GPTConfig, forward, init_params, param_group, param_shapes, rotary_cos_sin  # noqa: E402
from fractal_vmap.optim import lr_multiplier_scalar  # noqa: E402

console = Console(width=None if sys.stdout.isatty() else 160)  # piped output: wide enough for the table


@dataclass
class Options:
    device: str = "auto"  # auto = cuda if available, else cpu
    model: str = "auto"  # default (the embedded model and its data), depth (random-init nanochat by --depths); auto: default on CPU, depth on CUDA
    lanes: list[int] = field(default_factory=list)  # L values; empty = 1 2 4 8 16 on CPU, 1 4 16 64 on CUDA
    depths: list[int] = field(default_factory=lambda: [4, 8, 12, 20])  # nanochat depths, with --model depth
    batch_size: int = 8  # rows of a random batch (nanochat's device_batch_size), with --model depth
    seq_len: int = 1024  # tokens per row of a random batch, with --model depth
    vocab_size: int = 65536  # nanochat's tokenizer, with --model depth
    context: int = 2048  # the model's sequence_len (rotary table), with --model depth
    warmup: int = 0  # untimed steps first (0 = 2 on CPU, 3 on CUDA): first-call imports, allocator, cuBLAS/oneDNN setup
    steps: int = 0  # steps per timed window (0 = 8 on CPU, 4 on CUDA)
    repeats: int = 3  # timed windows per side: best of them on CPU, median on CUDA
    max_load: float = 1.2  # CPU: wait until the 1-minute load average is below this before starting
    out: str = ""  # result JSON (default benchmarks/results/lanes_step-<device>.json)


@dataclass
class Plan:
    warmup: int
    steps: int
    repeats: int

    @property
    def total(self) -> int:  # steps a side runs: warm-up, then the windows back to back
        return self.warmup + self.steps * self.repeats

    def windows(self) -> list[tuple[int, int]]:  # (first step, one past the last) of each timed window
        return [(self.warmup + r * self.steps, self.warmup + (r + 1) * self.steps) for r in range(self.repeats)]


class Marks:
    """Timestamps at step boundaries: CUDA events on the current stream (no host sync), perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self, i: int, j: int) -> float:
        if self.cuda:
            self.marks[j].synchronize()
            return self.marks[i].elapsed_time(self.marks[j]) / 1000  # ms -> s
        return self.marks[j] - self.marks[i]


# ---------------------------------------------------------------------------------------------------------------
# the models and their batches


def nanochat_config(depth: int, opts: Options) -> GPTConfig:
    """nanochat's convention: width 64 per layer, heads of 128 dims (at least one head), no GQA."""
    n_embd = depth * 64
    n_head = max(1, (n_embd + 127) // 128)
    return GPTConfig(sequence_len=opts.context, vocab_size=opts.vocab_size, n_layer=depth, n_head=n_head, n_kv_head=n_head, n_embd=n_embd)


# Batches stay in host memory, as the SFT stream yields them: each side moves them to the device the way its trainer does.


def random_batches(config: GPTConfig, n: int, opts: Options) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n random SFT-like batches [B, T]: random tokens, random targets, ~30% of them ignored (-1)."""
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(n):
        shape = (opts.batch_size, opts.seq_len)
        inputs = torch.randint(0, config.vocab_size, shape, generator=gen)
        targets = torch.randint(0, config.vocab_size, shape, generator=gen)
        targets[torch.rand(shape, generator=gen) < 0.3] = -1  # unsupervised positions (prompts, padding)
        batches.append((inputs, targets))
    return batches


def default_model_setup(cfg: FinetuneConfig, n: int, device: torch.device):
    """The embedded default model and the first n batches of its real training stream (what `finetune` trains on)."""
    config, params, tokenizer = load_source(cfg, device)
    examples, _ = render_split(cfg, tokenizer, config, "train")
    stream = make_stream(cfg, tokenizer, examples, cfg.seed)
    return config, params, [stream.batch(i) for i in range(n)]


def flops_per_token(config: GPTConfig, seq: int) -> int:
    """DESIGN.md: 6 x non-embedding params + 12 x layers x heads x head_dim x seq (seq: the batch's, attention's real span)."""
    non_embedding = sum(math.prod(s) for name, s in param_shapes(config).items() if name != "transformer.wte.weight")
    return 6 * non_embedding + 12 * config.n_layer * config.n_head * config.head_dim * seq


def matmul_ceiling(device: torch.device) -> dict:
    """Measured matmul throughput: bf16 8192^3 on CUDA; float32 2048^3 on CPU (the CPU trainer runs in float32)."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (2048, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):  # warm-up: cuBLAS/oneDNN heuristics, clocks
        torch.mm(a, b)
    marks, iters = Marks(device), (20 if device.type == "cuda" else 5)
    marks.mark()
    for _ in range(iters):
        torch.mm(a, b)
    marks.mark()
    seconds = marks.seconds(0, 1) / iters
    return {"n": n, "dtype": str(dtype), "tflops": 2 * n**3 / seconds / 1e12}


# ---------------------------------------------------------------------------------------------------------------
# the two sides


def time_row(cfg: FinetuneConfig, config: GPTConfig, params: dict, batches: list, lanes: int, device: torch.device, plan: Plan) -> Marks:
    """The grid's own trainer on one row of `lanes` lanes; a mark at the start of every step (its batches callback)."""
    marks = Marks(device)

    def timed_batches(step: int):
        marks.mark()  # step boundary: everything of the previous step has been issued
        return batches[step]

    cfgs = [replace(cfg, run_name=f"lane{i}") for i in range(lanes)]
    train_lanes(cfgs, config, params, timed_batches, [plan.total + 1] * lanes, device)  # +1: its first call marks the end of the last window
    if len(marks.marks) != plan.total + 1:
        raise RuntimeError("every lane diverged before the timed steps ended: the timings would be short; lower the learning rate")
    return marks


def single_model(cfg: FinetuneConfig, config: GPTConfig, params: dict, device: torch.device):
    """One model as train_single sets it up: its own copy of every weight, torch.optim AdamW + Muon on the trainable groups."""
    groups, lrs = trainable_groups(cfg), group_lrs(cfg, config)
    params = {k: v.detach().clone().to(device) for k, v in params.items()}
    by_group = {g: [p.requires_grad_(True) for k, p in params.items() if param_group(k) == g] for g in groups}
    optimizers = []
    adamw_groups = [{"params": by_group[g], "lr": lrs[g], "initial_lr": lrs[g]} for g in ("embedding", "unembedding") if g in groups]
    if adamw_groups:
        optimizers.append(torch.optim.AdamW(adamw_groups, betas=ADAMW_BETAS, eps=ADAMW_EPS, weight_decay=cfg.weight_decay))
    if "matrix" in groups:
        muon_group = {"params": by_group["matrix"], "lr": lrs["matrix"], "initial_lr": lrs["matrix"]}
        optimizers.append(torch.optim.Muon([muon_group], momentum=MUON_MOMENTUM, nesterov=True, weight_decay=0.0))
    return params, optimizers


def finetune_step(params, optimizers, batch, config, cos_sin, amp, mult: float, device: torch.device) -> None:
    """One step of train_single's loop, minus its logging."""
    inputs, targets = (t.to(device) for t in batch)  # each run moves its own batch
    with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        loss = forward(params, inputs, config, cos_sin, targets)
    loss.item()  # finetune reads every loss: one host sync per step
    int((targets != -1).sum())  # and counts the supervised tokens: another
    loss.backward()
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * mult
        opt.step()
        opt.zero_grad(set_to_none=True)


def time_loop(cfg: FinetuneConfig, config: GPTConfig, params: dict, batches: list, lanes: int, device: torch.device, plan: Plan, shared: bool = False) -> Marks:
    """L single models stepped one after another every step. With `shared`, one model takes all L steps: the same work
    and kernels, for when L full models (weights + optimizer state each) do not fit in GPU memory."""
    models = [single_model(cfg, config, params, device)] * lanes if shared else [single_model(cfg, config, params, device) for _ in range(lanes)]
    cos_sin, amp = rotary_cos_sin(config, device), autocast_dtype(cfg, device)
    marks = Marks(device)
    for step in range(plan.total):
        marks.mark()
        mult = lr_multiplier_scalar(step, plan.total, cfg.warmup_frac, cfg.final_lr_frac)
        for model_params, optimizers in models:
            finetune_step(model_params, optimizers, batches[step], config, cos_sin, amp, mult, device)
    marks.mark()
    return marks


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure(side, plan: Plan, device: torch.device) -> dict:
    """Run one side (a function returning its Marks) and time its windows; on CPU redo it (up to 3 times) when
    another process took the cores meanwhile. A side that runs out of GPU memory is reported as such."""
    for attempt in range(3):
        free_memory()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        oom = False
        try:
            with CpuWatch() as watch:
                marks = side()
        except torch.OutOfMemoryError:
            oom = True  # freed below, once the exception (and the frames it holds) is gone
        if oom:
            free_memory()
            return {"oom": True}
        result = {"oom": False, "foreign_cpu": round(watch.foreign, 3), "contended": watch.contended}
        result["window_s"] = [marks.seconds(i, j) for i, j in plan.windows()]
        if device.type == "cuda":
            result["peak_gib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**30  # above the shared base model and batches
        if device.type != "cpu" or not watch.contended or attempt == 2:
            return result
        console.print(f"[yellow]another process used {watch.foreign:.0%} of the cores during that measurement: redoing it[/yellow]")
        wait_for_quiet(check_load=False, say=console.print)
    return result


def summarize(side: dict, lanes: int, plan: Plan, tokens_per_window: list[int], cuda: bool) -> dict:
    """lane-steps/s and tokens/s: the median window on CUDA, the best one on CPU."""
    if side["oom"]:
        return side
    lane_steps = [lanes * plan.steps / t for t in side["window_s"]]
    tokens = [lanes * n / t for n, t in zip(tokens_per_window, side["window_s"])]
    pick = statistics.median if cuda else max
    return {**side, "lane_steps_per_s": pick(lane_steps), "tokens_per_s": pick(tokens)}


# ---------------------------------------------------------------------------------------------------------------


def main(opts: Options) -> None:
    tune_allocator()  # as the fractal-vmap command does at start, for both sides alike
    device = resolve_device(opts.device)
    cuda = device.type == "cuda"
    model = opts.model if opts.model != "auto" else ("depth" if cuda else "default")
    lanes_list = opts.lanes or ([1, 4, 16, 64] if cuda else [1, 2, 4, 8, 16])
    plan = Plan(opts.warmup or (3 if cuda else 2), opts.steps or (4 if cuda else 8), opts.repeats)
    if not cuda:
        wait_for_quiet(opts.max_load, say=console.print)
    env = environment(device)
    console.print(f"lanes_step on [bold]{env['device']}[/bold] (torch {env['torch']}), model {model}, lanes {lanes_list}, "
                  f"{plan.warmup} warm-up steps then {plan.repeats} windows of {plan.steps} steps per side")
    ceiling = matmul_ceiling(device)
    console.print(f"matmul ceiling: {ceiling['tflops']:.2f} TFLOP/s ({ceiling['dtype']} {ceiling['n']}^3)")
    path = Path(opts.out) if opts.out else RESULTS_DIR / f"lanes_step-{device_slug(device)}.json"
    report = {"benchmark": "lanes_step", "environment": env, "options": asdict(opts), "model": model, "plan": asdict(plan),
              "matmul_ceiling": ceiling, "results": []}

    cfg = FinetuneConfig(device=str(device))  # finetune's defaults: lr 0.02, matrix + unembedding trainable, bf16 autocast on CUDA
    setups = [("default", None)] if model == "default" else [(f"d{d}", d) for d in opts.depths]
    for name, depth in setups:
        if depth is None:
            config, params, batches = default_model_setup(cfg, plan.total + 1, device)
        else:
            config = nanochat_config(depth, opts)
            params = init_params(config, seed=0, device=device)
            batches = random_batches(config, plan.total + 1, opts)
        tokens_per_window = [sum(batches[s][0].numel() for s in range(i, j)) for i, j in plan.windows()]
        seq = round(sum(x.numel() * x.shape[-1] for x, _ in batches) / sum(x.numel() for x, _ in batches))  # a token's mean sequence length
        fpt = flops_per_token(config, seq)
        console.print(f"[bold]{name}[/bold]: {config}, batch {tuple(batches[0][0].shape)}, {fpt / 1e6:,.1f} MFLOP/token")
        for lanes in lanes_list:
            args = (cfg, config, params, batches, lanes, device, plan)
            row = measure(lambda: time_row(*args), plan, device)
            loop = {**measure(lambda: time_loop(*args), plan, device), "models": lanes}
            if loop["oom"] and lanes > 1:  # L separate models do not fit: one model doing all L models' steps
                loop = {**measure(lambda: time_loop(*args, shared=True), plan, device), "models": 1}
            row, loop = (summarize(side, lanes, plan, tokens_per_window, cuda) for side in (row, loop))
            entry = {"model": name, "config": config.to_dict(), "batch": list(batches[0][0].shape), "lanes": lanes, "flops_per_token": fpt,
                     "row": row, "loop": loop}
            if not row["oom"]:
                row["mfu"] = row["tokens_per_s"] * fpt / (ceiling["tflops"] * 1e12)
            if not row["oom"] and not loop["oom"]:
                entry["ratio"] = row["lane_steps_per_s"] / loop["lane_steps_per_s"]
            report["results"].append(entry)
            ratio = f"{entry['ratio']:.2f}x" if "ratio" in entry else "-"
            console.print(f"  L={lanes}: row {fmt_side(row)}, loop {fmt_side(loop)}, ratio {ratio}")
            write_json(report, path)  # after every measurement, so a run cut short keeps what it measured
        del params, batches
        free_memory()
    report["sources_unchanged"] = check_unchanged(env, console.print)
    write_json(report, path)
    console.print(results_table(report, cuda))
    console.print(f"results: [bold]{path}[/bold]")


def fmt_side(side: dict) -> str:
    return "OOM" if side["oom"] else f"{side['lane_steps_per_s']:.1f} lane-steps/s"


def results_table(report: dict, cuda: bool) -> Table:
    pick = "median" if cuda else "best"
    table = Table(title=f"lanes_step: vmapped row vs loop of single models, {report['environment']['device']} ({pick} of {report['plan']['repeats']} windows)")
    for col in ("model", "L", "row lane-steps/s", "loop lane-steps/s", "row tok/s", "loop tok/s", "ratio", "row MFU"):
        table.add_column(col, justify="left" if col == "model" else "right")
    if cuda:
        table.add_column("row GiB/lane", justify="right")
        table.add_column("loop GiB/model", justify="right")
    for e in report["results"]:
        row, loop = e["row"], e["loop"]
        cells = [e["model"], str(e["lanes"])]
        cells += ["OOM" if s["oom"] else f"{s['lane_steps_per_s']:,.2f}" for s in (row, loop)]
        cells += ["OOM" if s["oom"] else f"{s['tokens_per_s']:,.0f}" for s in (row, loop)]
        cells.append(f"{e['ratio']:.2f}x" if "ratio" in e else "-")
        cells.append("-" if row["oom"] else f"{row['mfu']:.1%}")
        if cuda:
            cells.append("-" if row["oom"] else f"{row['peak_gib'] / e['lanes']:.2f}")
            cells.append("-" if loop["oom"] else f"{loop['peak_gib'] / loop['models']:.2f}" + ("" if loop["models"] == e["lanes"] else " (1 model x L)"))
        if row.get("contended") or loop.get("contended"):
            cells[0] += " (contended!)"
        table.add_row(*cells)
    return table


if __name__ == "__main__":
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_arguments(Options, dest="opts")
    main(parser.parse_args().opts)
