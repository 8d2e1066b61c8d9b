"""The machine a measurement ran on, and keeping CPU timings honest on a shared machine (bench.py, benchmarks/).

On a small shared CPU (2 cores here) a timing taken while another process runs is worthless: both fight for
the cores and OpenMP oversubscription makes it far worse than 2x. So a benchmark first waits for a quiet
machine (1-minute load average below a threshold), and every measurement is wrapped in `CpuWatch`, which
counts the CPU seconds that *other* processes used meanwhile (machine-wide busy time from /proc/stat minus
our own and our children's). A measurement where others took more than FOREIGN_MAX of the cores is redone
after the machine is quiet again, and is flagged in the results if it never was.
"""

import os
import platform
import re
import resource
import time
from pathlib import Path

import torch

FOREIGN_MAX = 0.05  # other processes may use at most 5% of the cores during a measurement (idle background: ~1%)
PROBE_S = 3.0  # seconds of sleeping while we watch whether someone else is busy


def cpu_model() -> str:
    """platform.processor() is empty on many Linux boxes; /proc/cpuinfo has the marketing name."""
    name = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if not name and cpuinfo.exists():
        name = next(
            (
                line.split(":", 1)[1].strip()
                for line in cpuinfo.read_text().splitlines()
                if line.startswith("model name")
            ),
            "",
        )
    return name or platform.machine() or "cpu"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def device_slug(device: torch.device) -> str:
    """A file-name-safe device name: e.g. cpu-2core, nvidia-h100-80gb-hbm3."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{os.cpu_count()}core"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


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
                f"[yellow]load average {load:.2f} >= {max_load}: someone else is using the CPU, waiting {poll_s:.0f}s[/yellow]"
            )
            time.sleep(poll_s)
            continue
        with CpuWatch() as probe:
            time.sleep(PROBE_S)
        if not probe.contended:
            return
        say(f"[yellow]other processes use {probe.foreign:.0%} of the cores: waiting {poll_s:.0f}s[/yellow]")
        time.sleep(poll_s)
