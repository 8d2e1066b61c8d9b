"""The study's one W&B run (study/tracking.py), read back from what W&B writes offline: the run record, config,
history (figures, the zoom video, tables), summary and artifact in each invocation's .wandb file, and the media files
beside it; a rerun resumes the same run id at the next step. A paper-task study at 17 x 17 (test_study.py's settings)
run twice; test_study.py's nanochat study on tiny settings (its report checked as test_study.py checks the paper's)
for the tokens plane's figure and table. `--wandb disabled` writing nothing is checked on test_study.py's paper
study."""

import hashlib
import json
from pathlib import Path

import pytest
from test_study import check_levels, strict  # the paper study's checks, on this study's run dirs

from fractal_vmap.analysis.compare import load_phase
from fractal_vmap.cli import main
from fractal_vmap.study import rules

# test_study.py's paper study without its twin (each grid is a W&B run: its twin's would double the cost)
PAPER_STUDY = ["study", "--task", "paper-mlp", "--coarse", "5", "--refine", "2", "--zooms", "1", "--twins", "none"]
PAPER_STUDY += ["--wandb_project", "fv-study"]  # the study's run and its grids' go to the project it names
BLOCK = 32768  # a .wandb file is a LevelDB-style log: 32 KiB blocks of chunks, each behind a 7-byte header
FULL, FIRST, LAST = 1, 2, 4  # chunk types: a whole record, or the first / middle (3) / last piece of one


def records(path: Path):
    """The protobuf records (wandb's own schema, wandb_internal_pb2.Record) of a .wandb file, in order. The file opens
    with a 7-byte header (':W&B', 2 magic bytes, a version byte); each chunk has a checksum (4 bytes), its length (2,
    little-endian) and its type (1); a block's last < 7 bytes are padding."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B log"
    pos, pieces = 7, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:
            pos += BLOCK - pos % BLOCK
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:  # zero padding
            continue
        pieces = chunk if kind in (FULL, FIRST) else pieces + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            yield record


def item_key(item) -> str:
    return item.key or "/".join(item.nested_key)


def read_offline(folder: Path) -> dict:
    """What one offline invocation logged: its run record, config updates, history values (flattened as W&B flattens
    media: `<key>/_type`, `<key>/path`, ...), the last value of every summary key, and its artifacts."""
    (log,) = folder.glob("run-*.wandb")
    out = dict(run=None, config={}, history={}, summary={}, artifacts=[])
    for r in records(log):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out["run"] = r.run
            out["config"] |= {item_key(i): json.loads(i.value_json) for i in r.run.config.update}
        elif kind == "config":
            out["config"] |= {item_key(i): json.loads(i.value_json) for i in r.config.update}
        elif kind == "history":
            out["history"] |= {item_key(i): json.loads(i.value_json) for i in r.history.item}
        elif kind == "summary":
            out["summary"] |= {item_key(i): json.loads(i.value_json) for i in r.summary.update}
        elif kind == "artifact":
            out["artifacts"].append((r.artifact.name, r.artifact.type, {e.path for e in r.artifact.manifest.contents}))
    return out


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def table(folder: Path, logged: dict, key: str) -> list[dict]:
    """A logged wandb.Table as rows of {column: value}, from its file in the run's files/ folder."""
    assert logged["history"][f"{key}/_type"] == "table-file"
    t = json.loads((folder / "files" / logged["history"][f"{key}/path"]).read_text())
    return [dict(zip(t["columns"], row)) for row in t["data"]]


def check_figure(folder: Path, logged: dict, key: str, source: Path, kind: str = "image-file") -> None:
    """The logged figure is the study's file, byte for byte, and W&B kept its copy in files/."""
    h = logged["history"]
    assert h[f"{key}/_type"] == kind, key
    assert h[f"{key}/sha256"] == sha256(source) == sha256(folder / "files" / h[f"{key}/path"]), key


@pytest.fixture
def wandb_home(tmp_path, monkeypatch):
    """W&B's artifact staging and caches in tmp (its run folders go to the study dir)."""
    for name in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    return monkeypatch


def test_a_study_logs_its_figures_tables_and_numbers_to_one_wandb_run(tmp_path, wandb_home, capsys):
    import wandb

    study_dir = tmp_path / "paper"
    main([*PAPER_STUDY, "--wandb", "offline", "--study_dir", str(study_dir)])
    wandb_home.setenv("WANDB_MODE", "offline")  # the rerun: --wandb auto honours $WANDB_MODE as grids do
    main([*PAPER_STUDY, "--wandb", "auto", "--study_dir", str(study_dir)])
    wandb.teardown()  # waits for W&B's service to write out and close its files (reading them earlier is a race)
    run_id = (study_dir / "wandb_id").read_text().strip()
    folders = sorted((study_dir / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and all(f.name.endswith(f"-{run_id}") for f in folders), folders  # one run, resumed
    assert capsys.readouterr().out.count(f"W&B run {run_id} logged offline; to upload it: wandb sync") == 2
    report = json.loads((study_dir / "study.json").read_text())
    grids = {g["name"]: (study_dir / g["run_dir"] / "wandb_id").read_text().strip() for g in report["ran"]["grids"]}
    assert set(grids) == {"map", "zoom1"} and run_id not in grids.values()
    assert report["wandb"]["study"]["id"] == run_id and report["wandb"]["grids"] == grids

    first, last = read_offline(folders[0]), read_offline(folders[1])
    for logged, step in ((first, 0), (last, 1)):  # each rerun logs at the next step, so W&B keeps it
        assert logged["run"].run_id == run_id and logged["run"].job_type == "study"
        assert logged["run"].display_name == "paper" and logged["history"]["_step"] == step
        assert logged["run"].project == "fv-study"
    grid_logs = sorted((study_dir / "map" / "wandb").glob("offline-run-*"))
    assert grid_logs and all(read_offline(f)["run"].project == "fv-study" for f in grid_logs)
    config = last["config"]
    assert config["options"]["task"] == "paper-mlp" and config["options"]["coarse"] == 5
    assert config["settings"]["side"] == 17 and config["settings"]["twins"] == [] and config["grids"] == grids

    folder = folders[1]
    for level in ("map", "zoom1"):
        for pic in ("trainability", "panels"):
            check_figure(folder, last, f"{level}/{pic}", study_dir / level / f"{pic}.png")
    check_figure(folder, last, "zoom", study_dir / "zoom.gif", "video-file")  # a GIF: W&B plays it as a video
    assert "lr_star/_type" not in last["history"] and "critical_lr/_type" not in last["history"]  # paper: no tokens

    rows = table(folder, last, "dimension")
    assert [r["level"] for r in rows] == ["map", "zoom1"]
    for r, lv in zip(rows, report["levels"]):
        d, n = lv["dimension"], lv["noise"]
        assert (r["D"], r["verdict"], r["trained"], r["cells"]) == (d["dimension"], d["verdict"], lv["trained"], 289)
        assert [r["D_low"], r["D_high"]] == (d["interval"] or [None, None])
        assert (r["signal"], r["edge_pixels"]) == (n["signal"], n["edge_pixels"])
    assert {r["grid"]: r["wandb_id"] for r in table(folder, last, "grids")} == grids

    s = last["summary"]
    assert s["findings"] == report["findings"] and s["cells_trained"] == report["ran"]["cells_trained"]
    for lv in report["levels"]:
        assert (s[f"{lv['name']}/D"], s[f"{lv['name']}/verdict"]) == (
            lv["dimension"]["dimension"],
            lv["dimension"]["verdict"],
        )
    assert s["plane/angle"] == report["plane"]["orientation"]["angle"]
    assert s["plane/safe_corner"] == report["plane"]["safe_corner"]

    (artifact,) = [a for a in last["artifacts"] if a[1] == "study-report"]  # (the tables are artifacts of their own)
    assert artifact[0] == f"study-{run_id}" and artifact[2] == {"REPORT.md", "study.json", "zoom.gif"} | {
        f"{lv}/{pic}.png" for lv in ("map", "zoom1") for pic in ("trainability", "panels")
    }


def test_a_nanochat_study_on_tiny_settings_reports_its_parts_and_logs_the_tokens_plane(
    default_model, tmp_path, wandb_home
):
    """The embedded default model at 5 x 5 cells of 3-6 steps, its data-order twins (the ulp twin is the paper
    study's): the report equals what the parts compute from its run dirs (as test_study.py's paper study), and its
    W&B run holds the tokens plane's figure and table."""
    import wandb

    study_dir = tmp_path / "nanochat"
    flags = ["--coarse", "3", "--refine", "1", "--zooms", "0", "--num_tokens", "200", "--twins", "seed"]
    tokens = ["--token_min", "200", "--token_max", "400", "--token_rows", "3"]
    main(["study", *flags, *tokens, "--wandb", "offline", "--study_dir", str(study_dir)])
    wandb.teardown()
    report = strict(study_dir / "study.json")
    check_levels(study_dir, report)
    grid, phase, _ = load_phase(study_dir / "tokens")
    phases = [phase, load_phase(study_dir / "tokens-seed")[1]]
    axes = grid["spec"]["axes"]
    assert axes["rows"]["name"] == "num_tokens" and axes["cols"]["name"] == "lr"
    want = rules.critical_lrs(phases, axes["cols"]["values"], axes["rows"]["values"])
    assert report["tokens"]["rows"] == json.loads(json.dumps(want))
    spec = strict(study_dir / "map" / "grid.json")["spec"]
    assert (spec["axes"]["rows"]["name"], spec["axes"]["cols"]["name"]) == ("matrix_lr", "unembedding_lr")
    assert spec["settings"]["num_tokens"] == 200
    assert strict(study_dir / "map-seed" / "grid.json")["spec"]["settings"]["seed"] == spec["settings"]["seed"] + 1

    (folder,) = (study_dir / "wandb").glob("offline-run-*")
    logged = read_offline(folder)
    check_figure(folder, logged, "lr_star", study_dir / "lr_star.png")
    for pic in ("trainability", "panels"):
        check_figure(folder, logged, f"tokens/{pic}", study_dir / "tokens" / f"{pic}.png")
    assert "zoom/_type" not in logged["history"]  # one level: no zoom chain
    (lv,) = report["levels"]
    (row,) = table(folder, logged, "dimension")
    twin = lv["noise"]["twins"]["seed"]
    assert (row["seed_flipped"], row["seed_flipped_on_boundary"], row["seed_trained"]) == (
        twin["flipped"],
        twin["flipped_on_boundary"],
        twin["trained"],
    )
    rows = table(folder, logged, "critical_lr")
    assert [r["tokens"] for r in rows] == [r["tokens"] for r in report["tokens"]["rows"]]
    assert [r["lr_star"] for r in rows] == [r.get("lr_star") for r in report["tokens"]["rows"]]
    assert [r["safe_fraction"] for r in rows] == [r.get("safe_fraction") for r in report["tokens"]["rows"]]
    law = report["tokens"]["law"] or {}
    assert logged["summary"].get("lr_star/beta") == law.get("beta")
    assert logged["summary"]["safe_lr_fraction"] == report["tokens"]["safe_fraction"]
    assert set(report["wandb"]["grids"]) == {"map", "map-seed", "tokens", "tokens-seed"}


def test_a_kept_study_run_id_that_is_not_one_is_refused_before_any_work(tmp_path, capsys, no_model):
    study_dir = tmp_path / "paper"
    study_dir.mkdir()
    (study_dir / "wandb_id").write_text("not an id!\n")
    with pytest.raises(SystemExit) as e:
        main([*PAPER_STUDY, "--wandb", "offline", "--study_dir", str(study_dir)])
    out = capsys.readouterr().out
    assert e.value.code == 2 and out.startswith("error:") and "not a W&B run id" in out, out
    assert len(out.strip().splitlines()) == 1 and sorted(p.name for p in study_dir.iterdir()) == ["wandb_id"]
