"""scripts/gpu_check.sh --dry-run: the one device call's CPU analogue (imports, the CUDA tests collected, each
benchmark at tiny sizes on CPU) runs every step to success and leaves its table and JSON, as the GPU run would."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_the_gpu_check_dry_run_passes_every_step_and_writes_its_table(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["dry_run"] is True
    steps = {s["step"]: s["status"] for s in report["steps"]}
    assert steps == dict.fromkeys(["imports", "cuda_tests", "kernels", "throughput", "grid_row"], "0"), steps
    table = (tmp_path / "gpu_check.md").read_text().splitlines()
    assert table[0] == "| step | status | seconds | output |" and len(table) == 2 + len(steps)
    row = json.loads((tmp_path / "grid_row.json").read_text())
    assert row["measured_step_s"] > 0 and row["projected_step_s"] > 0 and row["chunks"] == 1
    assert json.loads((tmp_path / "kernels.json").read_text())["analytic"]["adamw (lm_head)"]["elements"] > 0
