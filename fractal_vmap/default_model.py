"""The embedded default base model: a tiny nanochat GPT pretrained on the synthetic documents, byte-level tokenizer.

Built by project code with no network (`uv run python scripts/build_default_model.py`, or on first use) in
well under a minute on 2 CPU cores, then cached under $FRACTAL_STORAGE_DIR (default ~/.cache/fractal-vmap).
"""

import os
import shutil
import tempfile
from pathlib import Path

import torch

from fractal_vmap.checkpoint import save_checkpoint
from fractal_vmap.console import console
from fractal_vmap.model import GPTConfig, init_params
from fractal_vmap.synth import documents
from fractal_vmap.tokenizer import byte_tokenizer, save_tokenizer

VERSION = 1  # bump when the recipe below changes, so old caches are not reused
# 256 bytes + 9 specials
CONFIG = GPTConfig(sequence_len=256, vocab_size=265, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
PRETRAIN_STEPS = 300
PRETRAIN_BATCH = 16  # sequences of 256 tokens: 4096 tokens a step, 1.2M tokens in all (~7k documents, ~1 pass)
SEED = 0


def storage_dir() -> Path:
    return Path(os.environ.get("FRACTAL_STORAGE_DIR", Path.home() / ".cache" / "fractal-vmap")).expanduser()


def default_model_dir() -> Path:
    """The cached default model dir (checkpoints/ + tokenizer/), built on first use."""
    directory = storage_dir() / f"default-model-v{VERSION}"
    if not (directory / "checkpoints").is_dir():
        console.print(
            f"building the default base model, once ({PRETRAIN_STEPS} pretraining steps, ~30 s on 2 CPU cores); cached "
            f"in {directory}",
            highlight=False,
            soft_wrap=True,
        )
        build_default_model(directory)
    return directory


def pretrain_tokens(n_tokens: int) -> torch.Tensor:
    """Documents as one stream of byte tokens, each document after a <|bos|>, as nanochat pretrains."""
    tokenizer = byte_tokenizer()
    bos = tokenizer.bos_id
    ids: list[int] = []
    for doc in documents(n_tokens // 100, SEED):  # documents average ~160 bytes, so this is more than enough
        ids += tokenizer.encode(doc, prepend=bos)
        if len(ids) >= n_tokens:
            break
    return torch.tensor(ids[:n_tokens])


def build_default_model(directory: Path, steps: int = PRETRAIN_STEPS) -> Path:
    """Pretrain the default model with the project's own single-lane trainer and write it atomically."""
    from fractal_vmap.options import FinetuneConfig
    from fractal_vmap.reference import train_single

    torch.manual_seed(SEED)
    T = CONFIG.sequence_len
    stream = pretrain_tokens(steps * PRETRAIN_BATCH * (T + 1)).view(steps, PRETRAIN_BATCH, T + 1)

    def batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return stream[step, :, :-1], stream[step, :, 1:]

    cfg = FinetuneConfig(
        learning_rate=0.02,
        embedding_lr=0.2,
        unembedding_lr=0.004,
        weight_decay=0.0,  # nanochat's base-training lrs
        trainable_param_groups="matrix,embedding,unembedding",
        num_iterations=steps,
        warmup_frac=0.05,
        final_lr_frac=0.1,
        device="cpu",
        dtype="float32",
    )

    from fractal_vmap.progress import StepProgress

    with StepProgress(console, "pretraining the default model", steps) as progress:

        def log(step: int, metrics: dict) -> None:
            progress.step(step + 1, metrics["train/loss"], (step + 1) * PRETRAIN_BATCH * T)

        result, params = train_single(cfg, CONFIG, init_params(CONFIG, SEED), batches, steps, torch.device("cpu"), log)
    if not result.stable:
        raise RuntimeError(f"default model pretraining diverged: {result.error}")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=".build-"))
    save_checkpoint(tmp / "checkpoints", steps, CONFIG, params, {"pretrain_final_loss": result.final_loss})
    save_tokenizer(byte_tokenizer(), tmp / "tokenizer")
    if directory.exists():  # another process finished first: keep its copy
        shutil.rmtree(tmp)
    else:
        tmp.rename(directory)
    return directory
