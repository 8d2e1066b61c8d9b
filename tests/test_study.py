"""`fractal-vmap study` and its parts: the twin grid (grid --twin_of), the rules of thumb on known cases, a study on
tiny settings (the paper task at 17 x 17; the embedded default model's, at 5 x 5 cells of 3-6 steps, is in
test_study_wandb.py, run once with its W&B checks) whose report equals what the parts compute from its run dirs, resume
after an interruption, and bad input. Seconds each."""

import json

import numpy as np
import pandas as pd
import pytest

import fractal_vmap.grid.pipeline as pipeline
from fractal_vmap.analysis.compare import CompareConfig, boundary_distance, compare_runs, load_phase
from fractal_vmap.analysis.dimension import calibrated_dimension
from fractal_vmap.analysis.runs import read_grid
from fractal_vmap.cli import main
from fractal_vmap.study import rules

PAPER_VIEW = ["--row_min", "1", "--row_max", "1e3", "--col_min", "1e-1", "--col_max", "1e5"]  # test_zoom.py's band
PAPER_STUDY = ["study", "--task", "paper-mlp", "--coarse", "5", "--refine", "2", "--zooms", "1", "--wandb", "disabled"]


def strict(path):
    return json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{path} holds {c}"))


def cells(run_dir) -> pd.DataFrame:
    return pd.read_parquet(run_dir / "cells.parquet").sort_values(["row", "col"]).reset_index(drop=True)


# ----------------------------------------------------------------------------- the twin grid


@pytest.fixture(scope="module")
def paper_map(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("twin") / "map"
    grid = ["grid", "--task", "paper-mlp", "--rows", "16", "--cols", "16", "--num_iterations", "25", *PAPER_VIEW]
    main([*grid, "--seed", "0", "--wandb", "disabled", "--run_dir", str(run_dir)])
    return run_dir, grid


def test_a_twin_trains_the_boundary_neighbourhood_and_takes_the_rest_from_its_parent(paper_map, tmp_path):
    run_dir, grid = paper_map
    flags = [*grid, "--seed", "0", "--wandb", "disabled", "--twin_of", str(run_dir)]
    main([*flags, "--run_dir", str(tmp_path / "same")])  # no nudge: the trained cells are the parent's lanes
    main([*flags, "--perturb_ulp", "1", "--run_dir", str(tmp_path / "ulp")])
    parent, same, ulp = cells(run_dir), cells(tmp_path / "same"), cells(tmp_path / "ulp")
    _, phase, _ = load_phase(run_dir)
    near = (boundary_distance(phase, 1) <= 1).reshape(-1)
    assert 0 < near.sum() < len(parent)  # a boundary, and cells away from it
    assert same["trained"].tolist() == near.tolist() and ulp["trained"].tolist() == near.tolist()
    columns = ["row", "col", "lr1", "lr0", "measure", "final_loss", "converged"]
    pd.testing.assert_frame_equal(same[columns], parent[columns], check_exact=True)  # every cell, bit for bit
    assert (ulp["measure"][~near] == parent["measure"][~near]).all()  # untrained: the parent's result
    assert (ulp["measure"][near] != parent["measure"][near]).any()  # a 1-ulp nudge moves the trained numbers
    twin_of = strict(tmp_path / "ulp" / "grid.json")["spec"]["twin_of"]
    assert twin_of == {"name": "map", "digest": strict(run_dir / "grid.json")["digest"]}


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--rows", "15", "--twin_of", "PARENT"], "other axes"),
        (["--rows", "5", "--cols", "5", "--refine", "2", "--twin_of", "PARENT"], "leave out --refine"),
        (["--twin_of", "no/such/run"], "not a finished grid"),
    ],
)
def test_bad_twin_or_refined_zoom_input_is_one_line(paper_map, tmp_path, capsys, flags, says):
    run_dir, grid = paper_map
    flags = [str(run_dir) if f == "PARENT" else f for f in flags]
    with pytest.raises(SystemExit) as e:
        main([*grid, *flags, "--wandb", "disabled", "--run_dir", str(tmp_path / "t")])
    assert e.value.code == 2
    out = capsys.readouterr().out
    assert out.startswith("error:") and says in out and len(out.strip().splitlines()) == 1
    assert not (tmp_path / "t").exists()
    with pytest.raises(SystemExit) as e:  # a refined zoom needs its coarse grid's size
        main(["zoom", str(run_dir), "--box", "0:8,0:8", "--refine", "2", "--run_dir", str(tmp_path / "z")])
    assert e.value.code == 2 and "needs the coarse grid" in capsys.readouterr().out


# ----------------------------------------------------------------------------- rules of thumb on known cases

LRS = np.geomspace(1e-3, 1e1, 33)  # 8 steps a decade
TOKENS = np.geomspace(500, 16000, 9)


# (true beta, twins' mixed band in decades, widest interval that still means something: the bootstrap draws each row's
# lr* anywhere in its bracket, so the interval grows with the band)
@pytest.mark.parametrize("beta, band, widest", [(0.5, 0.0, 0.2), (0.8, 0.125, 0.3), (0.3, 0.25, 0.5)])
def test_the_power_law_fit_recovers_a_known_exponent(beta, band, widest):
    B = 0.5 * 1000**beta  # lr* = 0.5 at 1000 tokens: inside the lr range at every budget
    phases = [rules.synthetic_phases(LRS, TOKENS, B, beta)]
    phases += [rules.synthetic_phases(LRS, TOKENS, B, beta, band, seed) for seed in (1, 2)]  # twins: mixed labels
    rows = rules.critical_lrs(phases, LRS, TOKENS)
    assert all(r["censored"] is None for r in rows)
    for r, t in zip(rows, TOKENS):  # the true lr* lies in each row's bracket, and the safe lr below it
        assert r["bracket"][0] <= B * t**-beta <= r["bracket"][1] and r["safe_lr"] <= B * t**-beta
    law = rules.power_law(rows)
    lo, hi = law["beta_interval"]
    assert lo <= beta <= hi and hi - lo < widest  # covers the truth, and narrow enough to mean something
    assert abs(law["beta"] - beta) < 0.06  # within half an lr step (1/8 decade) over the 1.5-decade token span


def test_critical_lrs_reads_a_row_by_hand():
    lrs = [1.0, 2.0, 4.0, 8.0, 16.0]
    a = np.array([[0, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=float)  # too slow at 1, fails from 8
    b = np.array([[1, 1, 0, 1, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=float)  # the twin: fails at 4, trains at 8
    row, never_fails, never_trains = rules.critical_lrs([a, b], lrs, [10, 20, 30])
    assert (row["last_trainable"], row["first_untrainable"], row["lr_star"]) == (4.0, 8.0, np.sqrt(32.0))
    assert row["bracket"] == [2.0, 16.0] and row["mixed_band"] == [4.0, 8.0] and row["safe_lr"] == 2.0
    assert never_fails["censored"] == "never fails inside the grid"
    assert never_trains["censored"] == "never trains inside the grid"
    assert rules.power_law([row, never_fails, never_trains]) is None  # one budget is no law


def test_orientation_finds_the_axis_that_sets_trainability():
    i, j = np.mgrid[0:40, 0:40]
    rows_only = (i < 17).astype(float)  # trains below a rows value, whatever the cols value
    assert rules.orientation(rows_only, 0.1, 0.1)["angle"] == 0.0
    diagonal = (i + j < 40).astype(float)  # rows + cols = const in cell units
    o = rules.orientation(diagonal, 0.1, 0.1)
    assert abs(o["angle"] - 45.0) < 3 and abs(o["rows_share"] - 0.5) < 0.03
    # a col step 3x as long in axis units: the boundary 10 x + 3.3 y = 40 leans towards the rows axis
    assert abs(rules.orientation(diagonal, 0.1, 0.3)["angle"] - np.degrees(np.arctan(1 / 3))) < 3
    assert rules.safe_box([rows_only]) == {"rows": 16, "cols": None, "corner": [16, 39]}
    corner = ((i < 10) & (j < 30)).astype(float)  # a twin that fails at (5, 5) shrinks the corner to 5 rows
    twin = corner.copy()
    twin[5, 5] = 0.0
    assert rules.safe_box([corner])["corner"] == [9, 29] and rules.safe_box([corner, twin])["corner"] == [4, 29]


# ----------------------------------------------------------------------------- studies end to end


def check_levels(study_dir, report):
    """study.json's levels equal what calibrated_dimension and compare compute from the run dirs."""
    for level in report["levels"]:
        run_dir = study_dir / level["name"]
        twin_dirs = sorted(study_dir.glob(f"{level['name']}-*"))
        measure = read_grid(str(run_dir))[2]
        want = calibrated_dimension(measure, [read_grid(str(d))[2] for d in twin_dirs])
        assert json.loads(json.dumps(want)) == level["dimension"]
        for d in twin_dirs:
            got = level["noise"]["twins"][d.name.split("-")[-1]]
            flips = compare_runs(CompareConfig(str(run_dir), str(d)))
            assert (got["flipped"], got["flipped_on_boundary"]) == (flips["flipped"], flips["flipped_on_boundary"])
            assert got["trained"] == int(cells(d)["trained"].sum())
        assert level["trained"] == int(cells(run_dir)["trained"].sum())


@pytest.fixture(scope="module")
def paper_study(tmp_path_factory):
    study_dir = tmp_path_factory.mktemp("study") / "paper"
    main([*PAPER_STUDY, "--study_dir", str(study_dir)])
    return study_dir


def test_a_paper_study_reports_what_its_run_dirs_hold(paper_study):
    report = strict(paper_study / "study.json")
    assert [lv["name"] for lv in report["levels"]] == ["map", "zoom1"] and report["tokens"] is None
    assert [lv["shape"] for lv in report["levels"]] == [[17, 17], [17, 17]]
    check_levels(paper_study, report)
    zoom = strict(paper_study / "zoom1" / "grid.json")["spec"]
    assert zoom["parent"]["box"] == report["levels"][1]["box"] and zoom["settings"]["refine"] == 2
    assert (paper_study / "zoom.gif").stat().st_size > 0
    text = (paper_study / "REPORT.md").read_text()
    assert all(line in text for line in report["findings"])
    d = report["levels"][0]["dimension"]
    assert d["verdict"] in text and str(round(d["dimension"], 3))[:4] in text
    assert "wandb" not in report and not list(paper_study.rglob("wandb*"))  # --wandb disabled: no W&B file anywhere


def test_a_study_resumes_keeping_every_finished_grid(paper_study, tmp_path, monkeypatch):
    study_dir = tmp_path / "paper"
    trained = []
    real = pipeline.train_unit

    def spy(plan, *args, **kwargs):
        trained.append(plan.run_dir.name)
        return real(plan, *args, **kwargs)

    def interrupted(plan, *args, **kwargs):
        if plan.run_dir.name == "zoom1" and args[1] == 1:  # zoom1's second level: a kill mid-study
            raise KeyboardInterrupt
        return spy(plan, *args, **kwargs)

    monkeypatch.setattr(pipeline, "train_unit", interrupted)
    with pytest.raises(SystemExit) as e:
        main([*PAPER_STUDY, "--study_dir", str(study_dir)])
    assert e.value.code == 130 and trained == ["map", "map", "map", "map-ulp", "zoom1"]  # 3 levels, a twin, level 0
    (study_dir / "map-ulp" / "cells.parquet").unlink()  # as if killed while finishing that grid: its rows are kept
    before = {p: p.stat().st_mtime_ns for p in study_dir.glob("*/rows/*.json")}
    trained.clear()
    monkeypatch.setattr(pipeline, "train_unit", spy)
    main([*PAPER_STUDY, "--study_dir", str(study_dir)])
    assert trained == ["zoom1", "zoom1", "zoom1-ulp"]  # only what was left: zoom1's last levels and its twin
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())  # no finished row file was rewritten
    got, want = strict(study_dir / "study.json"), strict(paper_study / "study.json")
    assert got["levels"] == want["levels"]  # the same numbers as the uninterrupted study


@pytest.mark.parametrize(
    "flags",
    [["--zooms", "-2"], ["--twins", "ulp,order"], ["--task", "mnist"], ["--coarse", "2"], ["--token_min", "20000"]],
)
def test_bad_study_input_is_one_line(flags, tmp_path, capsys, no_model):
    with pytest.raises(SystemExit) as e:
        main(["study", *flags, "--study_dir", str(tmp_path / "s")])
    assert e.value.code == 2
    out = capsys.readouterr().out
    assert out.startswith("error:") and len(out.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()
