"""LoRA (Hu et al. 2021, arXiv 2106.09685) as a setting of a nanochat run: each adapted block matrix W [out, in] stays
frozen and gains W + (alpha / R) B A, with A [R, in] random and B [out, R] zero, so that step 0 is exactly the base
model. Only A and B train (AdamW, recipe.py); the base, the lm_head and the embedding are frozen. The adapters ride in
the params dict beside their weight (model.py's LORA_A, LORA_B, LORA_SCALE), so one functional forward serves a single
model (`finetune --lora_rank R`) and a vmapped row of lanes (each lane its own stacked A, B and scale, the base
shared by all lanes, never copied).

A's init: uniform in +-1/sqrt(in), PEFT's default (kaiming-uniform with a = sqrt(5)), drawn from the run's seed, so a
lane and its `finetune` run start from the same adapters.
"""

import math

import torch

from fractal_vmap.errors import UserError
from fractal_vmap.model import BLOCK_WEIGHTS, LORA_A, LORA_B, LORA_SCALE, GPTConfig, param_shapes

SHORT_NAMES = {
    "c_q": "attn.c_q",
    "c_k": "attn.c_k",
    "c_v": "attn.c_v",
    "c_fc": "mlp.c_fc",
}  # --lora_targets spellings; c_proj is ambiguous (attention or MLP), so those two take their full names


def parse_targets(text: str) -> tuple[str, ...]:
    """--lora_targets as block weight names (BLOCK_WEIGHTS order): "all", or a comma list of short or full names."""
    if text.strip() == "all":
        return BLOCK_WEIGHTS
    names = [SHORT_NAMES.get(n.strip(), n.strip()) for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in BLOCK_WEIGHTS]
    if unknown or not names:
        raise UserError(
            f"--lora_targets {text!r}: use all, or a comma list of c_q, c_k, c_v, attn.c_proj, c_fc, mlp.c_proj"
        )
    return tuple(n for n in BLOCK_WEIGHTS if n in names)


def check(rank: int, alpha: float, targets: str) -> None:
    """One clear line for a bad LoRA setting."""
    if rank < 0:
        raise UserError(f"--lora_rank is {rank}: use 0 (off: full fine-tuning) or a positive rank")
    if not 0 < alpha < math.inf:
        raise UserError(f"--lora_alpha is {alpha}: it must be positive and finite")
    parse_targets(targets)


def scale(rank: int, alpha: float) -> float:
    """The adapters' multiplier alpha / R."""
    return alpha / rank


def adapter_shapes(config: GPTConfig, rank: int, targets: str = "all") -> dict[str, tuple[int, int]]:
    """Every adapter's name and shape: A [R, in] and B [out, R] for each adapted matrix of every block."""
    shapes = {}
    weights = param_shapes(config)
    for i in range(config.n_layer):
        for name in parse_targets(targets):
            out, inp = weights[f"transformer.h.{i}.{name}.weight"]
            shapes[f"transformer.h.{i}.{name}.{LORA_A}"] = (rank, inp)
            shapes[f"transformer.h.{i}.{name}.{LORA_B}"] = (out, rank)
    return shapes


def init_adapters(config: GPTConfig, rank: int, targets: str, seed: int) -> dict[str, torch.Tensor]:
    """The adapters at step 0 (float32, CPU): A uniform in +-1/sqrt(in) from `seed`, B zero."""
    gen = torch.Generator().manual_seed(seed)
    adapters = {}
    for name, shape in adapter_shapes(config, rank, targets).items():
        if name.endswith(LORA_A):
            bound = 1 / math.sqrt(shape[1])
            adapters[name] = (torch.rand(shape, generator=gen) * 2 - 1) * bound
        else:
            adapters[name] = torch.zeros(shape)
    return adapters


def adapted_weight(name: str) -> str:
    """The weight an adapter belongs to: transformer.h.0.attn.c_q.lora_A -> transformer.h.0.attn.c_q.weight."""
    return name.rsplit(".", 1)[0] + ".weight"


def merged(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A model with its adapters folded in (W + scale * B A for each adapted W) and no adapters left: the plain
    model that the adapted one computes, e.g. to save as a nanochat checkpoint."""
    out = {k: v for k, v in params.items() if not k.endswith((LORA_A, LORA_B)) and k != LORA_SCALE}
    for name, a in params.items():
        if name.endswith(LORA_A):
            b = params[name.removesuffix(LORA_A) + LORA_B]
            w = adapted_weight(name)
            out[w] = params[w] + params[LORA_SCALE] * (b @ a)
    return out
