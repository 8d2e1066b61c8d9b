"""W&B logging that never fails a run: online with credentials, offline without, or disabled. wandb is imported lazily."""

import netrc
import os
from pathlib import Path


def _has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if not path.exists():
        return False
    return netrc.netrc(path).authenticators("api.wandb.ai") is not None


def wandb_mode(requested: str) -> str:
    """`auto` -> $WANDB_MODE if set, else online with credentials and offline without."""
    if requested not in ("auto", "online", "offline", "disabled"):
        raise ValueError(f"unknown wandb mode {requested!r}")
    if requested != "auto":
        return requested
    return os.environ.get("WANDB_MODE") or ("online" if _has_credentials() else "offline")


def start_run(mode: str, project: str, entity: str | None, name: str, config: dict, directory: Path, job_type: str):
    """A wandb run, or None when disabled. Offline runs land in `directory/wandb` for a later `wandb sync`."""
    mode = wandb_mode(mode)
    if mode == "disabled":
        return None
    import wandb

    directory.mkdir(parents=True, exist_ok=True)
    return wandb.init(
        project=project, entity=entity, name=name, config=config, dir=str(directory), mode=mode, job_type=job_type,
        settings=wandb.Settings(silent=True, console="off"),
    )
