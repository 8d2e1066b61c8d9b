"""A grid's rows over two CPU workers (gloo), as real processes: the merged grid equals one process's bit for bit at the
workers' thread count, every row file records the threads and device it ran with, both workers claim rows, a worker
or the whole grid SIGKILLed loses only unfinished rows, Ctrl-C stops cleanly, a second grid on a run dir in use is
refused, and a resume at another thread count says so once and goes on. Rows here are 12-18 steps of 2 lanes, so the
kills land inside a row.

Each of 2 workers gets cores / 2 threads (torchrun: 1), one process all cores, and on some CPUs (Intel with MKL) a
matmul rounds otherwise at another thread count: so the one-process reference runs with OMP_NUM_THREADS set to what
each worker gets, and no comparison here is across thread counts."""

import json
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from fractal_vmap.grid.rundir import cpu_model, mixed_rows_note
from fractal_vmap.grid.shard import cpu_cores

# 4 rows (num_tokens 800..1200: 12-18 steps) x 2 lanes (lr 0.01, 1): a row takes seconds, so 2 workers share the rows
GRID = [
    "grid",
    "--wandb",
    "disabled",
    "--device",
    "cpu",
    "--rows",
    "4",
    "--cols",
    "2",
    "--row_min",
    "800",
    "--row_max",
    "1200",
    "--col_min",
    "0.01",
    "--col_max",
    "1",
]
ROWS = [f"row_{i:04d}.json" for i in range(4)]
SCRIPT = Path(__file__).parent.parent / "scripts" / "slurm_grid.sh"


def env(threads: int | None = None) -> dict:
    """The session's environment (its FRACTAL_STORAGE_DIR: the default model), wide lines, OMP_NUM_THREADS if given."""
    return {**os.environ, "COLUMNS": "200", **({"OMP_NUM_THREADS": str(threads)} if threads else {})}


def worker_threads(torchrun: bool = False) -> int:
    """The torch threads each of 2 CPU workers gets: an OMP_NUM_THREADS already set, else cores / 2 from `--workers 2`
    (shard.launch), 1 from torchrun."""
    if os.environ.get("OMP_NUM_THREADS"):
        return int(os.environ["OMP_NUM_THREADS"])
    return 1 if torchrun else max(1, cpu_cores() // 2)


def grid_argv(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fractal_vmap", *GRID, "--run_dir", str(run_dir), *extra]


def start(argv: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=kwargs.pop("env", env()), **kwargs
    )


def finish(proc: subprocess.Popen, returncode: int = 0) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == returncode, out
    return out


def wait_for_row(run_dir: Path, proc: subprocess.Popen, timeout: float = 300) -> Path:
    """The first row file to appear."""
    deadline = time.monotonic() + timeout
    while not (run_dir / "rows").is_dir() or not (done := sorted((run_dir / "rows").glob("row_*.json"))):
        assert proc.poll() is None, f"grid ended before a row file appeared: {proc.stdout.read()}"
        assert time.monotonic() < deadline, "no row file appeared"
        time.sleep(0.02)
    return done[0]


def rows(run_dir: Path) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted((run_dir / "rows").glob("row_*.json"))}


def row_bytes(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run_dir / "rows").glob("row_*.json"))}


def cells(run_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(run_dir / "cells.parquet")


def assert_rows_ran_at(run_dir: Path, threads: int) -> None:
    """Every row file of the grid is there and records `threads` torch threads on this CPU."""
    records = rows(run_dir)
    assert sorted(records) == ROWS
    assert {(r["threads"], r["device"]) for r in records.values()} == {(threads, cpu_model())}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def one_process(default_model, tmp_path_factory):
    """`one_process(threads)`: the run dir of the grid in one process at that many threads (trained once per count),
    the reference that workers at that count must equal bit for bit."""
    run_dirs: dict[int, Path] = {}

    def at(threads: int) -> Path:
        if threads not in run_dirs:
            run_dir = tmp_path_factory.mktemp(f"one-{threads}") / "run"
            finish(start(grid_argv(run_dir), env=env(threads)))
            assert_rows_ran_at(run_dir, threads)
            run_dirs[threads] = run_dir
        return run_dirs[threads]

    return at


def test_torchrun_workers_through_the_slurm_script_equal_one_process(one_process, tmp_path):
    """scripts/slurm_grid.sh on one 'node' (srun and scontrol stand-ins), torchrun with 2 CPU workers."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/sh\nexec "$@"\n')  # one task, on this machine
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho localhost\n")  # the job's first node
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    slurm = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_NNODES": "1",
        "SLURM_JOB_ID": "test",
        "GPUS_PER_NODE": "2",
        "RDZV_PORT": str(free_port()),
        "TORCHRUN": str(Path(sys.executable).parent / "torchrun"),
    }
    run_dir = tmp_path / "run"
    out = finish(start(["bash", str(SCRIPT), *GRID[1:], "--run_dir", str(run_dir)], env={**env(), **slurm}))
    assert "rows claimed by worker" in out
    assert {r["rank"] for r in rows(run_dir).values()} == {0, 1}  # both workers claimed rows
    threads = worker_threads(torchrun=True)
    assert_rows_ran_at(run_dir, threads)
    pd.testing.assert_frame_equal(cells(run_dir), cells(one_process(threads)), check_exact=True)


def test_a_worker_killed_mid_row_is_restarted_and_no_row_is_lost(one_process, tmp_path):
    run_dir = tmp_path / "run"
    proc = start(grid_argv(run_dir, "--workers", "2"))
    first = wait_for_row(run_dir, proc)
    os.kill(json.loads(first.read_text())["pid"], signal.SIGKILL)  # its writer has claimed its next row by now
    before = row_bytes(run_dir)
    out = finish(proc)  # torch's agent started both workers again, which trained the rest
    assert "rows claimed by worker" in out
    after = row_bytes(run_dir)
    assert sorted(after) == ROWS and len(before) < len(ROWS)
    assert all(after[name] == data for name, data in before.items())  # finished rows kept, not trained again
    assert {r["rank"] for r in rows(run_dir).values()} == {0, 1}
    assert "may differ" not in out  # the restarted workers train at the threads the finished rows ran at
    assert_rows_ran_at(run_dir, worker_threads())
    pd.testing.assert_frame_equal(cells(run_dir), cells(one_process(worker_threads())), check_exact=True)


def test_killing_the_whole_grid_then_rerunning_loses_nothing(one_process, tmp_path):
    run_dir = tmp_path / "run"
    proc = start(grid_argv(run_dir, "--workers", "2"), start_new_session=True)
    wait_for_row(run_dir, proc)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its workers, as if the machine died
    proc.communicate(timeout=60)
    kept = row_bytes(run_dir)
    assert not (run_dir / "cells.parquet").exists()
    threads = worker_threads()
    out = finish(start(grid_argv(run_dir), env=env(threads)))  # a plain rerun, one process at the workers' threads
    assert "may differ" not in out
    assert all(row_bytes(run_dir)[name] == data for name, data in kept.items())
    assert_rows_ran_at(run_dir, threads)
    pd.testing.assert_frame_equal(cells(run_dir), cells(one_process(threads)), check_exact=True)


def test_ctrl_c_stops_the_workers_cleanly_and_prints_the_resume_command(default_model, tmp_path):
    from fractal_vmap.grid.lock import run_dir_lock

    run_dir = tmp_path / "run"
    proc = start(grid_argv(run_dir, "--workers", "2"), start_new_session=True)
    wait_for_row(run_dir, proc)
    os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches every process of the group
    out = finish(proc, 130)
    assert "Traceback" not in out
    [line] = [line for line in out.splitlines() if "interrupted" in line]  # said once, not once a worker
    command = shlex.split(line.split("resume (finished rows are kept): ", 1)[1])
    assert command[:2] == ["fractal-vmap", "grid"] and command[command.index("--workers") + 1] == "2"
    assert all(r["complete"] for r in rows(run_dir).values())
    with run_dir_lock(run_dir):  # every worker is gone: nothing holds the run dir
        pass


def test_a_second_grid_on_a_run_dir_in_use_is_refused(one_process, tmp_path):
    run_dir = tmp_path / "run"
    threads = worker_threads()  # the count of a reference the other tests need too
    first = start(grid_argv(run_dir), env=env(threads))
    wait_for_row(run_dir, first)
    os.kill(first.pid, signal.SIGSTOP)  # hold the first grid inside its run, its lock held
    try:
        grid_json, kept = (run_dir / "grid.json").read_bytes(), row_bytes(run_dir)
        for extra in ([], ["--workers", "2"]):  # one process, then rank 0 of two workers
            second = subprocess.run(grid_argv(run_dir, *extra), capture_output=True, text=True, env=env(), timeout=600)
            lines = [line for line in (second.stdout + second.stderr).splitlines() if line.strip()]
            assert second.returncode == 2 and len(lines) == 1, second.stdout + second.stderr
            assert f"(host {platform.node()}, pid {first.pid})" in lines[0]
        assert (run_dir / "grid.json").read_bytes() == grid_json and row_bytes(run_dir) == kept
    finally:
        os.kill(first.pid, signal.SIGCONT)
    finish(first)
    assert {r["pid"] for r in rows(run_dir).values()} == {first.pid}  # every row is the first grid's
    pd.testing.assert_frame_equal(cells(run_dir), cells(one_process(threads)), check_exact=True)


@pytest.mark.parametrize("workers", [[], ["--workers", "2"]], ids=["one-process", "workers"])
def test_a_resume_at_another_thread_count_warns_once_and_records_it(one_process, tmp_path, workers):
    """A grid finished at one thread count, a row file deleted, resumed at another (one process, or 2 workers at that
    many each): one warning line naming both counts before any row trains, once however many workers; the grid goes
    on, and the new row's file records the new count."""
    old = worker_threads()
    new = old - 1 if old > 1 else 2  # torch caps its threads at the cores: OMP_NUM_THREADS=3 on 2 cores runs 2
    run_dir = tmp_path / "run"
    shutil.copytree(one_process(old), run_dir)
    (run_dir / "rows" / ROWS[-1]).unlink()
    kept = row_bytes(run_dir)
    out = finish(start(grid_argv(run_dir, *workers), env=env(new)))
    lines = out.splitlines()
    [warning] = [line for line in lines if "may differ" in line]  # from rank 0 alone
    assert warning.startswith("warning: ") and "rounding" in warning
    counts = (
        f"ran at {old} thread{'s' if old > 1 else ''}, the 1 row left trains at {new} thread{'s' if new > 1 else ''}"
    )
    assert f"3 finished rows of {run_dir} {counts}" in warning
    assert warning.endswith(f"resume with OMP_NUM_THREADS={old}")
    assert not any(line.startswith(("rank ", "row ")) for line in lines[: lines.index(warning)])  # no row began before
    assert {name: data for name, data in row_bytes(run_dir).items() if name in kept} == kept
    assert rows(run_dir)[ROWS[-1]]["threads"] == new
    assert cells(run_dir)["threads"].tolist() == [old] * 6 + [new] * 2  # cells.parquet says which cells ran at which


def write_record(run_dir: Path, i: int, digest: str, **machine) -> None:
    (run_dir / "rows").mkdir(parents=True, exist_ok=True)
    record = {"row": i, "complete": True, "spec_digest": digest, "lanes": [{}, {}], **machine}
    (run_dir / "rows" / f"row_{i:04d}.json").write_text(json.dumps(record))


def test_the_mixed_rows_note_counts_threads_on_cpu_and_only_the_gpu_on_cuda(tmp_path):
    cpu, gpu = "Some CPU", "Some GPU"
    for i, threads in enumerate((2, 2, 1)):
        write_record(tmp_path / "cpu", i, "d", threads=threads, device=cpu)
    write_record(tmp_path / "cpu", 3, "d")  # written before threads were recorded: left out
    write_record(tmp_path / "cpu", 4, "other")  # another spec's: trained again, so a row left
    note = mixed_rows_note(tmp_path / "cpu", "d", 6, {(cpu, 1)}, cuda=False)
    assert "4 finished rows" not in note and "3 finished rows" in note
    assert "ran at 1 thread (1) and 2 threads (2), the 2 rows left train at 1 thread" in note
    assert "OMP_NUM_THREADS" not in note  # the finished rows disagree: no one count to name
    assert mixed_rows_note(tmp_path / "cpu", "d", 3, {(cpu, 1)}, cuda=False) is None  # no row left to train
    assert "2 threads on Some CPU" in mixed_rows_note(tmp_path / "cpu", "d", 6, {("Another CPU", 2)}, cuda=False)
    for i in range(2):
        write_record(tmp_path / "gpu", i, "d", threads=8 * (i + 1), device=gpu)  # the CPU threads of a CUDA grid
    assert mixed_rows_note(tmp_path / "gpu", "d", 3, {(gpu, 4)}, cuda=True) is None
    other_gpu = mixed_rows_note(tmp_path / "gpu", "d", 3, {("Other GPU", 4)}, cuda=True)
    assert "the 1 row left trains at Other GPU" in other_gpu
    assert mixed_rows_note(tmp_path / "fresh", "d", 2, {(cpu, 1)}, cuda=False) is None  # a new grid, alike workers
    assert "the workers train" in mixed_rows_note(tmp_path / "fresh", "d", 2, {(cpu, 1), (cpu, 2)}, cuda=False)
