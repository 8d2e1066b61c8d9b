"""Where a base model comes from: a nanochat checkpoint dir, `hf:<owner>/<repo>[@revision]` (huggingface_hub, or its
local cache with HF_HUB_OFFLINE=1), `wandb:<entity>/<project>/<name>:<version>` (an already-downloaded artifact under
$WANDB_ARTIFACT_DIR, else the W&B API), or `default` (the embedded model, built on first use). `load_model` turns
any of them into (config, float32 params, tokenizer)."""

import os
from pathlib import Path

import torch

from fractal_vmap.checkpoint import find_tokenizer_dir, load_checkpoint
from fractal_vmap.errors import UserError
from fractal_vmap.model import GPTConfig
from fractal_vmap.tokenizer import Tokenizer, load_tokenizer


def resolve_source(source: str) -> Path:
    """A model source string to a local dir: `default` (built on first use), an `hf:` repo snapshot, a `wandb:`
    artifact dir, or a path."""
    if source == "default":
        from fractal_vmap.default_model import default_model_dir

        return default_model_dir()
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
            f"hf:{repo} is neither reachable nor in the local HF cache "
            f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}): download it first"
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
            f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {config.vocab_size}: pass the "
            "model's own tokenizer"
        )
    return config, params, tokenizer
