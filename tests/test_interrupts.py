"""A real `grid` process, killed mid-row (SIGKILL) or interrupted (SIGINT), then rerun: nothing lost, nothing torn, and
the final grid equals an uninterrupted one bit for bit. Rows here are ~22-45 steps, so a kill lands inside a row."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

# 3 rows (num_tokens 1500..3000: ~22-45 steps) x 3 lanes (lr 0.01, 0.1, 1): a row takes about a second on 2 cores, and
# the kill comes within milliseconds of the first row file
GRID = [
    "grid",
    "--wandb",
    "disabled",
    "--device",
    "cpu",
    "--rows",
    "3",
    "--cols",
    "3",
    "--row_min",
    "1500",
    "--row_max",
    "3000",
    "--col_min",
    "0.01",
    "--col_max",
    "1",
]


def start(run_dir: Path) -> subprocess.Popen:
    """`python -m fractal_vmap grid ...` in a new process (the default model comes from the session's storage dir)."""
    return subprocess.Popen(
        [sys.executable, "-m", "fractal_vmap", *GRID, "--run_dir", str(run_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"grid ended before {path} appeared: {proc.stdout.read()}"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def run_to_end(run_dir: Path, argv: list[str] | None = None) -> str:
    argv = argv or [sys.executable, "-m", "fractal_vmap", *GRID, "--run_dir", str(run_dir)]
    done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"}, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def uninterrupted(default_model, tmp_path_factory) -> pd.DataFrame:
    run_dir = tmp_path_factory.mktemp("whole") / "run"
    run_to_end(run_dir)
    return pd.read_parquet(run_dir / "cells.parquet")


def row_files(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "rows").iterdir())


def test_sigkill_mid_row_loses_only_that_row(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    proc = start(run_dir)
    wait_for(run_dir / "rows" / "row_0000.json", proc)
    proc.send_signal(signal.SIGKILL)  # no handler runs: as if the machine died
    proc.wait(timeout=60)
    kept = row_files(run_dir)
    assert "row_0000.json" in kept and "row_0002.json" not in kept  # killed inside row 1 (or, rarely, row 2)
    assert not (run_dir / "cells.parquet").exists()
    before = (run_dir / "rows" / "row_0000.json").read_bytes()
    out = run_to_end(run_dir)
    assert (run_dir / "rows" / "row_0000.json").read_bytes() == before  # the finished row was kept, not retrained
    assert "trainable" in out
    pd.testing.assert_frame_equal(pd.read_parquet(run_dir / "cells.parquet"), uninterrupted, check_exact=True)


def test_sigint_stops_cleanly_and_prints_the_resume_command(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    proc = start(run_dir)
    wait_for(run_dir / "rows" / "row_0000.json", proc)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "Traceback" not in out
    line = next(line for line in out.splitlines() if "interrupted" in line)
    command = shlex.split(line.split("resume (finished rows are kept): ", 1)[1])
    assert command[:2] == ["fractal-vmap", "grid"] and command[command.index("--run_dir") + 1] == str(run_dir)
    for name in row_files(run_dir):  # every row file there is whole
        assert json.loads((run_dir / "rows" / name).read_text())["complete"] is True
    # the printed command, as a user would run it
    run_to_end(run_dir, [sys.executable, "-m", "fractal_vmap", *command[1:]])
    pd.testing.assert_frame_equal(pd.read_parquet(run_dir / "cells.parquet"), uninterrupted, check_exact=True)
