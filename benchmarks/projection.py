"""PROJECTION, not a measurement: one grid step of d4/d8/d12/d20 rows on a datasheet H100 (or H200), made on a machine
without a GPU (fractal_vmap/perf/roofline.py: FakeTensorMode + torch's RuntimeEstimator roofline pinned to the datasheet
device + a host cost per kernel launch), against the sequential loop of the same lanes as single `finetune` steps;
with the lanes per chunk and the levers that the memory plan (tasks/nanochat/memory.py) picks for the GPU's memory, the
projected speed-up, MFU, and the time of the 64x64 d20 grid (250K supervised tokens a cell) on one 8-GPU node.

    uv run python benchmarks/projection.py                      # d4 d8 d12 d20 on an H100, several minutes on 2 cores
    uv run python benchmarks/projection.py --gpu h200 --depths 20
"""

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from simple_parsing import ArgumentParser

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS_DIR, environment, write_json  # noqa: E402

from fractal_vmap.perf.projection import print_projection, projection_rows  # noqa: E402
from fractal_vmap.perf.roofline import GPUS, LAUNCH_US  # noqa: E402
from fractal_vmap.tasks.nanochat.levers import Levers  # noqa: E402


@dataclass
class Options:
    gpu: str = "h100"
    depths: list[int] = field(default_factory=lambda: [4, 8, 12, 20])
    lanes: int = 16  # lanes wanted per chunk (fewer where fewer fit)
    batch: int = 8
    seq: int = 1024
    launch_us: float = LAUNCH_US
    supervised_frac: float = 0.7  # supervised share of a batch's tokens (bench.py's random batches: ~70%)
    momentum_dtype: str = "float32"
    master_dtype: str = "float32"
    out: str = ""  # default: benchmarks/results/projection-<gpu>.json


def main() -> None:
    parser = ArgumentParser()
    parser.add_arguments(Options, dest="opts")
    opts = parser.parse_args().opts
    console, gpu = Console(), GPUS[opts.gpu]
    base = Levers(momentum_dtype=opts.momentum_dtype, master_dtype=opts.master_dtype)
    rows = projection_rows(
        opts.gpu, opts.depths, opts.lanes, opts.batch, opts.seq, opts.launch_us, opts.supervised_frac, base
    )
    print_projection(rows, opts.gpu, opts.batch, opts.seq, opts.launch_us, console)
    results = {
        "projection": True,
        "gpu": asdict(gpu),
        "options": asdict(opts),
        "rows": rows,
        "environment": environment(torch.device("cpu")),
    }
    path = write_json(results, Path(opts.out) if opts.out else RESULTS_DIR / f"projection-{opts.gpu}.json")
    console.print(f"results: {path}")


if __name__ == "__main__":
    main()
