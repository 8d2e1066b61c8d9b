"""The `finetune` command: one run (one grid cell) on the single-lane reference trainer, its result as JSON."""

from dataclasses import asdict
from pathlib import Path

from fractal_vmap.console import console
from fractal_vmap.data import make_stream, render_split, total_steps
from fractal_vmap.files import check_writable_file, finite_or_none, strict_json, write_atomic
from fractal_vmap.options import FinetuneConfig
from fractal_vmap.progress import StepProgress
from fractal_vmap.recipe import autocast_dtype, resolve_device, validate
from fractal_vmap.reference import evaluate, train_single
from fractal_vmap.sources import load_model


def run_finetune(cfg: FinetuneConfig) -> dict:
    """Load model and data, train one lane, write the result JSON, log to W&B. Returns the result fields + `out`."""
    from fractal_vmap.tracking import check_wandb, finish_run, start_run

    validate(cfg)
    check_wandb(cfg)
    cfg.run_name = cfg.run_name or f"finetune-lr{cfg.learning_rate:g}-tok{cfg.num_tokens}-seed{cfg.seed}"
    out = Path(cfg.out or f"runs/finetune/{cfg.run_name}.json")
    check_writable_file(out, "--out")  # before any work: a run must not end in an unwritable path
    device = resolve_device(cfg.device)
    config, params, tokenizer = load_model(cfg.model, cfg.tokenizer, device)
    examples, dropped = render_split(cfg, tokenizer, config, "train")
    stream = make_stream(cfg, tokenizer, examples, cfg.seed)
    has_val = cfg.dataset == "default" or cfg.val_dataset is not None
    val = (
        make_stream(cfg, tokenizer, render_split(cfg, tokenizer, config, "validation")[0], cfg.seed)
        if has_val
        else None
    )
    steps = total_steps(cfg, stream.batch(0)[1])
    wandb_run = start_run(
        cfg.wandb, cfg.wandb_project, cfg.wandb_entity, cfg.run_name, asdict(cfg), out.parent, "finetune"
    )
    processed = [0]  # tokens pushed through the model (all positions, padding included), as the grid counts them

    def batches(step: int):
        inputs, targets = stream.batch(step)
        processed[0] += inputs.numel()
        return inputs, targets

    with StepProgress(console, f"finetune {cfg.run_name}", steps) as progress:

        def log(step: int, metrics: dict) -> None:
            progress.step(step + 1, metrics["train/loss"], processed[0])
            if wandb_run is not None:
                wandb_run.log(metrics, step=step)

        cell, final_params = train_single(cfg, config, params, batches, steps, device, log, val.batch if val else None)
    result = cell.to_dict()
    if val is not None and cell.stable:
        result["val_loss"] = evaluate(
            final_params, config, val.batch, cfg.eval_batches, device, autocast_dtype(cfg, device)
        )
    result["dropped_examples"] = dropped
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, strict_json(result))
    if wandb_run is not None:
        wandb_run.summary.update(finite_or_none({k: v for k, v in result.items() if k != "losses"}))
        finish_run(wandb_run)
    result["out"] = str(out)
    return result
