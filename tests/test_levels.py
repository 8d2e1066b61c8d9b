"""A refined grid's compact level files (rows/row_XXXX.npz, analysis/runs.py): a resumed run reads back exactly the
labels the run wrote and trains nothing again, a torn level file is trained again, and a level a run before the compact
files wrote as JSON is still read. And `refined_map_finish`, the finish of a synthetic refined map that
tests/test_probe.py measures the bytes a cell of."""

import json

import numpy as np
import pandas as pd

from fractal_vmap.analysis.labels import label_runs
from fractal_vmap.analysis.runs import lanes_of, read_level
from fractal_vmap.cli import main
from fractal_vmap.files import strict_json

# a 33 x 33 map refined from 9 x 9 by 2 levels, 25 steps a cell, over test_zoom's view (both phases): ~2 s
REFINED = [
    "grid",
    "--task",
    "paper-mlp",
    "--rows",
    "9",
    "--cols",
    "9",
    "--refine",
    "2",
    "--num_iterations",
    "25",
    "--seed",
    "0",
    "--row_min",
    "1",
    "--row_max",
    "1e3",
    "--col_min",
    "1e-1",
    "--col_max",
    "1e5",
    "--wandb",
    "disabled",
]


def refined(run_dir) -> tuple[pd.DataFrame, dict[str, int]]:
    main([*REFINED, "--run_dir", str(run_dir)])
    files = sorted((run_dir / "rows").iterdir())
    return pd.read_parquet(run_dir / "cells.parquet"), {p.name: p.stat().st_mtime_ns for p in files}


def digest(run_dir) -> str:
    return json.loads((run_dir / "grid.json").read_text())["digest"]


def test_a_resumed_refined_grid_reads_the_labels_it_wrote(tmp_path):
    run_dir = tmp_path / "run"
    cells, files = refined(run_dir)
    assert sorted(files) == [f"row_{k:04d}.npz" for k in range(3)]  # one compact file a level, no JSON
    by_cell = cells.set_index(["row", "col"])
    for k in range(3):
        header, table = read_level(run_dir / "rows" / f"row_{k:04d}.npz", digest(run_dir))
        assert header["cells"] == len(table["grid_i"]) > 0 and header["threads"] >= 1
        mine = by_cell.loc[list(zip(table["grid_i"].tolist(), table["grid_j"].tolist()))]
        assert (mine["level"] == k).all() and mine["trained"].all()
        assert mine["measure"].tolist() == table["measure"].tolist()  # bit for bit: the same float64 written
        assert mine["converged"].tolist() == table["converged"].tolist()
        # a small level keeps its curves, and they give its labels again
        assert table["losses"].shape == (header["cells"], 25)
        again = label_runs(table["losses"], table["steps"], 20, 1.0)
        assert again["measure"].tolist() == table["measure"].tolist()
    (run_dir / "cells.parquet").unlink()
    resumed, files_after = refined(run_dir)
    assert files_after == files  # nothing trained again
    pd.testing.assert_frame_equal(resumed, cells)


def test_a_torn_level_is_trained_again_and_a_json_level_is_still_read(tmp_path, capsys):
    run_dir = tmp_path / "run"
    cells, files = refined(run_dir)
    torn = run_dir / "rows" / "row_0002.npz"
    torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 2])
    capsys.readouterr()
    again, after = refined(run_dir)
    assert f"{torn} is torn: training that level again" in " ".join(capsys.readouterr().out.split())
    assert after["row_0002.npz"] != files["row_0002.npz"]
    assert {k: v for k, v in after.items() if k != "row_0002.npz"} == {k: v for k, v in files.items() if k != torn.name}
    pd.testing.assert_frame_equal(again, cells)
    # level 1 as a run before compact level files wrote it: row_0001.json, its lanes as JSON
    level = run_dir / "rows" / "row_0001.npz"
    header, table = read_level(level, digest(run_dir))
    record = {**{k: v for k, v in header.items() if k not in ("cells", "objects")}, "lanes": lanes_of(table)}
    (run_dir / "rows" / "row_0001.json").write_text(strict_json(record, indent=None))
    level.unlink()
    from_json, kept = refined(run_dir)
    assert "row_0001.npz" not in kept and kept["row_0001.json"]  # read, not trained again
    pd.testing.assert_frame_equal(from_json, cells)
    assert np.isfinite(from_json["measure"]).all()


def refined_map_finish(run_dir, H: int, rng) -> None:
    """What a refined H x H paper map holds from its last level on: the levels' table (cells within 2 of a ragged
    diagonal trained, the rest filled from the every-8th coarse cells), the CellMap (refine.filled) and the finish
    (report.write_report: cells.parquet, fractal.json, the pictures from the files)."""
    from fractal_vmap.analysis.cellmap import CellMap
    from fractal_vmap.analysis.report import write_report
    from fractal_vmap.axes import Axis
    from fractal_vmap.grid.refine import filled

    i, j = np.mgrid[0:H, 0:H]
    wiggle = (8 * np.sin(i / 5.0) + rng.normal(0, 2, (H, H))).round()
    trained = (i % 8 == 0) & (j % 8 == 0) | (np.abs(i - j - wiggle) < 3)
    gi, gj = np.nonzero(trained)
    n = len(gi)
    measure = np.where(gi < gj + wiggle[gi, gj], -1.0, 1.0) * rng.uniform(1, 100, n)
    table = {
        "grid_i": gi,
        "grid_j": gj,
        **{k: rng.random(n) for k in ("trainable_loss0", "trainable_mean_last_k", "trainable_ratio", "final_loss")},
        "avg_loss": rng.random(n),
        "measure": measure,
        "stable": rng.random(n) < 0.8,
        "converged": measure < 0,
        "steps": np.full(n, 100),
        "total_steps": np.full(n, 100),
        "threads": np.full(n, 2),
        "device": np.full(n, "Some CPU", dtype=object),
        "level": rng.integers(0, 4, n).astype(np.int8),
    }
    at = np.full((H, H), -1, dtype=np.int32)
    at[gi, gj] = np.arange(n)
    source = filled(at, 3)
    cells = CellMap(table, source, {"trained": at >= 0, "level": table["level"][source]})
    values = list(np.geomspace(1e-3, 1e6, H))
    run_dir.mkdir()
    spec = {
        "axes": {
            "rows": {"name": "lr1", "values": values, "scale": "log"},
            "cols": {"name": "lr0", "values": values, "scale": "log"},
        },
        "settings": {
            "device": "cpu",
            "dtype": "float64",
            "trainable_window_steps": 20,
            "trainable_loss_ratio_threshold": 1.0,
        },
        "model": {"source": "paper-mlp"},
        "dataset": {"source": "N(0, 1)"},
    }
    (run_dir / "grid.json").write_text(json.dumps({"spec": spec}))
    write_report(run_dir, cells, Axis("lr1", values, "log"), Axis("lr0", values, "log"))
