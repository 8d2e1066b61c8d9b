"""The command line's help: it answers without importing torch or wandb (imports come after parsing), every flag has
a plain help line, and each command lists only its own flags."""

import io
import json
import subprocess
import sys

import pytest

from fractal_vmap.cli import build_parser

FINETUNE_ONLY = {"--out", "--eval_every", "--eval_batches", "--val_dataset"}


def subcommands() -> dict:
    """command -> its parser, with its flags added (simple_parsing adds a dataclass' flags when it first parses or
    prints help)."""
    parser = build_parser()
    (action,) = [a for a in parser._actions if a.dest == "command"]
    for sub in action.choices.values():
        sub.print_help(io.StringIO())
    return action.choices


@pytest.mark.parametrize("command", ["finetune", "grid", "plot", "compare", "study"])
def test_help_imports_neither_torch_nor_wandb(command):
    """What `fractal-vmap <command> --help` imports, counted in a fresh interpreter (torch alone takes 4-5 s to import
    on 2 cores; the help takes 0.9 s without it)."""
    code = (
        "import sys, contextlib, io\n"
        "from fractal_vmap.cli import main\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        "    try:\n"
        f"        main([{command!r}, '--help'])\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, e.code\n"
        "import json\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'wandb', 'pandas', 'matplotlib', "
        "'datasets', 'triton'))\n"
        "print(json.dumps({'heavy': heavy, 'help': out.getvalue()}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    report = json.loads(result.stdout)
    assert report["heavy"] == [], report["heavy"][:10]
    assert f"usage: fractal-vmap {command}" in report["help"]


@pytest.mark.parametrize("command", ["finetune", "grid", "plot", "compare"])
def test_every_flag_has_a_plain_help_line(command):
    for action in subcommands()[command]._actions:
        if action.dest == "help":
            continue
        assert action.help and action.help.strip(), f"{command} {action.option_strings or action.dest}: no help"
        assert "(default" not in action.help or action.dest == "config_path", (
            f"{command} {action.option_strings}: {action.help!r}"
        )
        assert "src.finetune" not in action.help and "seed project" not in action.help


def test_grid_lists_no_finetune_only_flag():
    grid = {s for a in subcommands()["grid"]._actions for s in a.option_strings}
    finetune = {s for a in subcommands()["finetune"]._actions for s in a.option_strings}
    assert FINETUNE_ONLY <= finetune
    assert not FINETUNE_ONLY & grid
    assert {"--axes", "--rows", "--cols", "--run_dir", "--learning_rate", "--num_tokens", "--seed"} <= grid


def test_ctrl_c_while_the_config_file_is_read_prints_the_resume_line(tmp_path, monkeypatch, capsys):
    """An interrupt that lands before the options are parsed (in the config file's check) is the same clean exit:
    code 130 and the line to run again, not an UnboundLocalError from the interrupt handler."""
    from fractal_vmap import cli

    config = tmp_path / "grid.yaml"
    config.write_text("cfg: {rows: 2}\n")

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "check_config_file", interrupted)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["grid", "--config_path", str(config)])
    assert exit_.value.code == 130
    out = capsys.readouterr().out
    assert "interrupted." in out and f"fractal-vmap grid --config_path {config}" in out
