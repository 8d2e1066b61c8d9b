"""A grid's run directory: grid.json (the spec, its digest, the environment) and rows/row_XXXX.json (one per finished
row, written atomically, each carrying the digest of the spec it was trained under).

Rerunning the same command resumes: finished rows whose digest matches are kept. Another spec in the same dir is
refused, naming what differs; a row file of another spec is never reused.
"""

import hashlib
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

from fractal_vmap.console import console
from fractal_vmap.errors import UserError
from fractal_vmap.files import check_writable_dir, read_json_object, remove_stale_temps, strict_json, write_atomic
from fractal_vmap.machine import cpu_model

MAX_DIFFS = 4  # differing spec fields named in a refusal


def spec_digest(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}: the dotted field names a refusal message shows."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def describe(value) -> str:
    if isinstance(value, list):
        return (
            f"[{len(value)} values {value[0]:g}..{value[-1]:g}]"
            if value and all(isinstance(v, float | int) for v in value)
            else f"{len(value)} values"
        )
    return repr(value)


def spec_diff(old: dict, new: dict) -> list[str]:
    """'field: old -> new' for every field that differs, dotted names, sorted."""
    a, b = flatten(old), flatten(new)
    return [
        f"{k}: {describe(a.get(k))} -> {describe(b.get(k))}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
    ]


def git_revision() -> str | None:
    """The package checkout's commit (with -dirty for uncommitted changes), or None when not run from a checkout."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    # noqa: E731
    run = lambda *args: subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=False)
    head = run("rev-parse", "HEAD")
    if head.returncode != 0:
        return None
    dirty = run("status", "--porcelain", "--untracked-files=no").stdout.strip()
    return head.stdout.strip() + ("-dirty" if dirty else "")


def environment(device: torch.device) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("fractal-vmap")
    except PackageNotFoundError:  # run from a checkout on PYTHONPATH (the GPU machines)
        ours = "checkout"
    return {
        "fractal_vmap": ours,
        "git_revision": git_revision(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpu_model": cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def default_run_dir(spec: dict, rows_axis: str, cols_axis: str) -> Path:
    return Path(f"runs/grid-{rows_axis}-{cols_axis}-{spec_digest(spec)[:10]}")


def check_run_dir(run_dir: Path, spec: dict) -> None:
    """Refuse, before any work, a run dir we could not write or whose grid.json is unreadable or of another spec."""
    check_writable_dir(run_dir, "--run_dir")
    grid_json = run_dir / "grid.json"
    if not grid_json.exists():
        return
    fix = f"move {run_dir} away or pass another --run_dir (deleting grid.json alone would relabel its rows)"
    old = read_json_object(grid_json, "the grid's spec", fix)
    if "spec" not in old:
        raise UserError(f"{grid_json} has no spec: it is not a fractal-vmap grid.json; {fix}")
    diffs = spec_diff(old["spec"], json.loads(json.dumps(spec)))
    if diffs:
        more = f" and {len(diffs) - MAX_DIFFS} more" if len(diffs) > MAX_DIFFS else ""
        raise UserError(
            f"{run_dir} holds a grid with another spec ({'; '.join(diffs[:MAX_DIFFS])}{more}): pass a new --run_dir or rerun the same command"
        )


def open_run_dir(run_dir: Path, spec: dict, device: torch.device, data: dict) -> str:
    """Create the run dir with grid.json, or reopen it (check_run_dir has passed). Returns the spec's digest."""
    digest = spec_digest(spec)
    (run_dir / "rows").mkdir(parents=True, exist_ok=True)
    stale = remove_stale_temps(run_dir) + remove_stale_temps(run_dir / "rows")  # the lock is held: no other writer's
    if stale:
        console.print(
            f"removed {stale} temp file{'s' if stale > 1 else ''} an interrupted write left in {run_dir}",
            highlight=False,
            soft_wrap=True,
        )
    if not (run_dir / "grid.json").exists():
        write_atomic(
            run_dir / "grid.json",
            strict_json({"spec": spec, "digest": digest, "environment": environment(device), "data": data}),
        )
    return digest


def write_row(
    path: Path, i: int, digest: str, lanes: list[dict], seconds: float, lane_chunk: int, rank: int = 0
) -> None:
    """The row's file, atomically; `lane_chunk` and the worker's `rank` are recorded (neither changes a number, see
    lanes.py and shard.py)."""
    record = {
        "row": i,
        "complete": True,
        "spec_digest": digest,
        "seconds": seconds,
        "lane_chunk": lane_chunk,
        "host": platform.node(),
        "pid": os.getpid(),
        "rank": rank,
        "lanes": lanes,
    }
    write_atomic(path, strict_json(record, indent=None))
