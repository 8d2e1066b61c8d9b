"""`fractal-vmap <command>`: each command's options are a simple_parsing dataclass (flags or --config_path file)."""

import ctypes
import sys

from rich.console import Console
from rich.table import Table
from simple_parsing import ArgumentParser

from fractal_vmap.errors import UserError

console = Console()


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)


def tune_allocator() -> None:
    """Keep freed memory in the C heap. By default glibc maps every block over its mmap threshold afresh and unmaps it
    on free, so each multi-MB tensor, made anew every step, page-faults all its pages in again: on the 2-core CPU
    that cost 15-20% of a grid row (16 lanes of the default model) and ~10% of a finetune run. 32 MiB is glibc's
    largest mmap threshold; the heap keeps up to 1 GiB of free memory before trimming. Linux (glibc) only."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None) if sys.platform == "linux" else None
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, 32 << 20)
        mallopt(M_TRIM_THRESHOLD, 1 << 30)


def finetune_command(cfg) -> None:
    from fractal_vmap.finetune import run_finetune

    result = run_finetune(cfg)
    table = Table(title=f"finetune {result['run_name']}", show_header=False)
    for key in ("steps", "tokens_seen", "avg_loss", "final_loss", "trainable_ratio", "stable", "converged", "runtime_s", "error"):
        value = result[key]
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    if "val_loss" in result:
        table.add_row("val_loss", f"{result['val_loss']:.4g}")
    console.print(table)
    console.print(f"result: [bold]{result['out']}[/bold]")


def grid_command(cfg) -> None:
    from fractal_vmap.grid import run_grid

    run_grid(cfg)


def build_parser() -> ArgumentParser:
    from fractal_vmap.finetune import FinetuneConfig
    from fractal_vmap.grid import GridConfig

    parser = ArgumentParser(prog="fractal-vmap", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    # --config_path file.yaml (or .json) sets the options; flags given on the command line override it
    finetune = commands.add_parser("finetune", help="train one model (one grid cell) with torch.optim AdamW + Muon", add_config_path_arg=True)
    finetune.add_arguments(FinetuneConfig, dest="cfg")
    finetune.set_defaults(run=finetune_command)
    grid = commands.add_parser("grid", help="train a 2-D grid of fine-tuning runs, a whole row of lanes at once", add_config_path_arg=True)
    grid.add_arguments(GridConfig, dest="cfg")
    grid.set_defaults(run=grid_command)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    tune_allocator()
    try:
        args.run(args.cfg)
    except UserError as e:
        console.print(f"[bold red]error:[/bold red] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
