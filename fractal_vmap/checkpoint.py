"""nanochat checkpoint dirs: model_{step:06d}.pt (a state dict, maybe bfloat16, maybe with torch.compile's `_orig_mod.`
prefix) + meta_{step:06d}.json (`model_config`), read and written as nanochat does; the tokenizer dir beside them.
Where a checkpoint comes from (hf:, wandb:, default): sources.py."""

import json
import pickle
import re
import zipfile
from pathlib import Path

import torch

from fractal_vmap.errors import UserError
from fractal_vmap.machine import is_out_of_memory
from fractal_vmap.model import GPTConfig, param_shapes

MODEL_FILE = re.compile(r"model_(\d{6})\.pt")


def model_files_dir(directory: Path) -> Path:
    """The dir holding model_*.pt: the source itself, or its `checkpoints/` subdir (as in our fixtures)."""
    for d in (directory, directory / "checkpoints"):
        if d.is_dir() and any(MODEL_FILE.fullmatch(p.name) for p in d.iterdir()):
            return d
    raise UserError(
        f"no model_XXXXXX.pt in {directory} (nor in {directory / 'checkpoints'}): pass a nanochat checkpoint dir"
    )


def last_step(directory: str | Path) -> int:
    d = model_files_dir(Path(directory))
    return max(int(MODEL_FILE.fullmatch(p.name).group(1)) for p in d.iterdir() if MODEL_FILE.fullmatch(p.name))


def load_checkpoint(
    directory: str | Path, step: int | None = None, device: str | torch.device = "cpu"
) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """Load (config, float32 params) from a nanochat checkpoint dir; the latest step unless one is given."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(
            f"model dir {directory} does not exist: pass a nanochat checkpoint dir, hf:<repo> or wandb:<artifact>"
        )
    d = model_files_dir(directory)
    step = last_step(directory) if step is None else step
    model_path, meta_path = d / f"model_{step:06d}.pt", d / f"meta_{step:06d}.json"
    if not meta_path.exists():
        raise UserError(
            f"{meta_path} is missing: a nanochat checkpoint needs meta_{step:06d}.json beside model_{step:06d}.pt"
        )
    try:
        meta = json.loads(meta_path.read_text())
        state = torch.load(model_path, map_location=device, weights_only=True)
    except (json.JSONDecodeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError) as e:
        if is_out_of_memory(e):  # a sound checkpoint that does not fit: not the file's fault
            raise
        raise UserError(
            f"corrupt checkpoint {model_path} or {meta_path.name} ({type(e).__name__}): re-download or re-save it"
        ) from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model_config"), dict):
        raise UserError(f"{meta_path} is not a JSON object with a model_config object: it is not a nanochat meta file")
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise UserError(
            f"{model_path} holds a {type(state).__name__}, not a state dict of named tensors: save the model's "
            "state_dict()"
        )
    config = GPTConfig.from_dict(meta["model_config"])
    # torch.compile saves keys as `_orig_mod.<name>`; GPU runs store bf16 tensors: train in float32
    params = {k.removeprefix("_orig_mod."): v.float() for k, v in state.items()}
    expected = param_shapes(config)
    if set(params) != set(expected):
        diff = sorted(set(params) ^ set(expected))[:4]
        raise UserError(
            f"{model_path} does not match its model_config (differing keys, e.g. {diff}): is it a nanochat GPT?"
        )
    for name, shape in expected.items():
        if tuple(params[name].shape) != shape:
            raise UserError(f"{model_path}: {name} has shape {tuple(params[name].shape)}, model_config says {shape}")
    return config, params


def save_checkpoint(
    directory: str | Path, step: int, config: GPTConfig, params: dict[str, torch.Tensor], meta: dict | None = None
) -> Path:
    """Write model_{step:06d}.pt + meta_{step:06d}.json the way nanochat does (loadable by nanochat)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in params.items()}, directory / f"model_{step:06d}.pt")
    (directory / f"meta_{step:06d}.json").write_text(
        json.dumps({"model_config": config.to_dict(), "step": step, **(meta or {})}, indent=2)
    )
    return directory


def find_tokenizer_dir(directory: Path) -> Path:
    """tokenizer.pkl in the source dir, its `tokenizer/` subdir, or a sibling `tokenizer/` dir (nanochat's cache
    layout)."""
    for d in (
        directory,
        directory / "tokenizer",
        directory.parent / "tokenizer",
        directory.parent.parent / "tokenizer",
    ):
        if (d / "tokenizer.pkl").exists():
            return d
    raise UserError(
        f"no tokenizer.pkl in or beside {directory}: put nanochat's tokenizer dir there or pass --tokenizer"
    )
