"""A grid's run directory: grid.json (the spec, its digest, the environment) and rows/row_XXXX.json (one per finished
row, written atomically, each carrying the digest of the spec it was trained under and the device and torch thread
count it ran with; a refined grid's level is rows/row_XXXX.npz, its cells as columns: analysis/runs.py).

Rerunning the same command resumes: finished rows whose digest matches are kept. Another spec in the same dir is
refused, naming what differs; a row file of another spec is never reused. The thread count is not part of the spec
(a grid may resume on another machine), but it is part of what a row is: on some CPUs (Intel with MKL) a matmul sums
its reduction in per-thread parts, so a row trained at 1 thread and at 2 differs by rounding. A resume that would mix
thread counts or devices says so in one line (`mixed_rows_note`) and goes on.
"""

import hashlib
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

from fractal_vmap.analysis.runs import Table, level_table, pack_level, read_header, read_level, row_lanes
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


def device_label(device: torch.device) -> str:
    """What a row ran on: the GPU's name, or the CPU's model name."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def this_machine(device: torch.device) -> tuple[str, int]:
    """(device, torch threads) of this process: what its rows record."""
    return device_label(device), torch.get_num_threads()


def git_revision() -> str | None:
    """The package checkout's commit (with -dirty for uncommitted changes), or None when not run from a checkout."""
    root = Path(__file__).resolve().parents[2]  # the checkout: fractal_vmap/grid/rundir.py
    if not (root / ".git").exists():
        return None

    def run(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=False)

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
            f"{run_dir} holds a grid with another spec ({'; '.join(diffs[:MAX_DIFFS])}{more}): pass a new --run_dir or "
            "rerun the same command"
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


def unit_header(k: int, digest: str, seconds: float, lane_chunk: int, device: torch.device, rank: int) -> dict:
    """What every finished unit's file records (a row file's record, a level file's header): its spec, time, lane
    chunk, the device and torch threads it ran with, and who wrote it."""
    name, threads = this_machine(device)
    return {
        "row": k,
        "complete": True,
        "spec_digest": digest,
        "seconds": seconds,
        "lane_chunk": lane_chunk,
        "threads": threads,
        "device": name,
        "host": platform.node(),
        "pid": os.getpid(),
        "rank": rank,
    }


def write_row(
    path: Path,
    i: int,
    digest: str,
    lanes: list[dict],
    seconds: float,
    lane_chunk: int,
    device: torch.device,
    rank: int = 0,
) -> list[dict]:
    """The row's file, atomically, with the device and torch thread count it ran with (a row's numbers may depend on
    them: module docstring); `lane_chunk` and the worker's `rank` are recorded too (neither changes a number, see
    lanes.py and shard.py). Returns the lanes as a resumed run reads them back (read_row: NaN is null)."""
    record = {**unit_header(i, digest, seconds, lane_chunk, device, rank), "lanes": lanes}
    text = strict_json(record, indent=None)
    write_atomic(path, text)
    return row_lanes(json.loads(text))


def write_level(
    path: Path, k: int, digest: str, table: Table, seconds: float, lane_chunk: int, device: torch.device
) -> Table:
    """A refined grid's level k as its compact file (analysis/runs.py: columns, the header as a row file's),
    atomically; returns its table as a resumed run reads it back (read_level)."""
    header = unit_header(k, digest, seconds, lane_chunk, device, 0)
    write_atomic(path, pack_level(header, table))
    header, table = read_level(path, digest)  # what a resume reads: curves dropped where large
    return level_table(header, table)


def describe_machine(machine: tuple[str, int | None], with_device: bool) -> str:
    """ "2 threads", "1 thread on Intel(R) Xeon(R) ...", or a GPU's name (threads None)."""
    name, threads = machine
    if threads is None:
        return name
    count = f"{threads} thread{'s' if threads != 1 else ''}"
    return f"{count} on {name}" if with_device else count


def mixed_rows_note(run_dir: Path, digest: str, units: int, machines: set[tuple[str, int]], cuda: bool) -> str | None:
    """One line when the rows left to train would run on another device or thread count than the finished ones (or
    than each other: `machines` holds every worker's (device, threads)), else None. On CUDA the CPU threads change no
    number, so only the GPU's name counts. Rows written before threads were recorded are left out of the comparison."""
    key = (lambda m: (m[0], None)) if cuda else (lambda m: m)
    finished: dict[tuple, int] = {}
    valid = 0
    for i in range(units):  # a unit is a row, or a refined grid's level (pipeline.py)
        record = read_header(run_dir, i, digest)
        valid += record is not None
        if record is not None and "threads" in record:
            machine = key((record["device"], record["threads"]))
            finished[machine] = finished.get(machine, 0) + 1
    left, now = units - valid, {key(m) for m in machines}
    if not left or len(set(finished) | now) == 1:
        return None
    with_device = len({name for name, _ in set(finished) | now}) > 1
    new = " and ".join(describe_machine(m, with_device) for m in sorted(now, key=str))
    if finished:
        old = " and ".join(
            f"{describe_machine(m, with_device)}{f' ({n})' if len(finished) > 1 else ''}"
            for m, n in sorted(finished.items(), key=lambda kv: str(kv[0]))
        )
        n = sum(finished.values())
        what = (
            f"{n} finished row{'s' if n != 1 else ''} of {run_dir} ran at {old}, "
            f"the {left} row{'s' if left != 1 else ''} left train{'s' if left == 1 else ''} at {new}"
        )
    else:
        what = f"the workers train the rows of {run_dir} at {new}"
    why = (
        "another GPU may round a matmul otherwise"
        if cuda
        else "on some CPUs (Intel with MKL) another thread count or CPU rounds a matmul otherwise"
    )
    hint = ""
    if not cuda and not with_device and len({t for _, t in finished}) == 1:
        hint = f"; to train them alike, resume with OMP_NUM_THREADS={next(iter(finished))[1]}"
    others = "the others" if finished else "each other"
    return (
        f"{what}: {why}, so these rows may differ from {others} by rounding, which near the trainability "
        f"boundary grows to O(1) (compare their labels, not their losses){hint}"
    )
