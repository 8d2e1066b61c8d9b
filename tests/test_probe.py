"""The hostile probe of issue 15: a full disk, bad data and settings that were silently ignored or misread. Each case
ends in exit code 2 and one line naming what is wrong and what to do (before any training where the input is bad), or
in the behaviour the issue asks for."""

import errno
import math
import os
import subprocess
from pathlib import Path

import pytest

from fractal_vmap.cli import main
from fractal_vmap.tasks.nanochat.axes import AXES
from tests.test_bad_input import FAST, FIXTURE, refused
from tests.test_levels import refined_map_finish

# a paper-mlp grid of 2 x 3 lanes and 5 steps, no W&B: a run dir with every file a grid writes, in well under a second
PAPER = [
    "grid",
    "--task",
    "paper-mlp",
    "--rows",
    "2",
    "--cols",
    "3",
    "--num_iterations",
    "5",
    "--seed",
    "0",
    "--wandb",
    "disabled",
]


def stopped(capsys, argv: list[str], expected: str) -> str:
    """Run the CLI that fails mid-run (after what it printed on the way): exit 2, no traceback, and one last line,
    the only one starting with error:, holding `expected`."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    captured = capsys.readouterr()
    text = captured.out + captured.err
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert exit_info.value.code == 2 and "Traceback" not in text
    assert len(errors) == 1 and text.rstrip().endswith(errors[0]) and expected in errors[0], text
    return errors[0]


def temp_files(run_dir: Path) -> list[Path]:
    return sorted(p for d in (run_dir, run_dir / "rows") if d.is_dir() for p in d.iterdir() if ".tmp-" in p.name)


# ----------------------------------------------------------------------------- a full disk


def fail_half_way(write, name: str):
    """`write(self, target, ...)` that, for a target named `name` (or its temp file), writes a little and then fails as
    a full disk does."""

    def failing(self, target, *args, **kwargs):
        target = Path(self if target is None else target)
        if target.name.startswith(f".{name}") or target.name.endswith(f"-{name}"):
            target.write_text("half")  # what a full disk leaves: a torn temp file
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write(self, *((target,) if target is not self else ()), *args, **kwargs)

    return failing


def inject_no_space(monkeypatch, which: str) -> None:
    import matplotlib.figure

    if which in ("row file", "cells.parquet"):  # write_atomic's temp file (of row 1: row 0 is written first)
        write_bytes = Path.write_bytes
        name = "row_0001.json" if which == "row file" else "cells.parquet"
        fail = fail_half_way(lambda self, target, data: write_bytes(target, data), name)
        monkeypatch.setattr(Path, "write_bytes", lambda self, data: fail(self, None, data))
    else:
        savefig = matplotlib.figure.Figure.savefig
        monkeypatch.setattr(matplotlib.figure.Figure, "savefig", fail_half_way(savefig, "trainability.png"))


@pytest.mark.parametrize(
    "which, written",
    [("row file", "row_0001.json"), ("cells.parquet", "cells.parquet"), ("picture", "trainability.png")],
)
def test_a_full_disk_is_one_line_with_the_resume_command(tmp_path, capsys, monkeypatch, which, written):
    run_dir = tmp_path / "run"
    argv = [*PAPER, "--run_dir", str(run_dir)]
    with monkeypatch.context() as patch:
        inject_no_space(patch, which)
        line = stopped(capsys, argv, f"cannot write {run_dir}")
    assert written in line and "no space left on device" in line and " free in " in line, line
    assert line.endswith(f"then resume (finished rows are kept): fractal-vmap {' '.join(argv)}"), line
    assert temp_files(run_dir) == []
    # a later run finds the temp files a killed write left (here: made by hand), removes them and finishes the grid
    kept = (run_dir / "rows" / "row_0000.json").stat().st_mtime_ns
    for stale in (run_dir / "rows" / ".row_0001.json.tmp-99999", run_dir / ".tmp-99999-cells.parquet"):
        stale.write_text("torn")
    main(argv)
    assert "removed 2 temp files an interrupted write left" in capsys.readouterr().out
    assert temp_files(run_dir) == [] and (run_dir / "trainability.png").stat().st_size > 0
    assert (run_dir / "rows" / "row_0000.json").stat().st_mtime_ns == kept  # the finished row was kept


@pytest.fixture
def tiny_disk(tmp_path):
    """A 48 KiB tmpfs at tmp_path/disk, where this process may mount one (root, no container rule against it)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(disk)]
    mounted = subprocess.run(mount, capture_output=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip() or mounted.returncode}")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_a_really_full_disk_is_one_line(tiny_disk, capsys):
    """The same on a real full file system: the grid's files outgrow 48 KiB (its pictures do, at the latest)."""
    run_dir = tiny_disk / "run"
    line = stopped(capsys, [*PAPER, "--run_dir", str(run_dir)], f"cannot write {run_dir}")
    assert "no space left on device" in line and "then resume" in line, line
    assert temp_files(run_dir) == []


# ----------------------------------------------------------------------------- data


@pytest.mark.parametrize("command", ["finetune", "grid"])
def test_a_dataset_that_is_not_utf8_names_the_line_and_byte(tmp_path, capsys, no_training, command):
    import json

    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    good = json.dumps({"messages": chat}) + "\n"
    bad = good.replace("hello", "h\xe9llo").encode("latin-1")  # é as one Latin-1 byte: not UTF-8
    (tmp_path / "chats.jsonl").write_bytes(good.encode() + bad)
    grid = ["--run_dir", str(tmp_path / "run"), "--rows", "1", "--cols", "2"]
    where = ["--out", str(tmp_path / "r.json")] if command == "finetune" else grid
    byte = len(good) + bad.index(b"\xe9")
    refused(
        capsys,
        [command, *FAST, *where, "--model", str(FIXTURE), "--dataset", str(tmp_path / "chats.jsonl")],
        f"chats.jsonl line 2 (byte {byte}): not UTF-8",
    )
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- W&B


@pytest.fixture
def no_credentials(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))


@pytest.mark.parametrize("command", ["finetune", "grid"])
@pytest.mark.parametrize("how", [["--wandb", "online"], "WANDB_MODE=online"])
def test_wandb_online_without_credentials_says_how_to_log_in(
    tmp_path, capsys, monkeypatch, no_credentials, no_model, no_training, command, how
):
    if how == "WANDB_MODE=online":
        monkeypatch.setenv("WANDB_MODE", "online")
    flags = how if isinstance(how, list) else ["--wandb", "auto"]
    where = ["--out", str(tmp_path / "r.json")] if command == "finetune" else ["--run_dir", str(tmp_path / "run")]
    line = refused(capsys, [command, "--device", "cpu", *where, *flags], "but no W&B credentials here")
    assert "`wandb login`" in line and "WANDB_API_KEY" in line and "--wandb offline" in line
    assert line.split(": ")[1].startswith("--wandb online" if isinstance(how, list) else "WANDB_MODE=online")
    assert not (tmp_path / "run").exists()


def test_wandb_online_with_an_api_key_passes_the_check(monkeypatch, no_credentials):
    from fractal_vmap.options import GridConfig
    from fractal_vmap.tracking import check_wandb

    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    check_wandb(GridConfig(wandb="online"))  # no refusal


@pytest.mark.parametrize("flags", [["--refine", "1"], []], ids=["refined", "plain"])
def test_paper_and_refined_grids_log_their_one_wandb_run(tmp_path, flags):
    """Every grid goes through the one pipeline, so a paper-mlp grid and a refined grid log to W&B as a nanochat grid
    does (the issue's other way out: say they log nothing): offline without credentials, one run id kept in the run
    dir, its metrics and pictures in the offline run."""
    run_dir = tmp_path / "run"
    main([*PAPER, "--rows", "3", "--device", "cpu", "--wandb", "offline", "--run_dir", str(run_dir), *flags])
    run_id = (run_dir / "wandb_id").read_text().strip()
    (offline,) = (run_dir / "wandb").glob(f"offline-run-*-{run_id}")
    assert any(offline.rglob("*.wandb")) and any((offline / "files" / "media").rglob("*.png"))


# ----------------------------------------------------------------------------- --workers


@pytest.fixture
def launched(monkeypatch):
    """What `grid --workers N` would start: the elastic launcher replaced by a recorder (no process starts)."""
    import torch.distributed.launcher.api as launcher

    from fractal_vmap.grid import shard

    starts = []

    def elastic_launch(config, entrypoint):
        starts.append(config.nproc_per_node)
        return lambda cfg: {rank: None for rank in range(config.nproc_per_node)}

    monkeypatch.setattr(launcher, "elastic_launch", elastic_launch)
    monkeypatch.setattr(shard, "cpu_cores", lambda: 2)
    for name in ("OMP_NUM_THREADS", shard.FRESH_STORE):  # what launch sets for its workers, undone after the test
        monkeypatch.delenv(name, raising=False)
    return starts


def test_workers_beyond_the_cores_and_rows_are_capped_in_one_line(tmp_path, capsys, launched):
    main(["grid", *FAST, "--rows", "2", "--cols", "2", "--workers", "64", "--run_dir", str(tmp_path / "run")])
    assert launched == [2]
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["--workers 64: starting 2 (2 rows to train, 2 CPU cores); more would only wait or share a core"]


def test_workers_beyond_the_rows_left_to_train_are_capped(tmp_path, capsys, monkeypatch, launched):
    """A resumed grid with one row left (the others finished under this grid.json's digest) starts one worker, with the
    threads --workers gives each (8 cores / 2), as the uncapped run would: the cap changes no number."""
    import json

    from fractal_vmap.grid import shard

    monkeypatch.setattr(shard, "cpu_cores", lambda: 8)

    run_dir = tmp_path / "run"
    (run_dir / "rows").mkdir(parents=True)
    (run_dir / "grid.json").write_text(json.dumps({"spec": {}, "digest": "d1"}))
    for i, digest in ((0, "d1"), (1, "d1"), (2, "another")):  # row 2: of another spec, so not finished; row 3: no file
        row = {"complete": True, "spec_digest": digest, "lanes": [{}, {}]}
        (run_dir / "rows" / f"row_{i:04d}.json").write_text(json.dumps(row))
    main(["grid", *FAST, "--rows", "4", "--cols", "2", "--workers", "2", "--run_dir", str(run_dir)])
    assert launched == [2]  # rows 2 and 3 are left
    (run_dir / "rows" / "row_0002.json").write_text(json.dumps({**row, "spec_digest": "d1"}))
    capsys.readouterr()
    main(["grid", *FAST, "--rows", "4", "--cols", "2", "--workers", "2", "--run_dir", str(run_dir)])
    assert launched == [2, 1] and os.environ["OMP_NUM_THREADS"] == "4"
    assert "--workers 2: starting 1 (1 row to train, 8 CPU cores)" in capsys.readouterr().out


# ----------------------------------------------------------------------------- nanochat settings on a paper-mlp grid


def nanochat_only_flags() -> list[list[str]]:
    """A flag with a non-default value for every grid option the paper task does not read."""
    import typing
    from dataclasses import fields

    from fractal_vmap.options import GridConfig
    from fractal_vmap.tasks.paper.task import PAPER_READS

    flags = []
    hints = typing.get_type_hints(GridConfig)
    for f in fields(GridConfig):
        if f.name in PAPER_READS:
            continue
        kind = next((t for t in typing.get_args(hints[f.name]) if t is not type(None)), hints[f.name])
        value = "other" if kind is str else str((f.default or 0) + (1 if kind is int else 0.5))
        flags.append([f"--{f.name}", value])
    return flags


@pytest.mark.parametrize("flag", nanochat_only_flags(), ids=lambda flag: flag[0])
def test_a_paper_grid_refuses_every_nanochat_setting(tmp_path, capsys, flag):
    argv = [*PAPER, "--run_dir", str(tmp_path / "run"), *flag]
    line = refused(capsys, argv, f"{flag[0]} {flag[1]} has no effect on a paper-mlp grid")
    assert "leave out --task paper-mlp" in line
    assert not (tmp_path / "run").exists()


def test_a_paper_grid_refuses_axes_even_at_their_nanochat_default(tmp_path, capsys):
    argv = [*PAPER, "--run_dir", str(tmp_path / "run"), "--axes", "num_tokens,lr"]
    refused(capsys, argv, "--axes num_tokens,lr is for nanochat grids")


def test_the_paper_task_reads_what_it_does_not_refuse():
    """Spot checks of the list: the model, data and optimizer flags are nanochat's; --axes keeps its own line."""
    names = {flag[0] for flag in nanochat_only_flags()}
    nanochat = {
        "--model",
        "--dataset",
        "--learning_rate",
        "--num_tokens",
        "--lane_chunk",
        "--kernels",
        "--compile",
        "--run_name",
    }
    assert nanochat <= names
    assert not {"--seed", "--num_iterations", "--dtype", "--device", "--trainable_window_steps", "--width"} & names


# ----------------------------------------------------------------------------- --refine


@pytest.mark.parametrize("task", [[], ["--task", "paper-mlp"]])
def test_refine_refuses_a_map_it_cannot_hold(tmp_path, capsys, no_model, task):
    argv = ["grid", *FAST, *task, "--rows", "2000", "--cols", "2000", "--refine", "6", "--run_dir", str(tmp_path / "r")]
    line = refused(capsys, argv, "--refine 6 on --rows 2000 --cols 2000 makes a 127937 x 127937 map (1.64e+10 cells)")
    assert "GiB" in line and "more than this machine's" in line
    assert not (tmp_path / "run").exists()


def peak_bytes_per_cell(build, cells: int) -> float:
    import gc
    import tracemalloc

    gc.collect()
    tracemalloc.start()
    try:
        kept = build()  # noqa: F841 (held until the peak is read)
        return tracemalloc.get_traced_memory()[1] / cells
    finally:
        tracemalloc.stop()


def test_the_refine_memory_estimate_is_what_a_map_takes(tmp_path, monkeypatch):
    """MAP_CELL_BYTES against what the finish of a refined map takes a fine cell: the slope of the tracemalloc peak
    (the Python objects and numpy buffers) between a 513^2 and a 769^2 map, so that the fixed cost (matplotlib's
    figures, a cells.parquet block) cancels; drawn as images and written in small blocks, as a map above
    pictures.MESH_CELLS and cellmap.CHUNK_CELLS is (below ~513^2 a map is smaller than its figures' axes in pixels, and
    the slope is not yet linear). And the nanochat task's CELL_BYTES against the peak of its cell configs on 65 x 65."""
    import numpy as np

    from fractal_vmap.analysis import cellmap, pictures
    from fractal_vmap.axes import make_axis
    from fractal_vmap.grid.refine import MAP_CELL_BYTES
    from fractal_vmap.options import GridConfig
    from fractal_vmap.tasks.nanochat.axes import AXES, cell_config
    from fractal_vmap.tasks.nanochat.task import CELL_BYTES as NANOCHAT_CELL_BYTES
    from fractal_vmap.tasks.nanochat.task import base_config

    rng = np.random.default_rng()
    monkeypatch.setattr(pictures, "MESH_CELLS", 0)
    monkeypatch.setattr(cellmap, "CHUNK_CELLS", 1 << 12)
    refined_map_finish(tmp_path / "warm", 65, rng)  # imports and first-use caches outside the measurement
    small, large = 513, 769
    peaks = [peak_bytes_per_cell(lambda: refined_map_finish(tmp_path / f"m{H}", H, rng), 1) for H in (small, large)]
    per_cell = (peaks[1] - peaks[0]) / (large**2 - small**2)
    assert 0.8 * MAP_CELL_BYTES < per_cell < 1.2 * MAP_CELL_BYTES, per_cell
    H = W = 65
    base = base_config(GridConfig())
    rows, cols = (
        make_axis("num_tokens", H, None, None, "auto", "rows", AXES),
        make_axis("lr", W, None, None, "auto", "cols", AXES),
    )
    grid = lambda: [[cell_config(base, rows, cols, i, j, "g") for j in range(W)] for i in range(H)]  # noqa: E731
    configs = peak_bytes_per_cell(grid, H * W)
    assert 0.8 * NANOCHAT_CELL_BYTES < configs < 1.2 * NANOCHAT_CELL_BYTES, configs


def test_a_refined_map_counts_the_cells_it_trained(tmp_path, capsys):
    from fractal_vmap.analysis.report import caption
    from fractal_vmap.analysis.runs import read_run

    run_dir = tmp_path / "run"
    view = ["--row_min", "1", "--row_max", "1e3", "--col_min", "1e-1", "--col_max", "1e5"]  # test_zoom's: both phases
    main(
        [
            "grid",
            "--task",
            "paper-mlp",
            "--rows",
            "7",
            "--cols",
            "7",
            "--refine",
            "1",
            "--num_iterations",
            "25",
            "--seed",
            "0",
            *view,
            "--run_dir",
            str(run_dir),
        ]
    )
    grid, cells, fractal = read_run(run_dir)
    trained = int(cells["trained"].sum())
    assert 49 < trained < 169  # more than the coarse grid, fewer than the 13 x 13 map
    assert f"trained {trained} of 169 cells" in capsys.readouterr().out
    text = caption(grid, cells, fractal, "run", 20, 1.0)
    assert f"{trained}/169 cells trained (the others filled from a coarser level)" in text and "169/169" not in text


# ----------------------------------------------------------------------------- --config_path


@pytest.mark.parametrize("command", ["grid", "finetune"])
@pytest.mark.parametrize(
    "entry, expected",
    [
        ("num_tokens: many", "num_tokens is 'many', not a whole number (int): write e.g. `num_tokens: 20000`"),
        ("num_tokens: 2.5", "num_tokens is 2.5, not a whole number (int)"),
        ("learning_rate: fast", "learning_rate is 'fast', not a number (float): write e.g. `learning_rate: 0.02`"),
        ("learning_rate: [1, 2]", "learning_rate is [1, 2], not a number (float)"),
        ("wandb: 3", "wandb is 3, not a string"),
        ("num_iterations: lots", "num_iterations is 'lots', not a whole number (int) or null"),
    ],
)
def test_a_config_value_of_the_wrong_type_names_the_file_key_and_type(
    tmp_path, capsys, no_training, command, entry, expected
):
    path = tmp_path / "options.yaml"
    path.write_text(f"cfg:\n  {entry}\n")
    where = ["--out", str(tmp_path / "r.json")] if command == "finetune" else ["--run_dir", str(tmp_path / "run")]
    refused(capsys, [command, *FAST, *where, "--config_path", str(path)], f"--config_path {path}: {expected}")


def test_config_values_simple_parsing_converts_still_pass(tmp_path):
    """YAML reads 1e-3 (no dot) as a string and a quoted '3' as one: both convert as a flag's value would."""
    from fractal_vmap.cli import build_parser, check_config_file
    from fractal_vmap.options import GridConfig

    path = tmp_path / "options.yaml"
    path.write_text("cfg:\n  learning_rate: 1e-3\n  rows: '3'\n  row_min: null\n  cols: 4\n  col_max: 10\n")
    check_config_file(str(path), "grid", GridConfig)
    cfg = build_parser().parse_args(["grid", "--config_path", str(path)]).cfg
    assert (cfg.learning_rate, cfg.rows, cfg.row_min, cfg.cols, cfg.col_max) == (1e-3, 3, None, 4, 10)


# ----------------------------------------------------------------------------- axes


@pytest.mark.parametrize(
    "flags, expected",
    [
        (
            ["--axes", "seed,lr", "--row_min", "0.5", "--row_max", "3.7", "--rows", "4"],
            "--row_min 0.5: the rows axis seed takes whole numbers: pass 0 or 1",
        ),
        (
            ["--axes", "lr,num_tokens", "--col_min", "1000", "--col_max", "2500.5", "--cols", "4"],
            "--col_max 2500.5: the cols axis num_tokens takes whole numbers",
        ),
        (
            ["--axes", "seed,lr", "--row_min", "0", "--row_max", "3", "--rows", "6"],
            "the rows axis seed 0..3 rounds to 4 distinct whole numbers for --rows 6: some rows would train the same "
            "cells",
        ),
        (
            ["--col_min", "0.01", "--col_max", "0.01"],
            "--col_min and --col_max are both 0.01 with --cols 16: every col would train the same cells",
        ),
        (
            ["--row_min", "2000", "--row_max", "2000", "--rows", "3"],
            "--row_min and --row_max are both 2000 with --rows 3",
        ),
    ],
)
def test_axes_that_would_train_outside_their_range_or_twice_are_refused(tmp_path, capsys, no_model, flags, expected):
    refused(capsys, ["grid", *FAST, "--run_dir", str(tmp_path / "run"), *flags], expected)
    assert not (tmp_path / "run").exists()


def test_one_row_at_equal_bounds_and_whole_bounds_pass():
    from fractal_vmap.axes import make_axis
    from fractal_vmap.errors import UserError

    assert make_axis("lr", 1, 0.01, 0.01, "auto", "cols", AXES).values == [0.01]
    assert make_axis("seed", 3, 1, 3.0, "auto", "rows", AXES).values == [1.0, 2.0, 3.0]
    with pytest.raises(UserError, match="rounds to 3 distinct whole numbers for --rows 4"):
        make_axis("seed", 4, 1, 3.0, "auto", "rows", AXES)  # 1, 1.67, 2.33, 3: seed 2 twice


def test_a_square_zoom_of_an_integer_axis_keeps_whole_values_inside_its_range():
    from fractal_vmap.grid.zoom import child_axes
    from fractal_vmap.options import ZoomConfig

    spec = {
        "axes": {
            "rows": {"name": "num_tokens", "values": [1000.0, 2828.0, 8000.0], "scale": "log"},
            "cols": {"name": "lr", "values": [0.01, 1.0, 100.0], "scale": "log"},
        },
        "settings": {},
    }
    zoom = ZoomConfig(run="parent", range="rows=1000:8000,cols=0.01:100", square=True, rows=5, cols=5)
    (rows, _), _ = child_axes(zoom, spec)
    assert all(v == round(v) for v in rows.values) and rows.values == sorted(set(rows.values))
    centre = math.log10(math.sqrt(1000 * 8000))  # squared: 4 decades (the cols') about the box's centre
    lo, hi = 10 ** (centre - 2), 10 ** (centre + 2)
    assert lo <= rows.values[0] < lo + 1 and hi - 1 < rows.values[-1] <= hi


# ----------------------------------------------------------------------------- smaller ones


@pytest.mark.parametrize("shape", [(1, 16), (16, 1)])
def test_a_one_row_grid_in_both_phases_does_not_say_every_cell_is_in_one_phase(shape):
    """Edge pixels are 2 x 2 blocks holding both phases (fractal.edge_pixels): a grid of one row (or col) has no such
    block, so it has no boundary to measure, although half its cells train."""
    import numpy as np
    import pandas as pd

    from fractal_vmap.analysis.report import dimension_note, measure_fractal
    from fractal_vmap.axes import Axis

    rng = np.random.default_rng()
    n = max(shape)
    measure = np.where(np.arange(n) < n // 2, -1.0, 1.0) * rng.uniform(1, 50, n)  # trained in the first half
    idx = np.arange(n)
    cells = pd.DataFrame(
        {
            "row": idx if shape[0] > 1 else 0,
            "col": idx if shape[1] > 1 else 0,
            "measure": measure,
            "converged": measure < 0,
        }
    )
    row = Axis("num_tokens", [1000.0 + i for i in range(shape[0])], "log")
    col = Axis("lr", list(np.geomspace(0.01, 100, shape[1])), "log")
    note = dimension_note(measure_fractal(cells, row, col))
    assert "same phase" not in note and note.startswith("no boundary dimension: 50% of the cells train"), note
    assert "one row or one col" in note
    same = cells.assign(measure=-np.abs(measure), converged=True)
    assert "every cell with a result is in the same phase" in dimension_note(measure_fractal(same, row, col))


@pytest.fixture(scope="module")
def paper_parent(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("parent") / "run"
    main([*PAPER, "--run_dir", str(run_dir)])  # lr1 x lr0, both 10^-3..10^6
    return run_dir


@pytest.mark.parametrize("span", ["rows=1e-5:1,cols=1:10", "rows=1:10,cols=1:1e7"])
def test_a_zoom_range_outside_the_parent_is_refused(paper_parent, tmp_path, capsys, span):
    which = span.split("=")[0] if "1e-5" in span else "cols"
    line = refused(
        capsys,
        ["zoom", str(paper_parent), "--range", span, "--run_dir", str(tmp_path / "zoom")],
        f"reaches outside the parent's {which} axis",
    )
    assert "a zoom looks inside its parent" in line
    assert not (tmp_path / "zoom").exists()


def test_a_zoom_range_at_the_parents_printed_ends_is_inside(paper_parent):
    import json

    from fractal_vmap.grid.zoom import child_axes
    from fractal_vmap.options import ZoomConfig

    spec = json.loads((paper_parent / "grid.json").read_text())["spec"]
    (rows, cols), _ = child_axes(ZoomConfig(run=str(paper_parent), range="rows=1e-3:1e6,cols=0.001:1.0e6"), spec)
    assert rows.values[0] == pytest.approx(1e-3) and cols.values[-1] == pytest.approx(1e6)


def test_plot_refuses_a_dpi_whose_canvas_cannot_be_drawn(paper_parent, tmp_path, capsys):
    from fractal_vmap.analysis.pictures import max_dpi

    line = refused(
        capsys,
        ["plot", str(paper_parent), "--dpi", "100000", "--out", str(tmp_path / "p")],
        "--dpi 100000 would draw panels.png on a 1300000 x 900000 pixel canvas",
    )
    assert line.endswith(f"use --dpi {max_dpi()} or less") and 1000 < max_dpi() < 2000
    assert not (tmp_path / "p").exists()


def test_the_caption_says_what_was_averaged_in_rows_shorter_than_the_window():
    import pandas as pd

    from fractal_vmap.analysis.report import caption

    axis = lambda name, values: {"name": name, "values": values, "scale": "log"}  # noqa: E731
    grid = {
        "spec": {
            "axes": {"rows": axis("num_tokens", [300.0, 600.0, 1000.0, 2000.0]), "cols": axis("lr", [0.01])},
            "settings": {"device": "cpu", "dtype": "float32"},
            "group_lrs": {},
            "model": {"source": "default"},
            "dataset": {"source": "default"},
        }
    }
    fractal = {
        "sizes": [],
        "edge_pixel_count": 0,
        "dimension": None,
        "dimension_median_local": None,
        "trainable_fraction": 0.5,
    }
    cells = pd.DataFrame(
        {
            "row": [0, 1, 2, 3],
            "col": 0,
            "converged": [True, False, True, False],
            "stable": True,
            "total_steps": [9, 15, 25, 40],
        }
    )
    unwrapped = lambda window: " ".join(caption(grid, cells, fractal, "run", window, 1.0).split())  # noqa: E731
    text = unwrapped(20)
    assert "(mean of the last 20 losses, or of all 9..15 in the 2 cells with fewer steps, < 1 x the first)" in text
    assert "(mean of the last 9 losses < 1 x the first)" in unwrapped(9)


def test_the_bench_profile_prints_nothing_of_the_profilers_own(tmp_path):
    """measure.profile_mode, as `bench` runs it, in a fresh process (Kineto reads its log level when a profile starts):
    no 'USDT ... profiler_start' line and nothing else on stderr."""
    import sys

    code = (
        "import torch\n"
        "from fractal_vmap.perf.timing import profile_mode\n"
        "w = torch.randn(64, 64, requires_grad=True)\n"
        "def make_step():\n"
        "    return lambda i, batch: (batch @ w).square().sum().backward()\n"
        "out = profile_mode(make_step, torch.randn(8, 64), torch.device('cpu'))\n"
        "assert out['launches'] > 0, out\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    assert result.returncode == 0, result.stderr
    assert "USDT" not in result.stderr + result.stdout and result.stderr.strip() == "", result.stderr
