"""The study's driver: every grid the plan names (plan.py), each through grid.pipeline.run_grid in its own run dir
inside --study_dir, in order: the map, its twins, each zoom and its twins, then (nanochat) the num_tokens x lr plane and
its twins; then the zoom animation, the report (report.py) and the study's W&B run (tracking.py). Rerunning the same
command reruns the same grids, which resume: a finished grid's rows are kept, and only what is missing trains."""

import json
import time
from dataclasses import fields
from pathlib import Path

import pandas as pd

from fractal_vmap.analysis.runs import read_header
from fractal_vmap.console import console
from fractal_vmap.grid.pipeline import run_grid
from fractal_vmap.options import StudyConfig
from fractal_vmap.study import plan, report, tracking


def grid_cost(run_dir: Path) -> dict:
    """What the grid's training cost: seconds its finished units took (row files or refined levels' files, so a
    resumed grid counts them once), cells trained and lane-steps (the steps those cells ran: a cost that does not
    depend on what else the machine runs)."""
    digest = json.loads((run_dir / "grid.json").read_text())["digest"]
    seconds, k = 0.0, 0
    while (header := read_header(run_dir, k, digest)) is not None:
        seconds += header.get("seconds", 0.0)
        k += 1
    cells = pd.read_parquet(run_dir / "cells.parquet")
    trained = cells["trained"].astype(bool) if "trained" in cells.columns else pd.Series(True, index=cells.index)
    return dict(train_seconds=seconds, cells_trained=int(trained.sum()), lane_steps=int(cells["steps"][trained].sum()))


def command_line(cfg: StudyConfig) -> str:
    """The study's command: its options that differ from their defaults."""
    words = ["fractal-vmap", "study"]
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if value != f.default:
            words += [f"--{f.name}"] if value is True else [f"--{f.name}", str(value)]
    return " ".join(words)


def run_study(cfg: StudyConfig) -> dict:
    s = plan.settings(cfg)  # every check before any work
    study_dir = Path(cfg.study_dir)
    tracking.check_study_run(cfg)
    study_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    grids: list[dict] = []

    def grid(name: str, kind: str, options, axes=None, parent=None) -> Path:
        console.print(f"[bold]study: {name}[/bold] ({kind})", highlight=False)
        run_dir = run_grid(options, axes, parent)
        grids.append(dict(name=name, kind=kind, run_dir=name, **grid_cost(run_dir)))
        return run_dir

    def twins(name: str, parent_dir: Path) -> dict[str, Path]:
        out = {}
        for kind in s.twins:
            options, axes = plan.twin_options(s, parent_dir, kind, study_dir / f"{name}-{kind}")
            out[kind] = grid(f"{name}-{kind}", f"{kind} twin of {name}", options, axes)
        return out

    levels = []
    for k, name in enumerate(plan.level_names(s)):
        run_dir = study_dir / name
        if k == 0:
            grid(name, "map", plan.map_options(s, run_dir))
            box = None
        else:
            box, edges = plan.zoom_box(levels[-1]["run_dir"], cfg.zoom_box)
            if not box:
                console.print(f"study: {levels[-1]['name']} has no boundary to zoom into: {len(levels)} level(s)")
                break
            grid(
                name,
                f"zoom into box {box} of {levels[-1]['name']}",
                *plan.zoom_options(s, levels[-1]["run_dir"], box, run_dir),
            )
        levels.append(dict(name=name, run_dir=run_dir, box=box, twins=twins(name, run_dir)))
    tokens = None
    if cfg.task == "nanochat-sft":
        run_dir = grid("tokens", "num_tokens x lr plane", plan.tokens_options(s, study_dir / "tokens"))
        tokens = dict(name="tokens", run_dir=run_dir, twins=twins("tokens", run_dir))
    if len(levels) > 1:
        from fractal_vmap.analysis.animate import run_animate
        from fractal_vmap.options import AnimateConfig

        run_animate(AnimateConfig(runs=[str(lv["run_dir"]) for lv in levels], out=str(study_dir / "zoom.gif")))
    ran = dict(command=command_line(cfg), wall_seconds=time.perf_counter() - t0, grids=grids)
    results = report.analyse(s, study_dir, levels, tokens, ran)
    report.write(study_dir, results)
    console.print(f"study: [bold]{study_dir / 'REPORT.md'}[/bold] and {study_dir / 'study.json'}", highlight=False)
    for line in results["findings"]:
        console.print(f"  {line}", highlight=False, soft_wrap=True)
    tracking.log_study(s, study_dir, results)  # the study's one W&B run, and its and the grids' ids in study.json
    return results
