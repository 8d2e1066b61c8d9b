"""The host costs that the seed's way of running a grid (one process per cell) pays once a cell, MEASURED on this
machine, for the end-to-end projection of perf/workload.py (`fractal-vmap bench --project h100`):

  interpreter + `import torch`     fresh `python -c "import torch"` processes (bytecode cached, as a usual machine has)
  checkpoint load                  a random 561M-parameter nanochat d20 checkpoint (float32, nanochat's model_*.pt
                                   layout, written to /tmp) read with checkpoint.load_checkpoint from local disk, the
                                   page cache warm (a node reading it for its 512th cell has it cached)
  data render                      rendering (tokenizing, masking) the conversations that hold one cell's 250K
                                   supervised tokens, the default synthetic doc-QA set with the tokenizer given
  optimizer build                  torch.optim AdamW (lm_head) and Muon (the matrices) over d20-shaped tensors, as the
                                   seed's script builds them (the state itself is made on the GPU at the first step)

Not measured here and not counted (each would add to the seed's way): CUDA context creation, the model's copy to the
GPU, a compile (the seed's script does not compile), eight processes on a node sharing its cores. Medians of
--repeats. It writes fractal_vmap/perf/host_costs.json (read by perf/workload.py) and a copy under results/.

    uv run python benchmarks/seed_host.py --tokenizer ../shared/fixtures/nanochat-d2/tokenizer
"""

import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from simple_parsing import ArgumentParser

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS_DIR, environment, write_json  # noqa: E402

from fractal_vmap.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from fractal_vmap.model import nanochat_depth, param_group, param_shapes  # noqa: E402
from fractal_vmap.perf.workload import HOST_COSTS  # noqa: E402


@dataclass
class Options:
    tokenizer: str = "../shared/fixtures/nanochat-d2/tokenizer"  # a tokenizer dir (nanochat's tokenizer.pkl)
    grid: str = ""  # a measured grid's run dir: the share of its lanes that diverge, and when they leave the row
    repeats: int = 3  # the median of this many of each
    tokens: int = 250_000  # supervised tokens of one cell
    out: str = ""  # default: fractal_vmap/perf/host_costs.json


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def import_seconds(repeats: int) -> float:
    """Fresh interpreters importing torch, sharing one bytecode cache warmed by an untimed first run (this sandbox
    sets PYTHONDONTWRITEBYTECODE=1, which would compile torch's sources anew in every process)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = tempfile.mkdtemp(prefix="seed-host-pycache-")

    def run():
        subprocess.run([sys.executable, "-c", "import torch"], check=True, env=env)

    run()
    return median_seconds(run, repeats)


def checkpoint_seconds(repeats: int) -> tuple[float, int]:
    config = nanochat_depth(20)
    gen = torch.Generator().manual_seed(0)
    params = {k: torch.randn(s, generator=gen) * 0.02 for k, s in param_shapes(config).items()}
    n = sum(p.numel() for p in params.values())
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        save_checkpoint(tmp, 0, config, params)
        del params
        load_checkpoint(tmp)  # warms the page cache
        return median_seconds(lambda: load_checkpoint(tmp), repeats), n


def render_seconds(opts: Options) -> tuple[float, int]:
    from fractal_vmap.data import conversations, render_examples
    from fractal_vmap.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(opts.tokenizer)
    convs = conversations("default", "train")
    examples, _ = render_examples(convs, tokenizer, 1024)
    supervised = sum(sum(mask[1:]) for _, mask in examples) / len(examples)
    needed = min(len(convs), int(opts.tokens / supervised) + 1)  # the conversations holding one cell's tokens
    return median_seconds(lambda: render_examples(convs[:needed], tokenizer, 1024), opts.repeats), needed


def optimizer_seconds(repeats: int) -> float:
    config = nanochat_depth(20)
    shapes = param_shapes(config)
    params = {k: torch.empty(s, requires_grad=True) for k, s in shapes.items() if param_group(k) != "embedding"}

    def build():
        torch.optim.AdamW([p for k, p in params.items() if param_group(k) == "unembedding"], lr=1e-3, fused=False)
        torch.optim.Muon([p for k, p in params.items() if param_group(k) == "matrix"], lr=1e-3)

    return median_seconds(build, repeats)


def divergence(run_dir: str, sync_every: int = 10) -> dict:
    """From a measured grid's row files: the share of lanes that diverged (a non-finite loss ended them) and, for
    those, the mean share of their steps the row still ran them (a lane leaves at the host sync after it diverged)."""
    import json
    import math

    lanes = [
        lane for f in sorted(Path(run_dir, "rows").glob("row_*.json")) for lane in json.loads(f.read_text())["lanes"]
    ]
    dead = [lane for lane in lanes if not lane["stable"]]
    kept = [min(1.0, math.ceil(lane["steps"] / sync_every) * sync_every / lane["total_steps"]) for lane in dead]
    return {
        "grid": str(run_dir),
        "lanes": len(lanes),
        "diverged": len(dead),
        "diverged_frac": len(dead) / len(lanes),
        "steps_kept_frac": statistics.mean(kept) if kept else 1.0,
    }


def main(opts: Options) -> None:
    load_before = os.getloadavg()[0]
    costs = {"import_torch_s": import_seconds(opts.repeats)}
    costs["checkpoint_load_s"], costs["checkpoint_params"] = checkpoint_seconds(opts.repeats)
    costs["data_render_s"], costs["data_render_conversations"] = render_seconds(opts)
    costs["optimizer_build_s"] = optimizer_seconds(opts.repeats)
    costs["per_cell_s"] = sum(v for k, v in costs.items() if k.endswith("_s"))
    env = environment(torch.device("cpu"))
    # the machine's load: other jobs share its 2 cores, so these are upper bounds for a quiet host
    env["load_average"] = {"before": load_before, "after": os.getloadavg()[0]}
    report = {"measured": costs, "options": asdict(opts), "environment": env}
    if opts.grid:
        report["divergence"] = divergence(opts.grid)
        print(report["divergence"])
    for k, v in costs.items():
        print(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v:,}")
    write_json(report, Path(opts.out) if opts.out else HOST_COSTS)
    write_json(report, RESULTS_DIR / "seed_host-cpu.json")


if __name__ == "__main__":
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_arguments(Options, dest="opts")
    main(parser.parse_args().opts)
