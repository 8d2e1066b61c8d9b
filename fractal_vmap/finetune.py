"""The `finetune` command: one run (one grid cell) on the single-lane reference trainer, its result as JSON."""

from dataclasses import asdict
from pathlib import Path

from fractal_vmap.files import check_writable_file, strict_json, write_atomic
from fractal_vmap.recipe import FinetuneConfig, autocast_dtype, resolve_device, validate
from fractal_vmap.sft import load_source, make_stream, render_split, total_steps
from fractal_vmap.single import evaluate, train_single


def run_finetune(cfg: FinetuneConfig) -> dict:
    """Load model and data, train one lane, write the result JSON, log to W&B. Returns the result fields + `out`."""
    from fractal_vmap.tracking import start_run

    validate(cfg)
    cfg.run_name = cfg.run_name or f"finetune-lr{cfg.learning_rate:g}-tok{cfg.num_tokens}-seed{cfg.seed}"
    out = Path(cfg.out or f"runs/finetune/{cfg.run_name}.json")
    check_writable_file(out, "--out")  # before any work: a run must not end in an unwritable path
    device = resolve_device(cfg.device)
    config, params, tokenizer = load_source(cfg, device)
    examples, dropped = render_split(cfg, tokenizer, config, "train")
    stream = make_stream(cfg, tokenizer, examples, cfg.seed)
    has_val = cfg.dataset == "default" or cfg.val_dataset is not None
    val = make_stream(cfg, tokenizer, render_split(cfg, tokenizer, config, "validation")[0], cfg.seed) if has_val else None
    steps = total_steps(cfg, stream.batch(0)[1])
    wandb_run = start_run(cfg.wandb, cfg.wandb_project, cfg.wandb_entity, cfg.run_name, asdict(cfg), out.parent, "finetune")
    log = (lambda step, metrics: wandb_run.log(metrics, step=step)) if wandb_run is not None else None
    cell, final_params = train_single(cfg, config, params, stream.batch, steps, device, log, val.batch if val else None)
    result = cell.to_dict()
    if val is not None and cell.stable:
        result["val_loss"] = evaluate(final_params, config, val.batch, cfg.eval_batches, device, autocast_dtype(cfg, device))
    result["dropped_examples"] = dropped
    if wandb_run is not None:
        wandb_run.summary.update({k: v for k, v in result.items() if k != "losses"})
        wandb_run.finish()
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, strict_json(result))
    result["out"] = str(out)
    return result
