"""The paper's task as a grid (`grid --task paper-mlp`), `zoom`, `boxes` and `animate`, end to end through the CLI on
small grids (12 x 12 lanes, 25 steps: seconds)."""

import json
import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fractal_vmap.analysis.animate import CAPTION_PX
from fractal_vmap.analysis.fractal import edge_pixels
from fractal_vmap.analysis.labels import convergence_measure
from fractal_vmap.analysis.runs import read_level
from fractal_vmap.cli import main
from fractal_vmap.tasks.paper.mlp import PaperConfig, paper_grid

SIZE, STEPS = 12, 25
# the default view's band where both phases meet at 12 x 12 (lr1 around 10^1.5, lr0 beyond 10^2: the ragged part)
VIEW = ["--row_min", "1", "--row_max", "1e3", "--col_min", "1e-1", "--col_max", "1e5"]
GRID = [
    "grid",
    "--task",
    "paper-mlp",
    "--rows",
    str(SIZE),
    "--cols",
    str(SIZE),
    "--num_iterations",
    str(STEPS),
    *VIEW,
    "--seed",
    "0",
]


def strict(path):
    return json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{path} holds {c}"))


def cells(run_dir) -> pd.DataFrame:
    return pd.read_parquet(run_dir / "cells.parquet").sort_values(["row", "col"]).reset_index(drop=True)


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("paper") / "run"
    main([*GRID, "--run_dir", str(run_dir)])
    return run_dir


def test_a_paper_grid_is_the_paper_trainer_in_a_run_dir(parent, capsys):
    spec = strict(parent / "grid.json")["spec"]
    assert spec["settings"]["task"] == "paper-mlp" and spec["settings"]["dtype"] == "float64"
    rows, cols = (np.array(spec["axes"][k]["values"]) for k in ("rows", "cols"))
    assert (spec["axes"]["rows"]["name"], spec["axes"]["cols"]["name"]) == ("lr1", "lr0")
    assert len(list((parent / "rows").glob("row_*.json"))) == SIZE
    fractal = strict(parent / "fractal.json")
    got = cells(parent)
    assert len(got) == SIZE * SIZE and 0 < fractal["trainable_fraction"] < 1  # both phases in the view
    # the same network trained in one call over the whole grid (paper.paper_grid), measured by fractal.py directly
    losses = paper_grid(PaperConfig(steps=STEPS, seed=0), rows, cols)  # [steps, rows, cols]
    want = convergence_measure(losses.permute(1, 2, 0).numpy())
    np.testing.assert_array_equal(got["measure"].to_numpy().reshape(SIZE, SIZE), want)
    assert (got["converged"] == (got["measure"] < 0)).all()
    assert (parent / "trainability.png").stat().st_size > 0 and (parent / "panels.png").stat().st_size > 0
    before = {p.name: p.stat().st_mtime_ns for p in (parent / "rows").iterdir()}
    capsys.readouterr()
    main([*GRID, "--run_dir", str(parent)])  # a rerun resumes: every row is kept
    assert f"resuming: {SIZE}/{SIZE} rows already done" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in (parent / "rows").iterdir()} == before


def test_a_zoom_at_the_parents_spacing_reproduces_its_cells(parent, tmp_path):
    child = tmp_path / "zoom"
    main(["zoom", str(parent), "--box", "3:9,2:7", "--run_dir", str(child)])
    spec = strict(child / "grid.json")["spec"]
    assert spec["parent"]["box"] == [3, 9, 2, 7] and spec["parent"]["run_dir"] == str(parent.resolve())
    block = (
        cells(parent).query("3 <= row < 9 and 2 <= col < 7").assign(row=lambda d: d.row - 3, col=lambda d: d.col - 2)
    )
    mine = cells(child)
    assert len(mine) == 6 * 5
    columns = ["row", "col", "lr1", "lr0", "measure", "final_loss", "converged", "stable"]
    # the same lanes, bit for bit
    pd.testing.assert_frame_equal(mine[columns], block.reset_index(drop=True)[columns], check_exact=True)


def test_a_finer_zoom_spans_the_box(parent, tmp_path):
    child = tmp_path / "fine"
    main(["zoom", str(parent), "--box", "3:9,2:7", "--rows", "4", "--cols", "3", "--run_dir", str(child)])
    parent_axes = strict(parent / "grid.json")["spec"]["axes"]
    axes = strict(child / "grid.json")["spec"]["axes"]
    assert len(axes["rows"]["values"]) == 4 and len(axes["cols"]["values"]) == 3
    assert math.isclose(axes["rows"]["values"][0], parent_axes["rows"]["values"][3], rel_tol=1e-12)
    assert math.isclose(axes["cols"]["values"][-1], parent_axes["cols"]["values"][6], rel_tol=1e-12)


def test_boxes_hold_the_boundary(parent, capsys):
    from fractal_vmap.analysis.boxes import suggest_boxes
    from fractal_vmap.options import BoxesConfig

    boxes = suggest_boxes(BoxesConfig(run=str(parent), size=4, count=3))
    measure = cells(parent)["measure"].to_numpy().reshape(SIZE, SIZE)
    edges = edge_pixels(measure)
    assert boxes and boxes == sorted(boxes, key=lambda b: -b["edge_pixels"])
    for b in boxes:
        (r0, r1), (c0, c1) = (map(int, part.split(":")) for part in b["box"].split(","))
        assert r1 - r0 == c1 - c0 == 4
        assert b["edge_pixels"] == edges[r0 : r1 - 1, c0 : c1 - 1].sum() > 0  # edge pixels inside the box
    main(["boxes", str(parent), "--size", "4"])
    assert f"fractal-vmap zoom {parent} --box {boxes[0]['box']}" in capsys.readouterr().out


def test_animate_plays_the_chain(parent, tmp_path):
    child = tmp_path / "zoom"
    main(["zoom", str(parent), "--box", "0:6,6:12", "--run_dir", str(child)])
    main(["animate", str(parent), str(child), "--out", str(tmp_path / "z.gif"), "--size", "64"])
    gif = Image.open(tmp_path / "z.gif")
    assert gif.n_frames == 2 and gif.size == (64, 64 + CAPTION_PX)  # the parent with the box, then the child
    with pytest.raises(SystemExit) as e:
        main(["animate", str(child), str(parent), "--out", str(tmp_path / "bad.gif")])  # the wrong order
    assert e.value.code == 2


@pytest.mark.parametrize(
    "argv",
    [
        ["grid", "--width", "16", "--rows", "1"],  # a paper setting on a nanochat grid
        ["grid", "--task", "paper-mlp", "--axes", "lr,seed"],  # nanochat axes on the paper task
        ["grid", "--task", "paper-mlp", "--phase_space", "lr_vs_width"],
        ["grid", "--task", "paper-mlp", "--dtype", "bfloat16"],
        ["grid", "--task", "mnist"],
    ],
)
def test_bad_task_settings_are_one_line(argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--run_dir", str(tmp_path / "r")])
    out = capsys.readouterr().out
    assert e.value.code == 2 and out.startswith("error:") and "Traceback" not in out
    assert not (tmp_path / "r").exists()


def test_bad_boxes_are_one_line(parent, tmp_path, capsys):
    for argv in (
        ["zoom", str(parent), "--box", "0:13,0:4"],
        ["zoom", str(parent), "--box", "4:2,0:4"],
        ["zoom", str(parent)],
        ["zoom", str(tmp_path), "--box", "0:2,0:2"],
        ["boxes", str(parent), "--size", "1"],
    ):
        with pytest.raises(SystemExit) as e:
            main([*argv, "--run_dir", str(tmp_path / "z")] if argv[0] == "zoom" else argv)
        assert e.value.code == 2, argv
        assert capsys.readouterr().out.startswith("error:"), argv


def test_refinement_trains_near_the_boundary_and_equals_the_full_grid_where_it_trained(parent, tmp_path):
    """--refine 2 from the 12 x 12 view's 7 x 7 coarse grid: a 25 x 25 map. Every cell it trained equals the full 25 x
    25 grid's bit for bit (the same lanes); the others take their coarse parent's result, marked untrained."""
    view = ["--task", "paper-mlp", "--num_iterations", str(STEPS), "--seed", "0", *VIEW]
    main(["grid", *view, "--rows", "25", "--cols", "25", "--run_dir", str(tmp_path / "full")])
    main(["grid", *view, "--rows", "7", "--cols", "7", "--refine", "2", "--run_dir", str(tmp_path / "refined")])
    full, refined = cells(tmp_path / "full"), cells(tmp_path / "refined")
    assert strict(tmp_path / "refined" / "grid.json")["spec"]["settings"]["refine"] == 2
    trained = refined["trained"].to_numpy()
    assert refined["lr1"].tolist() == full["lr1"].tolist() and refined["lr0"].tolist() == full["lr0"].tolist()
    assert 49 < trained.sum() < 625  # more than the coarse grid, fewer than every cell
    assert set(refined["level"][refined["row"].mod(4).eq(0) & refined["col"].mod(4).eq(0)]) == {
        0
    }  # the coarse grid: level 0
    assert refined["measure"][trained].tolist() == full["measure"][trained].tolist()
    differ = refined["converged"] != full["converged"]
    assert not (differ & trained).any()  # only where it did not look
    print(f"refine 2 on 25 x 25: trained {trained.sum()} of 625 cells, {differ.sum()} differ from the full grid")


def test_a_nanochat_zoom_reproduces_its_cells(default_model, tmp_path):
    grid = [
        "grid",
        "--axes",
        "matrix_lr,unembedding_lr",
        "--rows",
        "2",
        "--cols",
        "3",
        "--num_iterations",
        "4",
        "--wandb",
        "disabled",
        "--device",
        "cpu",
        "--run_dir",
        str(tmp_path / "parent"),
    ]
    main(grid)
    main(["zoom", str(tmp_path / "parent"), "--box", "1:2,1:3", "--run_dir", str(tmp_path / "zoom")])
    block = (
        cells(tmp_path / "parent")
        .query("row == 1 and col >= 1")
        .assign(row=0, col=lambda d: d.col - 1)
        .reset_index(drop=True)
    )
    columns = ["row", "col", "matrix_lr", "unembedding_lr", "final_loss", "measure", "converged"]
    pd.testing.assert_frame_equal(cells(tmp_path / "zoom")[columns], block[columns], check_exact=True)


def test_a_refined_nanochat_grid_equals_the_full_grid_where_it_trained(default_model, tmp_path):
    base = [
        "grid",
        "--axes",
        "matrix_lr,unembedding_lr",
        "--num_iterations",
        "3",
        "--wandb",
        "disabled",
        "--device",
        "cpu",
        "--row_min",
        "1e-2",
        "--row_max",
        "1e2",
        "--col_min",
        "1e-3",
        "--col_max",
        "1e1",
    ]
    main([*base, "--rows", "3", "--cols", "3", "--run_dir", str(tmp_path / "full")])
    main(
        [
            *base,
            "--rows",
            "2",
            "--cols",
            "2",
            "--refine",
            "1",
            "--lane_chunk",
            "3",
            "--run_dir",
            str(tmp_path / "refined"),
        ]
    )
    full, refined = cells(tmp_path / "full"), cells(tmp_path / "refined")
    # each level's file records the lane chunk its row trained with (level 0: 4 cells in chunks of 3), not the
    # paper task's LANE_CHUNK
    digest = json.loads((tmp_path / "refined" / "grid.json").read_text())["digest"]
    level0, lanes0 = read_level(tmp_path / "refined" / "rows" / "row_0000.npz", digest)  # a level's compact file
    assert level0["lane_chunk"] == 3 and level0["cells"] == len(lanes0["grid_i"]) == 4
    trained = refined["trained"].to_numpy()
    # level 0: the corners
    assert refined["matrix_lr"].tolist() == full["matrix_lr"].tolist() and trained[[0, 2, 6, 8]].all()
    columns = ["final_loss", "measure", "converged"]
    pd.testing.assert_frame_equal(refined[trained][columns], full[trained][columns], check_exact=True)
