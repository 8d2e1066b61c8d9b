"""A study's plane: --plane picks the map's two axes, and --lora_rank makes every grid of the study a grid of LoRA
lanes (the map on matrix_lr x lora_alpha, since under LoRA the lm_head is frozen). A tiny LoRA study on the embedded
default model (a 5 x 5 map of 4-7 steps a cell, one twin) and the plane's bad input, one line each."""

import json

import pandas as pd
import pytest

from fractal_vmap.analysis.dimension import calibrated_dimension
from fractal_vmap.analysis.runs import read_grid
from fractal_vmap.cli import main


def spec(run_dir):
    return json.loads((run_dir / "grid.json").read_text())["spec"]


def test_a_lora_study_trains_lora_lanes_on_its_plane_in_every_grid(default_model, tmp_path):
    study_dir = tmp_path / "lora"
    tiny = ["--coarse", "3", "--refine", "1", "--zooms", "0", "--twins", "ulp", "--num_tokens", "300"]
    tokens = ["--token_min", "200", "--token_max", "400", "--token_rows", "2", "--token_refine", "1"]
    main(["study", *tiny, *tokens, "--lora_rank", "2", "--lora_alpha", "8", "--wandb", "disabled"] + [
        "--study_dir", str(study_dir)
    ])  # fmt: skip
    report = json.loads((study_dir / "study.json").read_text())
    grids = {g["name"] for g in report["ran"]["grids"]}
    assert grids == {"map", "map-ulp", "tokens", "tokens-ulp"}
    for name in grids:
        assert spec(study_dir / name)["settings"]["lora_rank"] == 2, name
    top = spec(study_dir / "map")
    assert (top["axes"]["rows"]["name"], top["axes"]["cols"]["name"]) == ("matrix_lr", "lora_alpha")
    cells = pd.read_parquet(study_dir / "map" / "cells.parquet")
    assert cells["lora_alpha"].nunique() == 5 and cells["matrix_lr"].nunique() == 5  # the plane sweeps alpha
    assert spec(study_dir / "tokens")["settings"]["lora_alpha"] == 8.0  # --lora_alpha is the tokens plane's
    level = report["levels"][0]
    want = calibrated_dimension(read_grid(str(study_dir / "map"))[2], [read_grid(str(study_dir / "map-ulp"))[2]])
    assert json.loads(json.dumps(want)) == level["dimension"]
    assert level["rows"]["name"] == "matrix_lr" and level["cols"]["name"] == "lora_alpha"
    assert "lora_alpha" in (study_dir / "REPORT.md").read_text()
    for g in report["ran"]["grids"]:  # the cost of every grid, refined ones included (their units are level files)
        cells = pd.read_parquet(study_dir / g["name"] / "cells.parquet")
        trained = cells[cells["trained"]]
        assert g["cells_trained"] == len(trained) > 0 and g["lane_steps"] == trained["steps"].sum() > len(trained)
        assert g["train_seconds"] > 0, g
    assert report["ran"]["lane_steps"] == sum(g["lane_steps"] for g in report["ran"]["grids"])


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--plane", "lora_rank,lr"], "take integers"),
        (["--plane", "lr"], "two different axes"),
        (["--plane", "lr,lr"], "two different axes"),
        (["--plane", "matrix_lr,lora_alpha"], "needs --lora_rank"),
        (["--lora_rank", "4", "--plane", "matrix_lr,unembedding_lr"], "lm_head are frozen"),
        (["--task", "paper-mlp", "--lora_rank", "4"], "nanochat-sft's"),
        (["--token_refine", "9"], "--token_refine 9"),
    ],
)
def test_a_bad_plane_is_one_line(flags, says, tmp_path, capsys, no_model):
    with pytest.raises(SystemExit) as e:
        main(["study", *flags, "--study_dir", str(tmp_path / "s")])
    assert e.value.code == 2
    out = capsys.readouterr().out
    assert out.startswith("error:") and says in out and len(out.strip().splitlines()) == 1, out
    assert not (tmp_path / "s").exists()
