"""How bench.py measures a training step: timestamps at step boundaries, the device's matmul rate, a mode's timed
windows (redone when another process took the CPU meanwhile), and one profiled step (kernel launches, peak memory).

Keeping CPU timings honest on a shared machine (bench.py, benchmarks/): on a small shared CPU (2 cores here) a timing
taken while another process runs is worthless: both fight for the cores and OpenMP oversubscription makes it far worse
than 2x. So a benchmark first waits for a quiet machine (1-minute load average below a threshold), and every
measurement is wrapped in `CpuWatch`, which counts the CPU seconds that *other* processes used meanwhile (machine-wide
busy time from /proc/stat minus our own and our children's). A measurement where others took more than FOREIGN_MAX of
the cores is redone after the machine is quiet again, and is flagged in the results if it never was.
"""

import gc
import os
import resource
import time
from collections import Counter
from pathlib import Path

import torch

# ops that launch no work: views, metadata, allocations (a leaf `to`/`contiguous` is a no-op: the copy is its child)
NO_WORK = {
    f"aten::{n}"
    for n in (
        "view",
        "_unsafe_view",
        "reshape",
        "_reshape_alias",
        "as_strided",
        "transpose",
        "t",
        "permute",
        "expand",
        "unsqueeze",
        "squeeze",
        "slice",
        "select",
        "detach",
        "alias",
        "unbind",
        "split",
        "split_with_sizes",
        "chunk",
        "narrow",
        "movedim",
        "view_as",
        "lift_fresh",
        "empty",
        "empty_strided",
        "empty_like",
        "new_empty",
        "resolve_conj",
        "resolve_neg",
        "to",
        "contiguous",
        "_local_scalar_dense",
        "item",
    )
}


class Marks:
    """Timestamps at step boundaries: CUDA events on the current stream (no host sync), perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            self.marks.append(torch.cuda.Event(enable_timing=True))
            self.marks[-1].record()
        else:
            self.marks.append(time.perf_counter())

    def seconds(self, i: int, j: int) -> float:
        if self.cuda:
            self.marks[j].synchronize()
            return self.marks[i].elapsed_time(self.marks[j]) / 1000  # ms -> s
        return self.marks[j] - self.marks[i]


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
    return {"n": n, "dtype": str(dtype), "tflops": 2 * n**3 / (marks.seconds(0, 1) / iters) / 1e12}


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def time_mode(make_step, batches: list, plan, device: torch.device, redo: bool, say) -> dict:
    """Build the mode and run it over `batches`, a mark at every step; the timed windows' seconds. On CPU, with `redo`,
    a measurement during which others used the cores is redone (up to 3 times). Out of GPU memory: {"oom": True}."""
    for attempt in range(3):
        free_memory()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        try:
            with CpuWatch() as watch:
                step, marks = make_step(), Marks(device)
                for i, batch in enumerate(batches):
                    marks.mark()
                    step(i, batch)
                marks.mark()
                windows = [marks.seconds(i, j) for i, j in plan.windows()]  # (on CUDA this waits for the last step)
        except torch.OutOfMemoryError:
            step = marks = None
            free_memory()
            return {"oom": True}
        result = {
            "oom": False,
            "window_s": windows,
            "foreign_cpu": round(watch.foreign, 3),
            "contended": watch.contended,
            "first_steps_s": marks.seconds(0, plan.primers + plan.warmup),
        }  # primers + warm-up: includes compiling, for fast
        if device.type == "cuda":
            result["peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
        if not (redo and device.type == "cpu" and watch.contended) or attempt == 2:
            return result
        say(f"[yellow]other processes used {watch.foreign:.0%} of the cores meanwhile: redoing it[/yellow]")
        wait_for_quiet(check_load=False, say=say)
    return result


def profile_mode(make_step, batch, device: torch.device) -> dict:
    """The launches of one steady step (the second) of a fresh state under torch.profiler (compiled graphs are
    reused); on CPU also the peak of the allocations made while building the state and running both steps."""
    from torch.profiler import ProfilerActivity, profile, record_function

    # Kineto (the profiler's C++ side) logs every start and stop to stderr ("USDT: ... profiler_start"), and without
    # a GPU an ERROR line about the GPU count; it reads its level when a profile starts: 6 silences them (a user's wins)
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    cuda = device.type == "cuda"
    if cuda:
        step = make_step()
        step(0, batch)
        torch.cuda.synchronize(device)  # none of its kernels in the profile
    with profile(
        activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []), profile_memory=not cuda
    ) as prof:
        if not cuda:
            step = make_step()
            step(0, batch)
        with record_function("bench_step"):
            step(1, batch)
        if cuda:
            torch.cuda.synchronize(device)
    out = {"launches": count_launches(prof, cuda), "launches_by_name": launches(prof, cuda)}
    if not cuda:
        memory = sorted(
            (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
        )
        total = peak = 0
        for _, nbytes in memory:
            total += nbytes
            peak = max(peak, total)
        out["peak_bytes"] = peak
    return out


def count_launches(prof, cuda: bool) -> int:
    return sum(launches(prof, cuda).values())


def launches(prof, cuda: bool) -> Counter:
    """Launches by name. CUDA: the kernels (and copies/fills) the GPU ran in the profiled step. CPU: under the
    `bench_step` mark, aten ops without aten children that do work, plus Inductor's fused C++ kernels (compiled.py
    turns on their profiler events). On CPU an op may do its work itself at one size and through child ops at another
    (cat, zero_): the CPU count is the ops' count, not an exact kernel count."""
    if cuda:
        return Counter(e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    [root] = [e for e in prof.events() if e.name == "bench_step"]
    counts, stack = Counter(), list(root.cpu_children)
    while stack:
        e = stack.pop()
        children = list(e.cpu_children)
        if e.name.startswith("graph_") and "cpp_" in e.name:
            counts[e.name] += 1
        elif (
            e.name.startswith("aten::")
            and e.name not in NO_WORK
            and not any(c.name.startswith("aten::") for c in children)
        ):
            counts[e.name] += 1
        stack += children
    return counts


FOREIGN_MAX = 0.05  # other processes may use at most 5% of the cores during a measurement (idle background: ~1%)


PROBE_S = 3.0  # seconds of sleeping while we watch whether someone else is busy


def busy_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy since boot, all cores together (None off Linux)."""
    stat = Path("/proc/stat")
    if not stat.exists():
        return None
    user, nice, system, _idle, _iowait, irq, softirq = map(int, stat.read_text().split("\n", 1)[0].split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def own_seconds() -> float:
    """CPU seconds used by this process and by the children it has waited for."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


class CpuWatch:
    """`with CpuWatch() as w: ...` then w.wall_s, and w.foreign: the share of all cores that other processes used."""

    def __enter__(self):
        self.t0, self.busy0, self.own0 = time.perf_counter(), busy_seconds(), own_seconds()
        return self

    def __exit__(self, *exc):
        self.wall_s = time.perf_counter() - self.t0
        busy1 = busy_seconds()
        if self.busy0 is None or busy1 is None:
            self.foreign = 0.0
            return False
        others = (busy1 - self.busy0) - (own_seconds() - self.own0)
        self.foreign = max(0.0, others) / (max(self.wall_s, 1e-9) * (os.cpu_count() or 1))
        return False

    @property
    def contended(self) -> bool:
        return self.foreign > FOREIGN_MAX


def wait_for_quiet(max_load: float = 1.2, poll_s: float = 30.0, check_load: bool = True, say=print) -> None:
    """Block until nobody else uses the CPU: the 1-minute load average below max_load (with check_load; our own
    previous measurement keeps it high for a minute, so later checks skip it) and, over a short probe while
    we sleep, other processes using under FOREIGN_MAX of the cores."""
    while True:
        load = os.getloadavg()[0]
        if check_load and load >= max_load:
            say(
                f"[yellow]load average {load:.2f} >= {max_load}: someone else is using the CPU, waiting "
                f"{poll_s:.0f}s[/yellow]"
            )
            time.sleep(poll_s)
            continue
        with CpuWatch() as probe:
            time.sleep(PROBE_S)
        if not probe.contended:
            return
        say(f"[yellow]other processes use {probe.foreign:.0%} of the cores: waiting {poll_s:.0f}s[/yellow]")
        time.sleep(poll_s)
