"""cli.tune_allocator: freed tensors stay in the C heap, so a tensor made anew every step does not page-fault again."""

import subprocess
import sys

import pytest

# 20 tensors of 16 MiB, each freed before the next: count the process's minor page faults meanwhile
PROGRAM = """
import resource, sys, torch
if sys.argv[1] == "tuned":
    from fractal_vmap.cli import tune_allocator
    tune_allocator()
torch.empty(4 << 20).fill_(1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    torch.empty(4 << 20).fill_(1.0)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES = (16 << 20) // 4096  # 4 KiB pages of one tensor


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt")
def test_tuned_allocator_reuses_freed_tensors_without_page_faults():
    faults = {mode: int(subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, check=True).stdout)
              for mode in ("default", "tuned")}
    # tuned: at most the first heap tensor's pages fault in (measured 1x PAGES); untuned glibc maps every one afresh
    # (measured ~8x PAGES over the 20)
    assert faults["tuned"] <= 2 * PAGES, faults
    assert faults["default"] > 4 * PAGES, faults  # the control: the count sees what the tuning removes
