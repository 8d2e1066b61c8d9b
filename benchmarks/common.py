"""Shared by the benchmarks: naming the device, keeping CPU timings honest on a shared machine (both from
fractal_vmap/machine.py, which `fractal-vmap bench` uses too), the run's environment, writing JSON."""

import hashlib
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

from fractal_vmap.machine import cpu_model, device_name, device_slug  # noqa: F401 (re-exported for the scripts)
from fractal_vmap.perf.timing import CpuWatch, own_seconds, wait_for_quiet  # noqa: F401 (re-exported for the scripts)

RESULTS_DIR = Path(__file__).parent / "results"


def git_revision() -> str | None:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
        )
    except OSError:
        return None
    return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if rev.returncode == 0 else None


def source_digest() -> str:
    """A hash of the package's sources: others edit the checkout while benchmarks run, so a run checks it did not
    change."""
    import fractal_vmap

    digest = hashlib.sha256()
    for path in sorted(Path(fractal_vmap.__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:12]


def environment(device: torch.device) -> dict:
    return {
        "source_digest": source_digest(),
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "git": git_revision(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_json(data: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def check_unchanged(env: dict, say=print) -> bool:
    """True when the package's sources are the ones the run started with; else a loud warning (and False)."""
    now = source_digest()
    if now == env["source_digest"]:
        return True
    say(
        f"[bold red]fractal_vmap's sources changed during this run ({env['source_digest']} -> {now}): its numbers mix "
        "two versions; run it again[/bold red]"
    )
    env["source_digest_at_end"] = now
    return False
