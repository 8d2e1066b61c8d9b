"""fractal-vmap: map the trainability boundary of nanochat fine-tuning, a whole grid row per vmapped loop.

Notebook API:
    config, params, tokenizer = load_model("path/to/checkpoint_dir")   # or "hf:owner/repo", "wandb:e/p/name:v0"
    loss(params, config, inputs, targets)                              # mean cross-entropy, a scalar tensor
    result, final = train_single(FinetuneConfig(...), config, params, batches, steps, device)  # one lane, torch.optim
    result = run_finetune(FinetuneConfig(dataset="data.jsonl"))          # the `finetune` command

The names are imported on first use (a module __getattr__), so `import fractal_vmap.cli` and `--help` stay fast.
"""

from importlib import import_module

# name -> the module that defines it
_EXPORTS = {
    "CellResult": "fractal_vmap.recipe",
    "FinetuneConfig": "fractal_vmap.options",
    "GPTConfig": "fractal_vmap.model",
    "forward": "fractal_vmap.model",
    "load_model": "fractal_vmap.checkpoint",
    "run_finetune": "fractal_vmap.finetune",
    "save_checkpoint": "fractal_vmap.checkpoint",
    "train_single": "fractal_vmap.single",
}


def loss(params: dict, config, inputs, targets):
    """Mean cross-entropy of a parameter dict on one batch (targets -1 are ignored): a scalar tensor."""
    from fractal_vmap.model import forward, rotary_cos_sin

    return forward(params, inputs, config, rotary_cos_sin(config, inputs.device), targets)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fractal_vmap' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


__all__ = [
    "CellResult",
    "FinetuneConfig",
    "GPTConfig",
    "forward",
    "load_model",
    "loss",
    "run_finetune",
    "save_checkpoint",
    "train_single",
]
