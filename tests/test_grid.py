"""The `grid` command: axes, the run directory end to end, resume, torn row files, spec refusal, bad input,
out-of-memory halving and W&B offline logging. On the embedded default model with tiny grids (3 x 3 cells of
3-6 steps), so the whole file runs in seconds once the default model is built.
"""

import json
import math
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fractal_vmap.analysis.fractal import fractal_dimension
from fractal_vmap.analysis.runs import read_row
from fractal_vmap.axes import make_axis
from fractal_vmap.cli import build_parser, main
from fractal_vmap.files import finite_or_none
from fractal_vmap.finetune import run_finetune
from fractal_vmap.grid.pipeline import grid_axes, plan_grid
from fractal_vmap.machine import cpu_model
from fractal_vmap.options import FinetuneConfig, GridConfig, TrainConfig
from fractal_vmap.recipe import group_lrs
from fractal_vmap.tasks.nanochat import chunks
from fractal_vmap.tasks.nanochat import task as nanochat_task
from fractal_vmap.tasks.nanochat.axes import AXES, cell_config, cell_lrs, check_overrides
from fractal_vmap.tasks.nanochat.chunks import CPU_LANE_CHUNK, train_row
from fractal_vmap.tasks.nanochat.task import base_config

CPU = torch.device("cpu")
LOSS_TOL_PER_LR = 2.0  # lanes vs finetune at tame lrs, justified in tests/test_lanes.py
# 3 rows (num_tokens 200, 283, 400: 3, 5 and 6 steps) x 3 cols (lr 0.01, 1e5, 1e12). Measured: lr 0.01 trains,
# lr 1e5 stays finite but does not train, lr 1e12 gives a NaN loss at step 3 (so only the 3-step row stays finite)
GRID = [
    "grid",
    "--wandb",
    "disabled",
    "--device",
    "cpu",
    "--rows",
    "3",
    "--cols",
    "3",
    "--row_min",
    "200",
    "--row_max",
    "400",
    "--col_min",
    "0.01",
    "--col_max",
    "1e12",
]
CELL_COLUMNS = [
    "row",
    "col",
    "num_tokens",
    "lr",
    "stable",
    "converged",
    "trainable_ratio",
    "final_loss",
    "avg_loss",
    "measure",
    "trainable_loss0",
    "trainable_mean_last_k",
    "tokens_seen",
    "steps",
    "total_steps",
    "learning_rate",
    "matrix_lr",
    "embedding_lr",
    "unembedding_lr",
    "num_tokens_target",
    "seed",
    "error",
    "threads",
    "device",
]
PICTURES = ("trainability.png", "panels.png")


def parse_grid(args: list[str]) -> GridConfig:
    """The GridConfig the CLI builds from these flags."""
    return build_parser().parse_args(args).cfg


def cell(cfg: GridConfig, row, col, i: int, j: int) -> FinetuneConfig:
    """Cell (i, j) of the grid, as the grid makes it."""
    return cell_config(base_config(cfg), row, col, i, j, cfg.run_name or "grid")


def grid_digest(run_dir: Path) -> str:
    return json.loads((run_dir / "grid.json").read_text())["digest"]


def strict(constant: str):
    raise ValueError(f"{constant} is not JSON")


def assert_strict_json_files(run_dir: Path) -> None:
    """Every JSON file under the run dir (W&B's included) parses with a parser that rejects NaN and Infinity."""
    files = sorted(run_dir.rglob("*.json"))
    assert files
    for path in files:
        json.loads(path.read_text(), parse_constant=strict)


def only_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = [line for line in (captured.out + captured.err).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "Traceback" not in captured.out + captured.err
    return lines[0]


# ----------------------------------------------------------------------------- axes


def test_log_and_linear_axes():
    lr = make_axis("lr", 5, 0.01, 100.0, "auto", "cols", AXES)
    assert lr.scale == "log" and lr.field == "learning_rate"
    assert lr.values == pytest.approx([0.01, 0.1, 1.0, 10.0, 100.0], rel=1e-12)  # geometric: float rounding only
    wd = make_axis("weight_decay", 5, 0.0, 1.0, "auto", "rows", AXES)
    assert wd.scale == "linear" and wd.values == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0], abs=1e-15)
    forced = make_axis("lr", 3, 0.5, 1.5, "linear", "cols", AXES)  # an explicit scale overrides the axis' default
    assert forced.scale == "linear" and forced.values == pytest.approx([0.5, 1.0, 1.5], abs=1e-15)
    forced = make_axis("weight_decay", 3, 0.01, 1.0, "log", "cols", AXES)
    assert forced.values == pytest.approx([0.01, 0.1, 1.0], rel=1e-12)
    # no range given: the axis' own default range and scale
    for name, kind in AXES.items():
        (lo, hi), scale = kind.default_range, kind.scale
        axis = make_axis(name, 4, None, None, "auto", "rows", AXES)
        assert axis.scale == scale and axis.values[0] == lo and axis.values[-1] == hi, name
    assert make_axis("matrix_lr", 1, 0.3, 7.0, "auto", "cols", AXES).values == [0.3]  # one value: the min


def test_integer_axes_are_rounded():
    tokens = make_axis("num_tokens", 4, 100, 1000, "auto", "rows", AXES)  # geomspace: 100, 215.4, 464.2, 1000
    assert tokens.values == [100.0, 215.0, 464.0, 1000.0]
    seeds = make_axis("seed", 8, None, None, "auto", "cols", AXES)  # default 0..7, linear
    assert seeds.values == [float(s) for s in range(8)]
    assert make_axis("seed", 4, 0, 10, "auto", "cols", AXES).values == [0.0, 3.0, 7.0, 10.0]  # 3.33, 6.67 rounded
    ranks = make_axis("lora_rank", 6, None, None, "auto", "rows", AXES)  # default 2..64, log: the powers of two
    assert ranks.values == [2.0, 4.0, 8.0, 16.0, 32.0, 64.0]
    assert {name for name, kind in AXES.items() if kind.integer} == {"num_tokens", "seed", "lora_rank"}


@pytest.mark.parametrize("name", list(AXES))
def test_every_axis_sets_its_finetune_field(name):
    other = "lr" if name != "lr" else "seed"
    cfg = GridConfig(axes=f"{name},{other}", rows=3, cols=2, weight_decay=0.3, num_tokens=1234, run_name="g")
    row, col = grid_axes(cfg)
    field = AXES[name].setting
    assert field in FinetuneConfig.__dataclass_fields__ and row.field == field
    base = {
        k: v for k, v in asdict(cfg).items() if k in TrainConfig.__dataclass_fields__
    }  # what a grid passes to its cells
    for i in range(3):
        for j in range(2):
            c = cell(cfg, row, col, i, j)
            assert type(c) is FinetuneConfig
            value = getattr(c, field)
            assert value == row.values[i] and getattr(c, col.field) == col.values[j]
            if AXES[name].integer:
                assert type(value) is int
            assert c.run_name == f"g-r{i}-c{j}"
            untouched = {k: v for k, v in asdict(c).items() if k in base and k not in (field, col.field, "run_name")}
            assert untouched == {k: v for k, v in base.items() if k not in (field, col.field, "run_name")}


def test_matrix_lr_by_unembedding_lr_axes_reach_the_optimizer_lrs(nanochat_config):
    cfg = parse_grid(
        [
            "grid",
            "--axes",
            "matrix_lr,unembedding_lr",
            "--rows",
            "2",
            "--cols",
            "3",
            "--row_min",
            "0.001",
            "--row_max",
            "0.1",
            "--col_min",
            "0.0001",
            "--col_max",
            "0.01",
            "--learning_rate",
            "0.5",
        ]
    )
    row, col = grid_axes(cfg)
    assert (row.field, col.field) == ("matrix_lr", "unembedding_lr")
    scale = (nanochat_config.n_embd / 768) ** -0.5
    for i, m in enumerate([0.001, 0.1]):
        for j, u in enumerate([0.0001, 0.001, 0.01]):
            c = cell(cfg, row, col, i, j)
            assert c.matrix_lr == pytest.approx(m, rel=1e-12) and c.unembedding_lr == pytest.approx(u, rel=1e-12)
            lrs = group_lrs(c, nanochat_config)
            assert lrs["matrix"] == c.matrix_lr and lrs["unembedding"] == pytest.approx(u * scale, rel=1e-12)
            assert lrs["embedding"] == pytest.approx(0.5 * 10 * scale, rel=1e-12)  # not an axis: from --learning_rate


def test_a_group_lr_pinned_under_an_lr_axis_is_warned_about():
    cfg = parse_grid(["grid", "--matrix_lr", "0.01"])
    row, col = grid_axes(cfg)
    assert check_overrides(cfg, row, col) == [
        "--matrix_lr 0.01 pins the matrix lr: the cols axis (lr) moves only the unembedding lr"
    ]
    assert check_overrides(parse_grid(["grid"]), row, col) == []  # the defaults override nothing
    c = cell(cfg, row, col, 0, 3)
    assert cell_lrs(c) == {
        "learning_rate": col.values[3],
        "matrix_lr": 0.01,
        "embedding_lr": None,
        "unembedding_lr": col.values[3] * 0.2,
    }


@pytest.fixture(scope="module")
def nanochat_config():
    from fractal_vmap.model import GPTConfig

    return GPTConfig(sequence_len=128, vocab_size=289, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--axes", "num_tokens,foo"], "unknown cols axis 'foo'"),
        (["--rows", "0"], "--rows is 0"),
        (["--col_min", "0"], "log-spaced but its min is 0"),
        (["--col_min", "5", "--col_max", "1"], "min 5 > max 1"),
        (["--axes", "lr,lr"], "two different axes"),
        (["--axes", "lr"], "two different axes"),
        (["--row_scale", "cubic"], "'cubic'"),
        # cells with a non-positive lr: caught once the model is loaded (the group lrs need n_embd), before any training
        (["--axes", "num_tokens,lr", "--col_min=-1", "--col_scale", "linear"], "learning_rate is -1.0"),
        (["--axes", "matrix_lr,lr", "--row_min=-1", "--row_max", "1", "--row_scale", "linear"], "matrix_lr is -1.0"),
        (["--max_seq_len", "5000"], "max_seq_len 5000 exceeds"),  # a dataset/model mismatch, also before the run dir
    ],
)
def test_bad_grid_input_is_one_error_line(tmp_path, capsys, default_model, flags, expected):
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["grid", "--wandb", "disabled", "--device", "cpu", "--run_dir", str(run_dir), *flags])
    assert exit_info.value.code == 2
    line = only_line(capsys)
    assert line.startswith("error:") and expected in line, line
    # refused before the run dir is created: a grid.json of the bad spec would make the corrected rerun in the
    # same --run_dir fail with "another spec"
    assert not run_dir.exists()


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def grid_run(default_model, tmp_path_factory):
    """One uninterrupted 3 x 3 grid; returns its run dir and cells (tests copy the dir before changing it)."""
    run_dir = tmp_path_factory.mktemp("grid") / "run"
    main([*GRID, "--run_dir", str(run_dir)])
    return run_dir, pd.read_parquet(run_dir / "cells.parquet")


def test_grid_writes_the_run_dir(grid_run):
    run_dir, cells = grid_run
    for name in (
        "grid.json",
        "cells.parquet",
        "fractal.json",
        *PICTURES,
        *(f"rows/row_{i:04d}.json" for i in range(3)),
    ):
        assert (run_dir / name).is_file(), name
    for name in PICTURES:
        assert (run_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    spec = json.loads((run_dir / "grid.json").read_text())["spec"]
    assert spec["axes"]["rows"] == {
        "name": "num_tokens",
        "values": [200.0, 283.0, 400.0],
        "scale": "log",
    }  # 282.8 rounded
    assert spec["axes"]["cols"]["name"] == "lr" and spec["axes"]["cols"]["values"] == pytest.approx(
        [0.01, 1e5, 1e12], rel=1e-12
    )
    assert spec["settings"]["weight_decay"] == 0.1 and "run_dir" not in spec["settings"]
    # resolved, as they ran: auto is cpu, float32 and the torch kernels on this machine
    assert (spec["settings"]["device"], spec["settings"]["dtype"], spec["settings"]["kernels"]) == (
        "cpu",
        "float32",
        "torch",
    )
    assert spec["model"]["source"] == "default" and len(spec["model"]["sha256"]) == 64
    # settings the axes set cell by cell, or that no cell reads, are null: never an overridden base
    assert spec["settings"]["num_tokens"] is None and spec["settings"]["learning_rate"] is None
    # embedding frozen
    assert spec["settings"]["embedding_lr_mult"] is None and spec["settings"]["unembedding_lr_mult"] == 0.2
    assert spec["group_lrs"] == {"matrix": "cols axis (lr)", "embedding": None, "unembedding": "cols axis (lr) x 0.2"}
    assert_strict_json_files(run_dir)

    # cells.parquet: one tidy row per cell, the axis values and the labels
    assert list(cells.columns) == CELL_COLUMNS
    assert len(cells) == 9 and sorted(zip(cells["row"], cells["col"])) == [(i, j) for i in range(3) for j in range(3)]
    rows = [json.loads((run_dir / f"rows/row_{i:04d}.json").read_text()) for i in range(3)]
    for cell in cells.itertuples():
        lane = rows[cell.row]["lanes"][cell.col]
        assert rows[cell.row]["complete"] is True and len(rows[cell.row]["lanes"]) == 3
        assert cell.num_tokens == spec["axes"]["rows"]["values"][cell.row] == cell.num_tokens_target
        assert cell.lr == spec["axes"]["cols"]["values"][cell.col] == cell.learning_rate == cell.matrix_lr
        assert cell.unembedding_lr == cell.lr * 0.2 and math.isnan(cell.embedding_lr)  # the lrs the cell trained with
        ran = (rows[cell.row]["threads"], rows[cell.row]["device"])  # what the row file records, as this process ran it
        assert (cell.threads, cell.device) == ran == (torch.get_num_threads(), cpu_model())
        assert (lane["grid_i"], lane["grid_j"]) == (cell.row, cell.col)
        assert len(lane["losses"]) == cell.steps and cell.total_steps == {0: 3, 1: 5, 2: 6}[cell.row]
        for key in ("final_loss", "trainable_ratio", "measure", "tokens_seen", "stable", "converged"):
            # strict JSON: a non-finite number is null in the row file, NaN in the table
            assert getattr(cell, key) == lane[key] or (math.isnan(getattr(cell, key)) and lane[key] is None), key
        assert (
            cell.measure < 0
        ) == cell.converged  # the paper's sign and the label agree (both use mean(last K) / loss0)
        assert pd.isna(cell.error) == cell.stable
    # the grid is not vacuous: it has cells that trained, cells that did not, and cells that diverged
    assert cells["converged"].any() and (cells["stable"] & ~cells["converged"]).any() and (~cells["stable"]).any()

    fractal = json.loads((run_dir / "fractal.json").read_text())
    measure = np.full((3, 3), np.nan)
    measure[cells["row"].to_numpy(), cells["col"].to_numpy()] = cells["measure"].to_numpy()
    assert not np.isnan(measure).any()
    for key, value in fractal_dimension(measure).items():
        # strict JSON: null for the NaN of a grid too small for a dimension
        assert fractal[key] == finite_or_none(value), key
    assert fractal["trainable_fraction"] == cells["converged"].mean()
    assert (fractal["rows_axis"], fractal["cols_axis"]) == ("num_tokens", "lr")


@pytest.mark.parametrize("i, j", [(1, 0), (2, 1), (1, 2)])  # trained, finite but not trained, diverged
def test_grid_cell_equals_finetune(grid_run, tmp_path, i, j):
    """A grid cell against `fractal-vmap finetune` with the same settings: losses within the noise floor where
    training is tame (lr 0.01), labels where it is chaotic (lr 1e5: ratio ~4, far from the threshold; lr 1e12: NaN)."""
    run_dir, cells = grid_run
    cfg = parse_grid([*GRID, "--run_dir", str(run_dir)])
    row, col = grid_axes(cfg)
    single = run_finetune(replace(cell(cfg, row, col, i, j), out=str(tmp_path / "cell.json")))
    got = cells[(cells["row"] == i) & (cells["col"] == j)].iloc[0]
    lane = json.loads((run_dir / f"rows/row_{i:04d}.json").read_text())["lanes"][j]
    assert (single["num_tokens_target"], single["learning_rate"]) == (got["num_tokens_target"], got["learning_rate"])
    assert (bool(got["stable"]), bool(got["converged"])) == (single["stable"], single["converged"])
    assert (
        got["steps"] == single["steps"]
        and got["tokens_seen"] == single["tokens_seen"]
        and got["total_steps"] == single["total_steps"]
    )
    assert {(1, 0): (True, True), (2, 1): (True, False), (1, 2): (False, False)}[(i, j)] == (
        single["stable"],
        single["converged"],
    )
    if (i, j) == (1, 0):
        tol = LOSS_TOL_PER_LR * single["learning_rate"]  # tests/test_lanes.py: 2 x lr, 4x the measured noise floor
        assert np.abs(np.array(lane["losses"]) - single["losses"]).max() <= tol
        assert got["final_loss"] == pytest.approx(single["final_loss"], abs=tol)
        # loss0 ~ 4: ratio gap < loss gap
        assert got["trainable_ratio"] == pytest.approx(single["trainable_ratio"], abs=tol)
    elif (i, j) == (2, 1):
        # a robust label: far above the threshold
        assert single["trainable_ratio"] > 1.2 and got["trainable_ratio"] > 1.2
    else:
        assert math.isnan(got["final_loss"]) and math.isnan(single["final_loss"])
        assert got["measure"] > 0


# ----------------------------------------------------------------------------- resume


def copy_run(grid_run, tmp_path) -> Path:
    """A copy of the finished run dir (copytree keeps mtimes), so each test changes its own."""
    return Path(shutil.copytree(grid_run[0], tmp_path / "run"))


def mtimes(run_dir: Path) -> dict[str, int]:
    return {
        p.name: p.stat().st_mtime_ns for p in [run_dir / "grid.json", *sorted((run_dir / "rows").glob("row_*.json"))]
    }


@pytest.fixture
def trained_rows(monkeypatch):
    """The rows the grid actually trains (a spy on the nanochat task's train_row)."""
    seen = []
    real = nanochat_task.train_row

    def spy(plan, cell_cfgs, *args):
        seen.append(cell_cfgs[0].run_name.split("-")[-2])  # "grid-r{i}-c0" -> "r{i}"
        return real(plan, cell_cfgs, *args)

    monkeypatch.setattr(nanochat_task, "train_row", spy)
    return seen


def test_killed_grid_resumes_to_the_same_cells(grid_run, tmp_path, trained_rows):
    run_dir = copy_run(grid_run, tmp_path)
    before = mtimes(run_dir)
    row2 = json.loads((run_dir / "rows/row_0002.json").read_text())
    # as if killed while training the last row: its file, the table and the pictures were never written
    for name in ("rows/row_0002.json", "cells.parquet", "fractal.json", *PICTURES):
        (run_dir / name).unlink()
    main([*GRID, "--run_dir", str(run_dir)])
    assert trained_rows == ["r2"]
    pd.testing.assert_frame_equal(pd.read_parquet(run_dir / "cells.parquet"), grid_run[1], check_exact=True)
    after = mtimes(run_dir)
    for name in ("grid.json", "row_0000.json", "row_0001.json"):  # finished rows are kept, not rewritten
        assert after[name] == before[name], name
    redone = json.loads((run_dir / "rows/row_0002.json").read_text())
    for a, b in zip(redone["lanes"], row2["lanes"]):  # the row itself is recomputed bit for bit (CPU is deterministic)
        assert json.dumps({**a, "runtime_s": 0}) == json.dumps({**b, "runtime_s": 0})
    for name in ("fractal.json", *PICTURES):
        assert (run_dir / name).is_file()
    # a finished grid rerun (run-only flags such as --lane_chunk may change) trains nothing and writes the same table
    main([*GRID, "--run_dir", str(run_dir), "--lane_chunk", "1"])
    assert trained_rows == ["r2"]
    pd.testing.assert_frame_equal(pd.read_parquet(run_dir / "cells.parquet"), grid_run[1], check_exact=True)
    assert mtimes(run_dir) == after


def test_torn_row_file_is_run_again(grid_run, tmp_path, trained_rows):
    run_dir = copy_run(grid_run, tmp_path)
    before = mtimes(run_dir)
    row0 = run_dir / "rows/row_0000.json"
    data = row0.read_bytes()
    row0.write_bytes(data[: len(data) // 2])
    assert read_row(row0, 3, grid_digest(run_dir)) is None
    main([*GRID, "--run_dir", str(run_dir)])
    assert trained_rows == ["r0"]
    assert json.loads(row0.read_text())["complete"] is True
    pd.testing.assert_frame_equal(pd.read_parquet(run_dir / "cells.parquet"), grid_run[1], check_exact=True)
    after = mtimes(run_dir)
    assert after["row_0000.json"] != before["row_0000.json"]
    assert {k: after[k] for k in ("grid.json", "row_0001.json", "row_0002.json")} == {
        k: before[k] for k in ("grid.json", "row_0001.json", "row_0002.json")
    }


def test_read_row_accepts_only_complete_rows_of_this_spec(tmp_path, capsys):
    path, digest = tmp_path / "row_0000.json", "d" * 64
    assert read_row(path, 2, digest) is None  # missing
    lanes = [{"final_loss": 1.0}, {"final_loss": None}]
    row = {"complete": True, "spec_digest": digest, "lanes": lanes}
    for data in (
        {**row, "complete": False},
        {**row, "lanes": lanes[:1]},
        {k: v for k, v in row.items() if k != "complete"},
        {**row, "spec_digest": "e" * 64},
        {k: v for k, v in row.items() if k != "spec_digest"},
        [row],
        "row",
    ):
        path.write_text(json.dumps(data))
        assert read_row(path, 2, digest) is None, data
    path.write_text("")
    assert read_row(path, 2, digest) is None  # empty (torn at 0 bytes)
    out = capsys.readouterr().out
    assert "another spec" in out and "not a row" in out and "torn" in out  # each says why the row is trained again
    path.write_text(json.dumps(row))
    assert read_row(path, 2, digest) == lanes  # a row written before threads and device were recorded
    path.write_text(json.dumps({**row, "threads": 3, "device": "Some CPU"}))
    # each lane with what its row ran with
    assert read_row(path, 2, digest) == [{**lane, "threads": 3, "device": "Some CPU"} for lane in lanes]


@pytest.mark.parametrize("flags, differs", [(["--weight_decay", "0.2"], "settings"), (["--cols", "4"], "axes")])
def test_other_spec_in_the_same_run_dir_is_refused(grid_run, tmp_path, capsys, trained_rows, flags, differs):
    run_dir = copy_run(grid_run, tmp_path)
    before = mtimes(run_dir)
    grid_json = (run_dir / "grid.json").read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([*GRID, "--run_dir", str(run_dir), *flags])
    assert exit_info.value.code == 2
    line = only_line(capsys)
    assert line.startswith("error:") and str(run_dir) in line and differs in line, line
    assert trained_rows == [] and mtimes(run_dir) == before and (run_dir / "grid.json").read_bytes() == grid_json


def test_rows_of_another_spec_are_never_reused(grid_run, tmp_path, trained_rows, capsys):
    """grid.json deleted (or lost) and the dir rerun with another --col_max: the old rows carry the old spec's digest,
    so every row is trained again under the new values instead of being relabelled."""
    run_dir = copy_run(grid_run, tmp_path)
    (run_dir / "grid.json").unlink()
    main([*GRID[:-1], "1e11", "--run_dir", str(run_dir)])
    assert trained_rows == ["r0", "r1", "r2"]
    assert "trained under another spec" in capsys.readouterr().out
    cells = pd.read_parquet(run_dir / "cells.parquet")
    assert cells["lr"].max() == pytest.approx(1e11, rel=1e-12)
    digest = grid_digest(run_dir)
    for i in range(3):
        assert json.loads((run_dir / f"rows/row_{i:04d}.json").read_text())["spec_digest"] == digest


def test_device_auto_and_cpu_are_the_same_spec(grid_run, tmp_path, trained_rows):
    """--device auto resolves to the CPU here: the same spec, so the finished grid resumes with nothing to train."""
    run_dir = copy_run(grid_run, tmp_path)
    argv = [*GRID, "--run_dir", str(run_dir)]
    main(
        [*argv[: argv.index("--device")], *argv[argv.index("--device") + 2 :], "--device", "auto", "--dtype", "float32"]
    )
    assert trained_rows == []


# ----------------------------------------------------------------------------- out of memory


@pytest.fixture(scope="module")
def one_row(default_model, tmp_path_factory):
    """The plan of a 1 x 5 grid (num_tokens 200: 3 steps; lr 0.01 .. 100) and its row's cells."""
    cfg = GridConfig(
        axes="num_tokens,lr",
        rows=1,
        cols=5,
        row_min=200,
        row_max=200,
        col_min=0.01,
        col_max=100.0,
        device="cpu",
        wandb="disabled",
        run_dir=str(tmp_path_factory.mktemp("one_row") / "run"),
    )
    plan = plan_grid(cfg)
    return plan, plan.cells[0]


def without_runtime(results: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "runtime_s"} for r in results]


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory (simulated)"),
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] . DefaultCPUAllocator: can't allocate memory: "
            "you tried to allocate 1 bytes. Error code 12 (Cannot allocate memory)"
        ),
    ],
    ids=["cuda", "cpu-allocator"],
)
def test_out_of_memory_halves_the_lane_chunk(one_row, monkeypatch, capsys, error):
    plan, cells = one_row
    assert plan.cfg.lane_chunk == 0 and CPU_LANE_CHUNK >= 5  # auto: the whole row of 5 in one chunk on CPU
    reference, chunk = train_row(plan, cells)
    assert chunk == len(cells) == 5  # the chunk that ran: the whole row (auto caps at CPU_LANE_CHUNK)
    real, seen = chunks.train_lanes, []

    def small_memory(cfgs, *args, **kwargs):
        seen.append(len(cfgs))
        if len(cfgs) > 2:
            raise error
        return real(cfgs, *args, **kwargs)

    monkeypatch.setattr(chunks, "train_lanes", small_memory)
    capsys.readouterr()
    results, chunk = train_row(plan, cells)
    assert seen == [5, 2, 2, 1] and chunk == 2  # the row's 5 lanes fail, then chunks of 2 + 2 + 1 succeed
    out = capsys.readouterr().out
    assert "retrying the row with 2 lanes" in out
    # chunking changes no number (lanes.py: a lane never trains in a batch of one; the contract is bit for bit)
    assert without_runtime(results) == without_runtime(reference)
    assert [r["run_name"] for r in results] == [c.run_name for c in cells]
    assert len({r["final_loss"] for r in results}) == 5  # five different lanes, in order


def test_out_of_memory_with_one_lane_is_raised_and_other_errors_pass_through(one_row, monkeypatch):
    plan, cells = one_row
    seen = []

    def no_memory(cfgs, *args, **kwargs):
        seen.append(len(cfgs))
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(chunks, "train_lanes", no_memory)
    with pytest.raises(torch.OutOfMemoryError):
        train_row(replace(plan, cfg=replace(plan.cfg, lane_chunk=3)), cells)
    assert seen == [3, 1]  # --lane_chunk 3, halved to 1, and a lane that does not fit alone is a real error

    def broken(cfgs, *args, **kwargs):
        seen.append(len(cfgs))
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(chunks, "train_lanes", broken)
    with pytest.raises(RuntimeError, match="shapes"):
        train_row(plan, cells)
    assert seen == [3, 1, 5]  # a bug is not mistaken for out-of-memory: no halving


# ----------------------------------------------------------------------------- W&B


def test_grid_is_one_wandb_run_across_resumes(default_model, tmp_path, capsys):
    """Offline: each invocation writes a folder under <run dir>/wandb, all with the run id kept in the run dir, and the
    exact command that uploads them as one run is printed."""
    import wandb

    run_dir = tmp_path / "run"
    argv = [
        "grid",
        "--wandb",
        "offline",
        "--device",
        "cpu",
        "--rows",
        "2",
        "--cols",
        "2",
        "--row_min",
        "100",
        "--row_max",
        "200",
        "--col_min",
        "0.01",
        "--col_max",
        "0.1",
        "--run_dir",
        str(run_dir),
    ]
    main(argv)
    (run_dir / "rows/row_0001.json").unlink()  # as if killed while training the last row
    main(argv)
    wandb.teardown()  # waits for W&B's service to write out and close its files (reading them earlier is a race)
    run_id = (run_dir / "wandb_id").read_text().strip()
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(f"-{run_id}") for r in runs), runs
    assert capsys.readouterr().out.count(f"to upload it: wandb sync {run_dir / 'wandb'}") == 2
    first, second = ((r / f"run-{run_id}.wandb").read_bytes() for r in runs)
    # metric keys are plain strings in the protobuf log: per-row metrics, the pictures, the cell table, the summary
    for key in (
        b"row/converged_frac",
        b"row/stable_frac",
        b"trainability",
        b"panels",
        b"cells",
        b"fractal_dimension",
        b"trainable_fraction",
    ):
        assert key in first and key in second, key
    assert_strict_json_files(run_dir)


# ----------------------------------------------------------------------------- what the files record


def test_grid_json_and_cells_record_the_lrs_each_cell_used(default_model, tmp_path):
    """A matrix_lr x unembedding_lr grid: the base learning_rate is read by no cell, so it is null in grid.json and in
    cells.parquet; the group lrs each cell trained with are columns."""
    run_dir = tmp_path / "run"
    main(
        [
            "grid",
            "--wandb",
            "disabled",
            "--device",
            "cpu",
            "--axes",
            "matrix_lr,unembedding_lr",
            "--rows",
            "1",
            "--cols",
            "2",
            "--row_min",
            "0.01",
            "--row_max",
            "0.01",
            "--col_min",
            "0.001",
            "--col_max",
            "0.002",
            "--num_tokens",
            "200",
            "--run_dir",
            str(run_dir),
        ]
    )
    spec = json.loads((run_dir / "grid.json").read_text())["spec"]
    settings = spec["settings"]
    assert settings["num_tokens"] == 200 and settings["weight_decay"] == 0.1
    for name in (
        "learning_rate",
        "matrix_lr",
        "unembedding_lr",
        "embedding_lr",
        "embedding_lr_mult",
        "unembedding_lr_mult",
    ):
        assert settings[name] is None, name
    assert spec["group_lrs"] == {
        "matrix": "rows axis (matrix_lr)",
        "embedding": None,
        "unembedding": "cols axis (unembedding_lr)",
    }
    cells = pd.read_parquet(run_dir / "cells.parquet")
    assert cells["learning_rate"].isna().all() and cells["embedding_lr"].isna().all()
    assert cells["matrix_lr"].tolist() == [0.01, 0.01]
    assert cells["unembedding_lr"].tolist() == pytest.approx([0.001, 0.002], rel=1e-12)
    assert_strict_json_files(run_dir)


# ----------------------------------------------------------------------------- plot


def test_plot_redraws_identical_pictures_from_the_files(grid_run, tmp_path):
    run_dir = copy_run(grid_run, tmp_path)
    before = {name: (run_dir / name).read_bytes() for name in PICTURES}
    for name in PICTURES:
        (run_dir / name).unlink()
    main(["plot", str(run_dir)])
    assert {name: (run_dir / name).read_bytes() for name in PICTURES} == before


def test_plot_relabels_cells_from_their_loss_curves(grid_run, tmp_path, capsys):
    from fractal_vmap.analysis.plot import relabel

    run_dir, cells = copy_run(grid_run, tmp_path), grid_run[1]
    grid_json = json.loads((run_dir / "grid.json").read_text())
    # at the grid's own window and threshold, relabelling from the row files gives the grid's labels and measure exactly
    blank = cells.assign(measure=0.0, converged=False, trainable_ratio=0.0)
    pd.testing.assert_frame_equal(relabel(run_dir, grid_json, blank, 20, 1.0), cells, check_exact=True)
    # a looser threshold: every stable cell whose last losses stay under 10x the first trains
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["plot", str(run_dir), "--trainable_loss_ratio_threshold", "10"])
    assert "pass --out" in only_line(capsys)
    out = tmp_path / "loose"
    main(["plot", str(run_dir), "--trainable_loss_ratio_threshold", "10", "--out", str(out)])
    loose = pd.read_parquet(out / "cells.parquet")
    expected = cells["stable"] & (cells["trainable_ratio"] < 10)
    assert (loose["converged"] == expected).all() and (loose["converged"] != cells["converged"]).any()
    assert ((loose["measure"] < 0) == loose["converged"]).all()
    fractal = json.loads((out / "fractal.json").read_text(), parse_constant=strict)
    assert fractal["trainable_fraction"] == expected.mean()
    for name in PICTURES:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
