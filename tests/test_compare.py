"""`grid --perturb_ulp` and `compare`: the noise floor of a map, on a tiny grid of the default model."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from fractal_vmap.analysis.compare import CompareConfig, boundary_distance, compare_runs
from fractal_vmap.cli import main
from fractal_vmap.machine import cpu_model
from fractal_vmap.tasks.nanochat.task import nudged

# 2 rows x 6 lanes, lr 0.3..1e4 (around the default model's boundary at these sizes, where rounding matters)
GRID = [
    "grid",
    "--wandb",
    "disabled",
    "--device",
    "cpu",
    "--rows",
    "2",
    "--cols",
    "6",
    "--row_min",
    "600",
    "--row_max",
    "800",
    "--col_min",
    "0.3",
    "--col_max",
    "1e4",
]


def test_nudged_moves_every_weight_by_whole_ulps():
    t = torch.randn(1000) * torch.logspace(-30, 30, 1000)
    once, twice = nudged(t, 1), nudged(t, 2)
    assert torch.equal(once, torch.nextafter(t, torch.full_like(t, torch.inf)))
    assert (once > t).all() and (twice > once).all()
    assert torch.equal(nudged(t, 0), t)


def test_boundary_distance_counts_king_moves():
    phase = np.zeros((7, 7))
    phase[:, 4:] = 1.0  # a vertical boundary between cols 3 and 4
    phase[0, 0] = np.nan  # a missing cell has no phase and is no boundary
    distance = boundary_distance(phase, limit=2)
    assert (distance[:, 3] == 0).all() and (distance[:, 4] == 0).all()
    assert (distance[:, 2] == 1).all() and (distance[:, 5] == 1).all() and (distance[:, 6] == 2).all()
    assert (distance[1:, 1] == 2).all() and (distance[1:, 0] == 3).all()  # beyond the limit: limit + 1


@pytest.fixture(scope="module")
def twin_runs(default_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("twins")
    main([*GRID, "--run_dir", str(root / "a")])
    main([*GRID, "--run_dir", str(root / "b"), "--perturb_ulp", "1"])
    return root / "a", root / "b"


def test_perturbed_twin_is_another_spec_with_nudged_numbers(twin_runs):
    a, b = twin_runs
    spec_a, spec_b = (json.loads((d / "grid.json").read_text())["spec"] for d in (a, b))
    assert spec_a["settings"]["perturb_ulp"] == 0 and spec_b["settings"]["perturb_ulp"] == 1
    cells_a, cells_b = pd.read_parquet(a / "cells.parquet"), pd.read_parquet(b / "cells.parquet")

    # the nudge reached the numbers: some loss curve moves (a 1-ulp nudge may leave the first losses' rounding alone)
    def curves(d):
        return [
            lane["losses"] for i in range(2) for lane in json.loads((d / f"rows/row_{i:04d}.json").read_text())["lanes"]
        ]  # noqa: E731

    assert curves(a) != curves(b)
    assert np.allclose(cells_a["trainable_loss0"], cells_b["trainable_loss0"], rtol=1e-5)  # by rounding only


def test_compare_counts_flipped_cells(twin_runs, capsys, tmp_path):
    a, b = twin_runs
    out = tmp_path / "cmp.json"
    capsys.readouterr()
    main(["compare", str(a), str(b), "--out", str(out)])
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    cells_a, cells_b = pd.read_parquet(a / "cells.parquet"), pd.read_parquet(b / "cells.parquet")
    flips = int(((cells_a["measure"] < 0) != (cells_b["measure"] < 0)).sum())  # counted here independently
    assert report["cells"] == 12 and report["flipped"] == flips
    assert report["flipped_on_boundary"] + report["flipped_near_boundary"] + report["flipped_far"] == flips
    assert len(report["flipped_cells"]) == flips
    assert "cells that change phase" in printed and f"{flips} (" in printed
    threads = torch.get_num_threads()  # both ran in this process
    assert report["threads"] == [[threads], [threads]] and report["devices"] == [[cpu_model()], [cpu_model()]]
    assert "equal threads on the same device: every difference comes from the two specs" in report["rounding"]
    assert report["rounding"] in printed and f"{threads} / {threads}" in printed
    self_report = compare_runs(CompareConfig(str(a), str(a)))
    assert self_report["flipped"] == 0 and self_report["cells"] == 12 and self_report["numbers_differ"] == 0
    promise = "the same spec at equal threads on the same device: the product promises every cell bit-equal, and every"
    assert self_report["rounding"].startswith(promise)


def test_compare_says_what_other_threads_mean(twin_runs, tmp_path):
    """The same grid with its cells' threads (or a final loss) edited: another thread count is rounding, so labels are
    what to compare; at equal threads one differing number is a broken promise."""
    a, _ = twin_runs
    nudge = lambda c: c.assign(final_loss=c["final_loss"].where(c.index != 3, c["final_loss"] + 1e-3))  # noqa: E731
    for name, edit in (
        ("threads", lambda c: c.assign(threads=c["threads"] + 1)),
        ("unrecorded", lambda c: c.drop(columns=["threads", "device"])),
        ("number", nudge),
    ):
        other = tmp_path / name
        shutil.copytree(a, other)
        edit(pd.read_parquet(a / "cells.parquet")).to_parquet(other / "cells.parquet", index=False)
        report = compare_runs(CompareConfig(str(a), str(other)))
        if name == "number":
            assert report["numbers_differ"] == 1 and "but 1 cell differs: a bug" in report["rounding"]
            continue
        assert report["threads"][1] == ([torch.get_num_threads() + 1] if name == "threads" else [None])
        assert report["rounding"].startswith("other thread counts or devices")
        assert "compare labels" in report["rounding"]


def test_compare_refuses_grids_over_other_axes(twin_runs, tmp_path, capsys, default_model):
    a, _ = twin_runs
    other = tmp_path / "other"
    main([*GRID[:-2], "--col_max", "1e3", "--run_dir", str(other)])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", str(a), str(other)])
    assert exit_info.value.code == 2
    assert "different axes" in capsys.readouterr().out
