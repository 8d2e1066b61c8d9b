"""W&B logging that never fails a run: online with credentials, offline without, or disabled. wandb is imported lazily.

A grid is one W&B run however many times it is resumed: its run id is kept in the run dir (`wandb_id`) and every
invocation continues it with W&B's own resume (`wandb.init(id=..., resume="allow")`). Offline, each invocation
writes a folder under <run dir>/wandb with that id, and `wandb sync <run dir>/wandb` uploads them as one run, in order.
"""

import netrc
import os
import re
import secrets
import string
from contextlib import contextmanager
from pathlib import Path

from fractal_vmap.console import console
from fractal_vmap.errors import UserError
from fractal_vmap.files import write_atomic

ID_FILE = "wandb_id"
MODES = ("auto", "online", "offline", "disabled")
ID_PATTERN = re.compile(r"[a-z0-9]{8,64}")  # W&B's generated ids are 8 lowercase letters and digits


def _has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if not path.exists():
        return False
    return netrc.netrc(path).authenticators("api.wandb.ai") is not None


def wandb_mode(requested: str) -> str:
    """`auto` -> $WANDB_MODE if set, else online with credentials and offline without."""
    if requested not in MODES:
        raise ValueError(f"unknown wandb mode {requested!r}")
    if requested != "auto":
        return requested
    return os.environ.get("WANDB_MODE") or ("online" if _has_credentials() else "offline")


def check_wandb(cfg) -> None:
    """Before any work: W&B online needs credentials (wandb would otherwise fail, or wait on a login prompt, at the end
    of the setup)."""
    if cfg.wandb not in MODES:
        raise UserError(f"--wandb {cfg.wandb!r} is not one of {', '.join(MODES)}")
    mode = wandb_mode(cfg.wandb)
    if mode == "online" and not _has_credentials():
        asked = "--wandb online" if cfg.wandb == "online" else "WANDB_MODE=online"
        raise UserError(
            f"{asked} but no W&B credentials here (no WANDB_API_KEY, no api.wandb.ai in ~/.netrc): "
            "run `wandb login` or set WANDB_API_KEY, or pass --wandb offline (to `wandb sync` later) "
            "or --wandb disabled"
        )


def read_run_id(directory: Path) -> str | None:
    """The W&B run id kept in `directory`, checked (one line if it is not one), or None if none is kept yet."""
    path = directory / ID_FILE
    if not path.is_file():
        return None
    run_id = path.read_text().strip()
    if not ID_PATTERN.fullmatch(run_id):
        raise UserError(f"{path} holds {run_id[:40]!r}, not a W&B run id: delete it (a new W&B run then starts)")
    return run_id


def kept_run_id(directory: Path) -> str:
    """The W&B run id kept in `directory` (a grid's run dir, a study dir), made and written on first use."""
    if (run_id := read_run_id(directory)) is not None:
        return run_id
    path = directory / ID_FILE
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # as W&B makes its ids
    directory.mkdir(parents=True, exist_ok=True)
    write_atomic(path, run_id + "\n")
    return run_id


def start_run(
    mode: str,
    project: str,
    entity: str | None,
    name: str,
    config: dict,
    directory: Path,
    job_type: str,
    keep_id: bool = False,
):
    """A wandb run, or None when disabled. Its files land in `directory/wandb`. With keep_id, the run id kept in
    `directory` is resumed (a grid's every invocation is one W&B run)."""
    mode = wandb_mode(mode)
    if mode == "disabled":
        return None
    import wandb

    directory.mkdir(parents=True, exist_ok=True)
    run_id = kept_run_id(directory) if keep_id else None
    return wandb.init(
        project=project,
        entity=entity,
        name=name,
        config=config,
        dir=str(directory),
        mode=mode,
        job_type=job_type,
        id=run_id,
        resume="allow" if run_id else None,
        settings=wandb.Settings(silent=True, console="off"),
    )


def finish_run(run, sync_dir: Path | None = None) -> None:
    """Finish the run and say where it is: its URL online; offline, the exact command that uploads it (`sync_dir`, the
    folder of all of this run's invocations, or else this invocation's own folder)."""
    if run is None:
        return
    offline = run.settings.mode == "offline"
    run_folder = Path(run.dir).parent  # <dir>/wandb/offline-run-<time>-<id>/files -> its run folder
    url = None if offline else run.url
    run.finish()
    if offline:
        console.print(
            f"W&B run {run.id} logged offline; to upload it: [bold]wandb sync {sync_dir or run_folder}[/bold]",
            highlight=False,
            soft_wrap=True,
        )
    elif url:
        console.print(f"W&B run: {url}", highlight=False, soft_wrap=True)


@contextmanager
def closing_run(run, sync_dir: Path | None = None):
    """Around a grid's work: on success finish the run and say where it is (finish_run); interrupted or failed, close
    it with exit code 1 (the next invocation resumes it) and go on raising."""
    try:
        yield run
    except BaseException:
        if run is not None:
            run.finish(exit_code=1)
        raise
    finish_run(run, sync_dir)
