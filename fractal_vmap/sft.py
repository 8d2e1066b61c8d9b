"""What a nanochat SFT run trains on: its base model and tokenizer, its rendered dataset splits, its batch streams
and its step count. Shared by `finetune` (one run) and `grid` (rows of lanes)."""

import torch

from fractal_vmap.checkpoint import load_model, resolve_source
from fractal_vmap.data import SFTStream, load_conversations, render_examples, steps_for_tokens
from fractal_vmap.errors import UserError
from fractal_vmap.model import GPTConfig
from fractal_vmap.recipe import FinetuneConfig
from fractal_vmap.tokenizer import Tokenizer

DEFAULT_TRAIN_EXAMPLES, DEFAULT_VAL_EXAMPLES = 4000, 400  # the synthetic doc-QA set's split sizes


def model_dir(source: str):
    """A model source (a dir, hf:, wandb:, or default) resolved to a local dir; the default model is built on first use."""
    if source == "default":
        from fractal_vmap.default import default_model_dir

        return default_model_dir()
    return resolve_source(source)


def load_source(cfg: FinetuneConfig, device: torch.device) -> tuple[GPTConfig, dict[str, torch.Tensor], Tokenizer]:
    return load_model(str(model_dir(cfg.model)), cfg.tokenizer, device)


def conversations(source: str, split: str) -> list[dict]:
    if source == "default":
        from fractal_vmap.synth import doc_qa_conversations

        return doc_qa_conversations(
            DEFAULT_TRAIN_EXAMPLES if split == "train" else DEFAULT_VAL_EXAMPLES, seed=0, split=split
        )
    return load_conversations(source, split)


def render_split(cfg: FinetuneConfig, tokenizer: Tokenizer, config: GPTConfig, split: str) -> tuple[list, int]:
    """The rendered examples of a dataset split and how many were dropped for having no supervised token."""
    if cfg.max_seq_len > config.sequence_len * 10:  # nanochat precomputes rotary for 10x its sequence_len
        raise UserError(
            f"--max_seq_len {cfg.max_seq_len} exceeds the model's rotary table ({config.sequence_len * 10}): lower it"
        )
    source = cfg.dataset if split == "train" else (cfg.val_dataset or cfg.dataset)
    return render_examples(conversations(source, split), tokenizer, cfg.max_seq_len)


def make_stream(cfg: FinetuneConfig, tokenizer: Tokenizer, examples: list, seed: int) -> SFTStream:
    """SFT batches padded with <|assistant_end|>, in an order drawn from the seed."""
    return SFTStream(examples, cfg.device_batch_size, seed, tokenizer.special_id("<|assistant_end|>"))


def total_steps(cfg: FinetuneConfig, first_targets: torch.Tensor) -> int:
    return cfg.num_iterations if cfg.num_iterations is not None else steps_for_tokens(cfg.num_tokens, first_targets)


def lane_batches(seeds: list[int], streams: dict[int, SFTStream], pad_id: int):
    """Shared batches [B, T] when every lane has the same seed, else one stream per lane stacked to [L, B, T]."""
    if len(set(seeds)) == 1:
        return streams[seeds[0]].batch

    def batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [streams[s].batch(step) for s in seeds]
        T = max(x.shape[1] for x, _ in pairs)  # right-padding more columns changes no loss (causal, targets -1)
        inputs = torch.stack([torch.nn.functional.pad(x, (0, T - x.shape[1]), value=pad_id) for x, _ in pairs])
        targets = torch.stack([torch.nn.functional.pad(y, (0, T - y.shape[1]), value=-1) for _, y in pairs])
        return inputs, targets

    return batches
