"""The study's own W&B run, so that its answer sits beside its grids' runs: the figures REPORT.md shows (each level's
maps, the tokens plane's, lr_star.png as images; zoom.gif as a video: W&B takes a GIF file as it is, with no ffmpeg),
the D-per-level and critical-lr tables, the headline numbers and the findings in the run summary, and REPORT.md,
study.json and the figures as one artifact.

One W&B run per study dir however often the study is rerun, as a grid is one run per run dir (fractal_vmap/tracking.py):
its id is kept in <study dir>/wandb_id and every rerun resumes it; offline, each rerun writes a folder under
<study dir>/wandb and `wandb sync <study dir>/wandb` uploads them as one run. Each rerun logs its figures and tables at
the next step (the rerun's number), so W&B keeps every rerun's and shows the latest. study.json records the study's
run and every grid's run id, so a reader of the report finds them. Everything the study found is on disk before this
runs, so logging cannot lose it; wandb is imported only when logging is on."""

from dataclasses import asdict
from pathlib import Path

from fractal_vmap.files import finite_or_none, strict_json, write_atomic
from fractal_vmap.tracking import ID_FILE, check_wandb, closing_run, read_run_id, start_run, wandb_mode

PICTURES = ("trainability", "panels")  # every grid's pictures (analysis/report.py), named in REPORT.md
ARTIFACT_TYPE = "study-report"


def grid_run_ids(study_dir: Path, grids: list[dict]) -> dict[str, str | None]:
    """Each grid's W&B run id, as its run dir keeps it (None: that grid logged nothing)."""
    ids = {}
    for x in grids:
        path = study_dir / x["run_dir"] / ID_FILE
        ids[x["name"]] = path.read_text().strip() if path.is_file() else None
    return ids


def figures(study_dir: Path, results: dict) -> dict[str, Path]:
    """The report's still figures by W&B key: `<level>/trainability`, `<level>/panels` for every level of the zoom chain
    and the tokens plane, and `lr_star`; only those on disk (a figure that is missing is not logged, never an error)."""
    planes = [lv["name"] for lv in results["levels"]] + (["tokens"] if results["tokens"] else [])
    found = {f"{name}/{pic}": study_dir / name / f"{pic}.png" for name in planes for pic in PICTURES}
    found["lr_star"] = study_dir / "lr_star.png"
    return {key: path for key, path in found.items() if path.is_file()}


def pair(x) -> list:
    return [None, None] if x is None else list(x)


def dimension_rows(results: dict) -> tuple[list[str], list[list]]:
    """REPORT.md's levels table as columns and rows: the raw D, its interval, the smooth null, the corrected D, the
    verdict and, per twin, the cells it flipped."""
    twins = results["settings"]["twins"]
    columns = ["level", "rows", "cols", "cells", "trained", "D", "D_low", "D_high", "null_low", "null_high"]
    columns += ["corrected_D", "corrected_low", "corrected_high", "verdict", "edge_pixels", "signal", "signal_fraction"]
    columns += [f"{k}_{what}" for k in twins for what in ("flipped", "flipped_on_boundary", "trained")]
    rows = []
    for lv in results["levels"]:
        d, n = lv["dimension"], lv["noise"]
        corrected = d["corrected"] or {}
        H, W = lv["shape"]
        row = [lv["name"], H, W, H * W, lv["trained"], d["dimension"], *pair(d["interval"])]
        row += [*pair(None if d["null"] is None else d["null"]["range"]), corrected.get("dimension")]
        row += [*pair(corrected.get("interval")), d["verdict"], n["edge_pixels"], n["signal"], n["signal_fraction"]]
        for k in twins:
            t = n["twins"].get(k) or {}
            row += [t.get("flipped"), t.get("flipped_on_boundary"), t.get("trained")]
        rows.append(row)
    return columns, rows


def token_rows(tokens: dict) -> tuple[list[str], list[list]]:
    """REPORT.md's critical-lr table: per token budget, lr* with its bracket, the twins' mixed band and the safe lr."""
    columns = ["tokens", "censored", "last_trainable", "first_untrainable", "lr_star", "bracket_low", "bracket_high"]
    columns += ["mixed_low", "mixed_high", "safe_lr", "safe_fraction"]
    rows = [
        [r["tokens"], r["censored"], r.get("last_trainable"), r.get("first_untrainable"), r.get("lr_star")]
        + [*pair(r.get("bracket")), *pair(r.get("mixed_band")), r.get("safe_lr"), r.get("safe_fraction")]
        for r in tokens["rows"]
    ]
    return columns, rows


def summary(results: dict) -> dict:
    """The headline numbers, flat (W&B charts and filters runs by summary keys), and the findings as sentences."""
    out = {"findings": results["findings"], "cells_trained": results["ran"]["cells_trained"]}
    out["wall_seconds"] = results["ran"]["wall_seconds"]
    for lv in results["levels"]:
        d, name = lv["dimension"], lv["name"]
        out |= {f"{name}/D": d["dimension"], f"{name}/D_interval": d["interval"], f"{name}/verdict": d["verdict"]}
        out |= {f"{name}/corrected_D": (d["corrected"] or {}).get("dimension"), f"{name}/trained": lv["trained"]}
        out[f"{name}/signal_fraction"] = lv["noise"]["signal_fraction"]
    verdicts = [lv["dimension"]["verdict"] for lv in results["levels"]]
    out["fractal_levels"] = sum(v == "fractal" for v in verdicts)
    p = results["plane"]
    if p and p["orientation"]:
        out |= {"plane/angle": p["orientation"]["angle"], "plane/rows_share": p["orientation"]["rows_share"]}
    if p:
        out |= {"plane/safe_rows_max": p["safe_rows_max"], "plane/safe_cols_max": p["safe_cols_max"]}
        out["plane/safe_corner"] = p["safe_corner"]
    t = results["tokens"]
    if t:
        law = t["law"] or {}
        out |= {
            "lr_star/B": law.get("B"),
            "lr_star/beta": law.get("beta"),
            "lr_star/beta_interval": law.get("beta_interval"),
        }
        out["safe_lr_fraction"] = t["safe_fraction"]
    return finite_or_none(out)


def table(columns: list[str], rows: list[list]):
    """A wandb.Table; a column may hold None beside numbers or text (a level without an interval, a censored row)."""
    import wandb

    return wandb.Table(columns=columns, data=finite_or_none(rows), allow_mixed_types=True)


def check_study_run(cfg) -> None:
    """Before any work: the study's --wandb as a grid's is checked, and a kept run id that is not one is refused now
    rather than after the training."""
    check_wandb(cfg)
    if wandb_mode(cfg.wandb) != "disabled":
        read_run_id(Path(cfg.study_dir))


def log_study(s, study_dir: Path, results: dict) -> None:
    """After report.write: record the W&B runs in study.json and log the study to its one W&B run (nothing when
    disabled). `s`: the study's settings (plan.settings), `results`: what report.analyse found."""
    cfg = s.cfg
    if wandb_mode(cfg.wandb) == "disabled":
        return
    import wandb

    settings = {k: v for k, v in asdict(s).items() if k != "cfg"} | {"side": s.side}  # the options, defaults filled in
    project, entity = cfg.wandb_project, cfg.wandb_entity  # where its grids log too
    config = dict(options=asdict(cfg), settings=settings)
    run = start_run(cfg.wandb, project, entity, study_dir.name, config, study_dir, "study", keep_id=True)
    sync_dir = study_dir / "wandb"
    with closing_run(run, sync_dir):
        grids = grid_run_ids(study_dir, results["ran"]["grids"])
        run.config.update({"grids": grids}, allow_val_change=True)
        results["wandb"] = dict(
            study=dict(id=run.id, project=project, entity=entity, mode=run.settings.mode, sync_dir=str(sync_dir)),
            grids=grids,
        )
        write_atomic(study_dir / "study.json", strict_json(results))
        # each invocation of this run left one folder here (this one's included): the rerun's number, a step that
        # grows across reruns whether online or offline
        step = max(run.step, len(list(sync_dir.glob(f"*run-*-{run.id}"))) - 1)
        logged = {key: wandb.Image(str(path)) for key, path in figures(study_dir, results).items()}
        if (study_dir / "zoom.gif").is_file():
            logged["zoom"] = wandb.Video(str(study_dir / "zoom.gif"))  # a GIF file goes as it is: no ffmpeg
        columns, rows = dimension_rows(results)
        logged["dimension"] = table(columns, rows)
        if results["tokens"]:
            columns, rows = token_rows(results["tokens"])
            logged["critical_lr"] = table(columns, rows)
        grid_table = [[x["name"], x["kind"], grids[x["name"]], x["train_seconds"]] for x in results["ran"]["grids"]]
        logged["grids"] = table(["grid", "what", "wandb_id", "train_seconds"], grid_table)
        run.log(logged, step=step)
        run.summary.update(summary(results))
        artifact = wandb.Artifact(f"study-{run.id}", type=ARTIFACT_TYPE, description=results["ran"]["command"])
        for name in ("REPORT.md", "study.json", "zoom.gif", "zoom.mp4"):  # (the MP4: where ffmpeg made one)
            if (study_dir / name).is_file():
                artifact.add_file(str(study_dir / name), name=name)
        for path in figures(study_dir, results).values():  # at the paths REPORT.md names them by
            artifact.add_file(str(path), name=str(path.relative_to(study_dir)))
        run.log_artifact(artifact)
