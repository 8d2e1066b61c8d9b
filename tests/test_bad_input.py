"""Every bad input gets exit code 2 and one line naming the problem and the fix, never a traceback, and before any work
is done: nothing trained, no run dir created (a later, corrected run may want the same dir)."""

import json
from pathlib import Path

import pytest
import torch

from fractal_vmap.cli import main

FIXTURE = Path(__file__).parent / "fixtures" / "nanochat-d2"
FAST = ["--wandb", "disabled", "--device", "cpu"]


def refused(capsys, argv: list[str], expected: str) -> str:
    """Run the CLI, expect exit 2 and exactly one line, starting with error: and holding `expected`."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    text = captured.out + captured.err
    lines = [line for line in text.splitlines() if line.strip()]
    assert "Traceback" not in text
    assert len(lines) == 1, lines
    assert lines[0].startswith("error:") and expected in lines[0], lines[0]
    return lines[0]


# ----------------------------------------------------------------------------- settings (both commands)


@pytest.mark.parametrize("command", ["finetune", "grid"])
@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--weight_decay=-0.1"], "--weight_decay is -0.1"),
        (["--learning_rate", "inf"], "--learning_rate is inf"),
        (["--matrix_lr", "nan"], "--matrix_lr is nan"),
        (["--device_batch_size", "0"], "--device_batch_size is 0"),
        (["--max_seq_len", "1"], "--max_seq_len is 1"),
        (["--trainable_param_groups", "matrix,bias"], "bias"),
        (["--warmup_frac", "1.5"], "--warmup_frac is 1.5"),
        (["--wandb", "sometimes"], "--wandb 'sometimes'"),
        (["--device", "tpu:x"], "--device 'tpu:x'"),
    ],
)
def test_bad_setting_is_one_line_before_any_work(tmp_path, capsys, no_training, command, flags, expected):
    where = ["--out", str(tmp_path / "r.json")] if command == "finetune" else ["--run_dir", str(tmp_path / "run")]
    refused(capsys, [command, *FAST, *where, *flags], expected)
    assert not (tmp_path / "run").exists() and not (tmp_path / "r.json").exists()


def test_bad_finetune_setting_is_one_line_before_any_work(tmp_path, capsys, no_training):
    refused(
        capsys, ["finetune", *FAST, "--out", str(tmp_path / "r.json"), "--eval_batches", "0"], "--eval_batches is 0"
    )
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize(
    "flags, expected",
    [
        # a flag no cell would read, and an axis that would change nothing: refused before anything is loaded
        (
            ["--num_tokens", "2000"],
            "--num_tokens 2000 has no effect: num_tokens is the rows axis (num_tokens 1000..8000 over 6 rows)",
        ),
        (
            ["--axes", "matrix_lr,unembedding_lr", "--learning_rate", "0.5"],
            "--learning_rate 0.5 has no effect: every trained group's lr",
        ),
        (["--embedding_lr", "0.3"], "--embedding_lr 0.3 has no effect: the embedding is frozen"),
        (["--axes", "embedding_lr,lr"], "the rows axis embedding_lr would change nothing: the embedding is frozen"),
        (
            ["--num_iterations", "5"],
            "the rows axis num_tokens would change nothing: --num_iterations 5 fixes the step count",
        ),
        (["--matrix_lr", "0.01", "--unembedding_lr", "0.1"], "the cols axis lr would change nothing"),
        (
            ["--axes", "weight_decay,lr", "--trainable_param_groups", "matrix"],
            "the rows axis weight_decay would change nothing",
        ),
        (["--lane_chunk=-2"], "--lane_chunk is -2"),
        (["--perturb_ulp=-1"], "--perturb_ulp is -1"),
        (["--col_max", "inf"], "--col_max is inf"),
        (["--row_min", "nan", "--axes", "weight_decay,lr"], "--row_min is nan"),
        (["--compile", "yes"], "--compile 'yes' is not one of auto, on, off"),
        (["--compile", "on", "--levers", "remat"], "--compile on does not take the remat lever"),
    ],
)
def test_bad_grid_setting_is_one_line(tmp_path, capsys, monkeypatch, flags, expected):
    import fractal_vmap.tasks.nanochat.task as nanochat_task

    monkeypatch.setattr(
        nanochat_task, "resolve_source", lambda source: pytest.fail("the model was looked up before the refusal")
    )
    refused(capsys, ["grid", *FAST, "--run_dir", str(tmp_path / "run"), *flags], expected)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- paths


def test_finetune_out_that_is_a_directory_is_refused_before_training(tmp_path, capsys, no_training):
    refused(capsys, ["finetune", *FAST, "--out", str(tmp_path)], "is a directory")


def test_finetune_out_under_a_file_is_refused_before_training(tmp_path, capsys, no_training):
    (tmp_path / "file").write_text("x")
    refused(capsys, ["finetune", *FAST, "--out", str(tmp_path / "file" / "r.json")], "is a file, not a directory")


def test_grid_run_dir_that_is_a_file_is_refused(tmp_path, capsys, default_model):
    (tmp_path / "run").write_text("x")
    refused(
        capsys,
        ["grid", *FAST, "--rows", "1", "--cols", "2", "--run_dir", str(tmp_path / "run")],
        "is a file, not a directory",
    )


@pytest.mark.parametrize(
    "content, expected",
    [("", "not valid JSON"), ('{"spec": ', "not valid JSON"), ("[1, 2]", "not an object"), ('{"other": 1}', "no spec")],
)
def test_unreadable_grid_json_is_one_line(tmp_path, capsys, default_model, content, expected):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "grid.json").write_text(content)
    line = refused(capsys, ["grid", *FAST, "--rows", "1", "--cols", "2", "--run_dir", str(run_dir)], expected)
    assert "another --run_dir" in line  # and what to do about it
    assert (run_dir / "grid.json").read_text() == content  # untouched


# ----------------------------------------------------------------------------- --config_path


@pytest.mark.parametrize(
    "content, expected",
    [
        (None, "does not exist"),
        ("cfg: [1, 2\n", "not valid YAML"),
        ("cfg:\n  learning_rate: 0.05\n  lerning_rate: 3\n", "lerning_rate is not an option of `finetune`"),
        ("learning_rate: 0.05\n", "under one top-level `cfg:` key"),  # simple_parsing would ignore it silently
        ("cfg: 3\n", "under one top-level `cfg:` key"),
    ],
)
def test_bad_config_file_is_one_line(tmp_path, capsys, no_training, content, expected):
    path = tmp_path / "options.yaml"
    if content is not None:
        path.write_text(content)
    refused(capsys, ["finetune", *FAST, "--out", str(tmp_path / "r.json"), "--config_path", str(path)], expected)


# ----------------------------------------------------------------------------- checkpoints


def copy_fixture(tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(FIXTURE, tmp_path / "model"))


def test_pt_that_is_not_a_state_dict_is_one_line(tmp_path, capsys, no_training):
    model = copy_fixture(tmp_path)
    torch.save([torch.randn(3)], model / "checkpoints" / "model_000000.pt")
    refused(capsys, ["finetune", *FAST, "--out", str(tmp_path / "r.json"), "--model", str(model)], "not a state dict")


@pytest.mark.parametrize("meta", [[1, 2], "model_config", {"model_config": 3}])
def test_meta_that_is_not_an_object_is_one_line(tmp_path, capsys, no_training, meta):
    model = copy_fixture(tmp_path)
    (model / "checkpoints" / "meta_000000.json").write_text(json.dumps(meta))
    refused(
        capsys,
        ["finetune", *FAST, "--out", str(tmp_path / "r.json"), "--model", str(model)],
        "not a nanochat meta file",
    )
