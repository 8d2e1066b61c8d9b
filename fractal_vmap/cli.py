"""`fractal-vmap <command>`: each command's options are a simple_parsing dataclass (flags or --config_path file)."""

import os
import shlex
import signal
import sys
import typing
from dataclasses import fields
from pathlib import Path

from rich.table import Table
from simple_parsing import ArgumentParser

from fractal_vmap.console import console
from fractal_vmap.errors import DiskFull, UserError
from fractal_vmap.machine import tune_allocator
from fractal_vmap.options import (
    AnimateConfig,
    BenchConfig,
    BoxesConfig,
    FinetuneConfig,
    GridConfig,
    PlanConfig,
    PlotConfig,
    StudyConfig,
    ZoomConfig,
)


def finetune_command(cfg) -> None:
    from fractal_vmap.finetune import run_finetune

    result = run_finetune(cfg)
    table = Table(title=f"finetune {result['run_name']}", show_header=False)
    for key in (
        "steps",
        "tokens_seen",
        "avg_loss",
        "final_loss",
        "trainable_ratio",
        "stable",
        "converged",
        "runtime_s",
        "error",
    ):
        value = result[key]
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    if "val_loss" in result:
        table.add_row("val_loss", f"{result['val_loss']:.4g}")
    console.print(table)
    console.print(f"result: [bold]{result['out']}[/bold]")


def grid_command(cfg) -> None:
    from fractal_vmap.grid import shard
    from fractal_vmap.grid.pipeline import run_grid

    shard.check_workers(cfg)
    if cfg.workers > 1:
        shard.launch(cfg, grid_worker)
    elif shard.world_size() > 1:  # one of torchrun's workers
        shard.run_worker(cfg)
    else:
        run_grid(cfg)


def grid_worker(cfg) -> UserError | None:
    """One worker of `grid --workers N` (torch's elastic agent calls it in a fresh process). Returns None, or the user
    error for the launcher to print once: an error is not a crash, so the agent must not restart the workers."""
    from fractal_vmap.grid.shard import run_worker

    tune_allocator()
    try:
        run_worker(cfg)
    except UserError as e:
        return e  # pickled back to the launcher (a DiskFull stays one, for the resume command)
    except KeyboardInterrupt:  # Ctrl-C reaches every worker: the launcher prints the resume command, once
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the agent forwards a second SIGINT: it must not break the exit
        sys.exit(130)
    return None


def compare_command(cfg) -> None:
    from fractal_vmap.analysis.compare import compare_runs, print_report

    print_report(compare_runs(cfg), console)


def study_command(cfg) -> None:
    from fractal_vmap.study.run import run_study

    run_study(cfg)


def zoom_command(cfg) -> None:
    from fractal_vmap.grid.zoom import run_zoom

    run_zoom(cfg)


def boxes_command(cfg) -> None:
    from fractal_vmap.analysis.boxes import print_boxes, suggest_boxes

    print_boxes(suggest_boxes(cfg), cfg)


def animate_command(cfg) -> None:
    from fractal_vmap.analysis.animate import run_animate

    run_animate(cfg)


def plot_command(cfg) -> None:
    from fractal_vmap.analysis.plot import plot_run

    plot_run(cfg)


def plan_command(cfg) -> None:
    from fractal_vmap.perf.plan import print_plan, run_plan

    print_plan(run_plan(cfg), console)
    if cfg.json:
        console.print(f"plan: [bold]{cfg.json}[/bold]")


def bench_command(cfg) -> None:
    wide = console
    if cfg.project != "none":
        from fractal_vmap.perf.projection import print_projection, projection_rows
        from fractal_vmap.perf.roofline import GPUS, LAUNCH_US

        if cfg.project not in GPUS:
            raise UserError(f"--project {cfg.project!r} is not one of none, {', '.join(GPUS)}")
        lanes = max(cfg.lanes or [16])  # the most lanes asked for (fewer where fewer fit)
        rows = projection_rows(cfg.project, cfg.depths, lanes, cfg.batch_size, cfg.seq_len)
        print_projection(rows, cfg.project, cfg.batch_size, cfg.seq_len, LAUNCH_US, wide)
        return
    from fractal_vmap.perf.bench import print_report, run_bench

    print_report(run_bench(cfg, say=wide.print), wide)


def compare_options() -> type:
    from fractal_vmap.analysis.compare import CompareConfig

    return CompareConfig


OPTIONS = {
    "finetune": FinetuneConfig,
    "grid": GridConfig,
    "plan": PlanConfig,
}  # commands that take a --config_path file -> their options


def build_parser() -> ArgumentParser:
    """Every command and its flags. Imports no torch (options.py is light), so --help answers at once."""
    parser = ArgumentParser(prog="fractal-vmap", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands_and_help = (
        ("finetune", FinetuneConfig, finetune_command, "train one model (one grid cell) with torch.optim AdamW + Muon"),
        (
            "grid",
            GridConfig,
            grid_command,
            "train a 2-D grid of fine-tuning runs, a whole row of lanes at once (or --task paper-mlp)",
        ),
        (
            "plot",
            PlotConfig,
            plot_command,
            "redraw a grid's pictures from its run dir (restyled or re-thresholded), without training",
        ),
        (
            "compare",
            compare_options(),
            compare_command,
            "count the cells of two grids over the same axes that change phase, and where",
        ),
        (
            "zoom",
            ZoomConfig,
            zoom_command,
            "a new grid inside a box of a finished grid (same settings, the parent recorded)",
        ),
        (
            "study",
            StudyConfig,
            study_command,
            "from a model to an answer: a refined map, zooms, twins, calibrated dimensions and rules of thumb",
        ),
        ("boxes", BoxesConfig, boxes_command, "suggest where to zoom: the boxes of a grid with the most boundary"),
        (
            "animate",
            AnimateConfig,
            animate_command,
            "a zoom animation (GIF, MP4 with ffmpeg) through a chain of zoomed runs",
        ),
        (
            "plan",
            PlanConfig,
            plan_command,
            "how many lanes of a model fit on a GPU (traced without one), the configurations weighed and the fastest "
            "by projection (--project none: memory only)",
        ),
        (
            "bench",
            BenchConfig,
            bench_command,
            "training throughput of a row: sequential models vs the eager row vs the compiled row",
        ),
    )
    for name, options, run, text in commands_and_help:
        # --config_path file.yaml (or .json) sets a training command's options; flags given on the command line override
        # it
        command = commands.add_parser(name, help=text, add_config_path_arg=name in OPTIONS)
        command.add_arguments(options, dest="cfg")
        command.set_defaults(run=run)
    return parser


def config_path_of(argv: list[str]) -> str | None:
    for k, word in enumerate(argv):
        if word == "--config_path" and k + 1 < len(argv):
            return argv[k + 1]
        if word.startswith("--config_path="):
            return word.split("=", 1)[1]
    return None


def check_config_file(path: str, command: str, options: type) -> None:
    """One clear line for a --config_path that simple_parsing would trip over (or silently ignore: options not under
    `cfg:`), before it is parsed."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise UserError(f"--config_path {path} does not exist: pass a YAML or JSON file with the options under `cfg:`")
    try:
        data = yaml.safe_load(file.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(
            f"--config_path {path} is not valid YAML or JSON ({str(e).splitlines()[0]}): fix the file"
        ) from None
    if not isinstance(data, dict) or set(data) != {"cfg"} or not isinstance(data["cfg"], dict):
        raise UserError(
            f"--config_path {path}: put the options in a mapping under one top-level `cfg:` key, e.g. `cfg: "
            f"{{learning_rate: 0.05}}`"
        )
    unknown = sorted(set(data["cfg"]) - {f.name for f in fields(options)})
    if unknown:
        raise UserError(
            f"--config_path {path}: {', '.join(unknown)} "
            f"{'is not an option' if len(unknown) == 1 else 'are not options'} of `{command}`: see fractal-vmap "
            f"{command} --help"
        )
    hints = typing.get_type_hints(options)
    for f in fields(options):
        value, kind = data["cfg"].get(f.name), hints[f.name]
        if f.name in data["cfg"] and not fits(value, kind):
            example = {int: 1, float: 0.5, str: "text"}.get(plain_type(kind), "...") if f.default is None else f.default
            raise UserError(
                f"--config_path {path}: {f.name} is {value!r}, not {type_words(kind)}: write e.g. `{f.name}: {example}`"
            )


def plain_type(kind):
    """X from `X | None`."""
    args = typing.get_args(kind)
    return next(t for t in args if t is not type(None)) if type(None) in args else kind


def fits(value, kind) -> bool:
    """Whether a value read from a YAML or JSON config file can be an option of type `kind` (simple_parsing converts a
    string, as it would a flag, and passes any other value through unchecked)."""
    if type(None) in typing.get_args(kind):
        return value is None or fits(value, plain_type(kind))
    if typing.get_origin(kind) is list:
        (item,) = typing.get_args(kind)
        return isinstance(value, list) and all(fits(v, item) for v in value)
    if kind is bool:
        return isinstance(value, bool)
    if isinstance(value, str) and kind in (int, float):
        try:
            kind(value)  # a number YAML read as a string (1e-3 is one): converted like a flag's value
        except ValueError:
            return False
        return True
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, kind)


def type_words(kind) -> str:
    if type(None) in typing.get_args(kind):
        return f"{type_words(plain_type(kind))} or null"
    if typing.get_origin(kind) is list:
        return f"a list of {type_words(typing.get_args(kind)[0]).removeprefix('a ')}s"
    words = {int: "a whole number (int)", float: "a number (float)", str: "a string", bool: "true or false"}
    return words.get(kind, str(kind))


def resume_command(argv: list[str], cfg) -> str:
    """The command line that resumes an interrupted run: the same flags, with the run dir named."""
    words = ["fractal-vmap", *argv]
    if getattr(cfg, "run_dir", None) and "--run_dir" not in argv and not any(a.startswith("--run_dir=") for a in argv):
        words += ["--run_dir", cfg.run_dir]
    return shlex.join(words)


def again_phrase(command: str) -> str:
    if command == "study":
        return "resume (finished grids and rows are kept)"
    return "resume (finished rows are kept)" if command == "grid" else "start it again"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    config_path = config_path_of(argv)
    lead = os.environ.get("RANK", "0") == "0"  # under torchrun every worker meets the same error: rank 0 says it
    command, cfg = (argv[0] if argv else None), None  # known before anything can be interrupted
    try:
        if config_path is not None and command in OPTIONS:
            check_config_file(config_path, command, OPTIONS[command])
        args = parser.parse_args(argv)
        cfg = args.cfg
        tune_allocator()
        args.run(cfg)
    except UserError as e:
        line = str(e)
        if isinstance(e, DiskFull):  # the run stopped mid-way, as on Ctrl-C: say how to go on
            line += f", then {again_phrase(command)}: {resume_command(argv, cfg)}"
        if lead:
            console.print(f"[bold red]error:[/bold red] {line}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        again = again_phrase(command)
        if lead:
            console.print(
                f"[yellow]interrupted.[/yellow] To {again}: {resume_command(argv, cfg)}",
                highlight=False,
                soft_wrap=True,
            )
        sys.exit(130)  # 128 + SIGINT, the shell's convention
