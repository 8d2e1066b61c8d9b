"""nanochat checkpoint dirs (model_{step:06d}.pt + meta_{step:06d}.json) and model sources: a local dir,
`hf:<owner>/<repo>[@revision]` (huggingface_hub), `wandb:<entity>/<project>/<name>:<version>` (a W&B artifact)."""

import json
import os
import pickle
import re
import zipfile
from pathlib import Path

import torch

from fractal_vmap.errors import UserError
from fractal_vmap.model import GPTConfig, param_shapes
from fractal_vmap.tokenizer import Tokenizer, load_tokenizer

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
        raise UserError(
            f"corrupt checkpoint {model_path} or {meta_path.name} ({type(e).__name__}): re-download or re-save it"
        ) from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model_config"), dict):
        raise UserError(f"{meta_path} is not a JSON object with a model_config object: it is not a nanochat meta file")
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise UserError(
            f"{model_path} holds a {type(state).__name__}, not a state dict of named tensors: save the model's state_dict()"
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
    """tokenizer.pkl in the source dir, its `tokenizer/` subdir, or a sibling `tokenizer/` dir (nanochat's cache layout)."""
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


def resolve_source(source: str) -> Path:
    """A model source string to a local dir: a path, `hf:` repo snapshot, or `wandb:` artifact dir."""
    if source.startswith("hf:"):
        return _hf_snapshot(source.removeprefix("hf:"))
    if source.startswith("wandb:"):
        return _wandb_artifact(source.removeprefix("wandb:"))
    return Path(source).expanduser()


def _hf_snapshot(repo: str) -> Path:
    """Download (or, with HF_HUB_OFFLINE=1, find in the local HF cache) a hub repo snapshot."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo_id, _, revision = repo.partition("@")
    try:
        return Path(snapshot_download(repo_id, revision=revision or None))
    except LocalEntryNotFoundError:
        raise UserError(
            f"hf:{repo} is neither reachable nor in the local HF cache ({os.environ.get('HF_HOME', '~/.cache/huggingface')}): download it first"
        ) from None


def wandb_artifact_dir(artifact: str) -> Path:
    """Where `wandb` puts a downloaded artifact by default: $WANDB_ARTIFACT_DIR (./artifacts) / <name>:<version>."""
    return Path(os.environ.get("WANDB_ARTIFACT_DIR", "./artifacts")) / artifact.split("/")[-1]


def _wandb_artifact(artifact: str) -> Path:
    """`entity/project/name:version`: an already-downloaded copy if there is one, else download it with the W&B API."""
    if artifact.count("/") != 2 or ":" not in artifact:
        raise UserError(f"wandb:{artifact} is not of the form wandb:<entity>/<project>/<name>:<version>")
    local = wandb_artifact_dir(artifact)
    if local.is_dir():
        return local
    import wandb

    return Path(wandb.Api().artifact(artifact).download(root=str(local)))


def load_model(
    source: str, tokenizer_dir: str | None = None, device: str | torch.device = "cpu", step: int | None = None
) -> tuple[GPTConfig, dict[str, torch.Tensor], Tokenizer]:
    """Load a model source into (config, float32 params, tokenizer), checking the tokenizer fits the model."""
    directory = resolve_source(source)
    config, params = load_checkpoint(directory, step, device)
    tokenizer = load_tokenizer(Path(tokenizer_dir) if tokenizer_dir else find_tokenizer_dir(directory))
    if tokenizer.vocab_size != config.vocab_size:
        raise UserError(
            f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {config.vocab_size}: pass the model's own tokenizer"
        )
    return config, params, tokenizer
