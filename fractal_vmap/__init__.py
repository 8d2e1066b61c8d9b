"""fractal-vmap: map the trainability boundary of nanochat fine-tuning, a whole grid row per vmapped loop.

Notebook API:
    config, params, tokenizer = load_model("path/to/checkpoint_dir")   # or "hf:owner/repo", "wandb:e/p/name:v0"
    loss(params, config, inputs, targets)                              # mean cross-entropy, a scalar tensor
    result, final = train_single(FinetuneConfig(...), config, params, batches, steps, device)  # one lane, torch.optim
    result = run_finetune(FinetuneConfig(dataset="data.jsonl"))          # the `finetune` command
"""

import torch

from fractal_vmap.checkpoint import load_model, save_checkpoint
from fractal_vmap.finetune import run_finetune
from fractal_vmap.recipe import CellResult, FinetuneConfig
from fractal_vmap.single import train_single
from fractal_vmap.model import GPTConfig, forward, rotary_cos_sin


def loss(params: dict[str, torch.Tensor], config: GPTConfig, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of a parameter dict on one batch (targets -1 are ignored)."""
    return forward(params, inputs, config, rotary_cos_sin(config, inputs.device), targets)


__all__ = ["CellResult", "FinetuneConfig", "GPTConfig", "forward", "load_model", "loss", "run_finetune", "save_checkpoint", "train_single"]
