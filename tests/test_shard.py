"""A grid's rows over two CPU workers (gloo), as real processes: the merged grid equals one process's bit for bit, both
workers claim rows, a worker or the whole grid SIGKILLed loses only unfinished rows, Ctrl-C stops cleanly, and a
second grid on a run dir in use is refused. Rows here are 12-18 steps of 2 lanes, so the kills land inside a row."""

import json
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

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


def env() -> dict:
    return {**os.environ, "COLUMNS": "200"}  # the session's FRACTAL_STORAGE_DIR (default model) comes with os.environ


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def one_process(default_model, tmp_path_factory) -> pd.DataFrame:
    run_dir = tmp_path_factory.mktemp("one") / "run"
    finish(start(grid_argv(run_dir)))
    return cells(run_dir)


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
    pd.testing.assert_frame_equal(cells(run_dir), one_process, check_exact=True)


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
    pd.testing.assert_frame_equal(cells(run_dir), one_process, check_exact=True)


def test_killing_the_whole_grid_then_rerunning_loses_nothing(one_process, tmp_path):
    run_dir = tmp_path / "run"
    proc = start(grid_argv(run_dir, "--workers", "2"), start_new_session=True)
    wait_for_row(run_dir, proc)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its workers, as if the machine died
    proc.communicate(timeout=60)
    kept = row_bytes(run_dir)
    assert not (run_dir / "cells.parquet").exists()
    finish(start(grid_argv(run_dir)))  # a plain rerun, in one process, resumes a grid the workers began
    assert all(row_bytes(run_dir)[name] == data for name, data in kept.items())
    pd.testing.assert_frame_equal(cells(run_dir), one_process, check_exact=True)


def test_ctrl_c_stops_the_workers_cleanly_and_prints_the_resume_command(default_model, tmp_path):
    from fractal_vmap.lock import run_dir_lock

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
    first = start(grid_argv(run_dir))
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
    pd.testing.assert_frame_equal(cells(run_dir), one_process, check_exact=True)
