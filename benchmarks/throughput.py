"""Training throughput of a grid row: `fractal-vmap bench` (fractal_vmap/bench.py) as a benchmark script, its results
in benchmarks/results with the git revision and a hash of the package sources (checked again at the end: others edit
the checkout while benchmarks run).

Modes: sequential (L single models, the `finetune` step one after another), row (the eager vmapped step) and fast
(the compiled step, Triton kernels on CUDA); lane-steps/s, tokens/s, speed-up against sequential, MFU against a
measured matmul ceiling, peak memory per lane, kernel launches per step. Targets (README.md "Targets"): CUDA (H100/H200)
row >= 10x sequential for d4-d8, >= 2x for d20; row MFU >= 40% of the bf16 matmul ceiling for d12 and up. CPU: report.

    uv run python benchmarks/throughput.py                                   # CPU: the default model, L = 1 2 4 8 16
    uv run python benchmarks/throughput.py --quick                           # < 2 min on 2 CPU cores
    PYTHONPATH=$PWD python3 benchmarks/throughput.py --device cuda --depths 4 8 --out $OUT/throughput-d4-d8.json
"""

import sys
from pathlib import Path

from rich.console import Console
from simple_parsing import ArgumentParser

sys.path.insert(0, str(Path(__file__).parent))  # `common` beside this file, however the script is started
from common import RESULTS_DIR, check_unchanged, device_slug, environment  # noqa: E402

from fractal_vmap.perf.bench import BenchConfig, print_report, run_bench, write_report  # noqa: E402
from fractal_vmap.recipe import resolve_device  # noqa: E402

console = Console(width=None if sys.stdout.isatty() else 160)  # piped output: wide enough for the table


def main(cfg: BenchConfig) -> None:
    device = resolve_device(cfg.device)
    cfg.out = cfg.out or str(RESULTS_DIR / f"throughput-{device_slug(device)}{'-quick' if cfg.quick else ''}.json")
    env = environment(device)
    report = run_bench(cfg, env, say=console.print)
    report["sources_unchanged"] = check_unchanged(env, console.print)
    write_report(report, Path(cfg.out))
    print_report(report, console)


if __name__ == "__main__":
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_arguments(BenchConfig, dest="cfg")
    main(parser.parse_args().cfg)
