"""nanochat's GPT as a pure function of a dict of tensors named like nanochat's state dict.

Pure, so that `torch.func.functional_call`/`vmap` can run many stacked copies ("lanes") at once.
Architecture facts (nanochat commit 8f979a8): rotary (bf16 cos/sin) then QK RMSNorm, relu^2 MLP, GQA,
untied wte/lm_head, vocab padded to a multiple of 64, logit softcap 15, no biases, no learnable norms. LoRA adapters,
when the dict holds them (lora.py), add their low-rank path to the matrices they adapt.
"""

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from fractal_vmap.errors import UserError
from fractal_vmap.head import head_loss, softcapped_logits
from fractal_vmap.recompute import recomputed

ROPE_BASE = 10000.0


@dataclass(frozen=True)
class GPTConfig:
    sequence_len: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        missing = [f for f in asdict(cls()) if f not in d]
        if missing:
            raise UserError(f"model config lacks {missing}: meta_*.json must hold nanochat's model_config")
        config = cls(**{f: int(d[f]) for f in asdict(cls())})
        if config.n_embd % config.n_head or config.n_head % config.n_kv_head:
            raise UserError(f"bad model config {config}: n_embd must divide by n_head, n_head by n_kv_head")
        return config

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / 64) * 64  # wte/lm_head rows padded to a multiple of 64


def param_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter name (nanochat state-dict order) and its shape."""
    C, V, hd = config.n_embd, config.padded_vocab_size, config.head_dim
    shapes = {"transformer.wte.weight": (V, C)}
    for i in range(config.n_layer):
        p = f"transformer.h.{i}."
        shapes[p + "attn.c_q.weight"] = (config.n_head * hd, C)
        shapes[p + "attn.c_k.weight"] = (config.n_kv_head * hd, C)
        shapes[p + "attn.c_v.weight"] = (config.n_kv_head * hd, C)
        shapes[p + "attn.c_proj.weight"] = (C, C)
        shapes[p + "mlp.c_fc.weight"] = (4 * C, C)
        shapes[p + "mlp.c_proj.weight"] = (C, 4 * C)
    shapes["lm_head.weight"] = (V, C)
    return shapes


GROUPS = ("matrix", "embedding", "unembedding")


def param_group(name: str) -> str:
    """matrix = every weight in transformer.h (Muon); embedding = wte, unembedding = lm_head (AdamW)."""
    if name.startswith("transformer.h."):
        return "matrix"
    return {"transformer.wte.weight": "embedding", "lm_head.weight": "unembedding"}[name]


def init_params(config: GPTConfig, seed: int = 0, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """nanochat's from-scratch init: Linear std 1/sqrt(fan_in)*min(1, sqrt(fan_out/fan_in)), wte std 1, zero
    c_proj/lm_head."""
    gen = torch.Generator(device=device).manual_seed(seed)
    params = {}
    for name, shape in param_shapes(config).items():
        if name == "lm_head.weight" or name.endswith("c_proj.weight"):
            params[name] = torch.zeros(shape, device=device)
        elif name == "transformer.wte.weight":
            params[name] = torch.randn(shape, generator=gen, device=device)
        else:
            fan_out, fan_in = shape
            std = 1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in))
            params[name] = torch.randn(shape, generator=gen, device=device) * std
    return params


def rotary_cos_sin(config: GPTConfig, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [1, T, 1, head_dim/2] in bfloat16, as nanochat keeps them (for 10x the sequence length)."""
    hd = config.head_dim
    inv_freq = 1.0 / (ROPE_BASE ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd))
    t = torch.arange(config.sequence_len * 10, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)
    return freqs.cos().bfloat16()[None, :, None, :], freqs.sin().bfloat16()[None, :, None, :]


def norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    y1 = x1 * cos + x2 * sin
    y2 = x1 * (-sin) + x2 * cos
    return torch.cat([y1, y2], dim=-1)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention [B, H, T, D] of one model, as nanochat calls it (GQA when k, v have fewer heads)."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[-3] != q.shape[-3])


# Causal attention for stacked lanes. torch.func has no batching rule for SDPA's CPU kernels nor for any SDPA
# backward, so under vmap attention goes through an autograd.Function whose vmap rule folds the lane dim into the
# batch dim: one fused kernel call for all lanes. It calls the fused kernel that SDPA itself picks for these inputs and
# keeps the kernel's logsumexp for the fused backward (the same kernels, so the same numbers as plain SDPA, lane by
# lane): on CPU the flash kernel; on CUDA flash (bfloat16/float16) or memory-efficient (float32), as SDPA's own
# choice says. GQA k, v go in with their own head count, as SDPA's enable_gqa passes them: the flash kernels (CPU and
# CUDA) read each kv head for its group of q heads and sum dk, dv in their own order (copying the heads first would
# sum them in autograd's order); SDPA never picks the memory-efficient kernel for grouped heads. Where SDPA picks
# neither (cuDNN, math; other devices), the Function calls SDPA and recomputes it in the backward.
# Why not a torch.library.custom_op: its first call imports torch._dynamo, 2-5 s of every grid process (the compiled
# step, compiled.py, wraps the same kernel calls in custom ops: it imports dynamo anyway).

FLASH, EFFICIENT, MATH = int(SDPBackend.FLASH_ATTENTION), int(SDPBackend.EFFICIENT_ATTENTION), int(SDPBackend.MATH)
FUSED = (FLASH, EFFICIENT)  # the kernels whose backward takes the saved logsumexp
aten = torch.ops.aten


def attention_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    """The kernel SDPA picks for causal attention on these (whole, not vmapped) tensors, an SDPBackend value."""
    if q.device.type == "cpu":
        return FLASH  # SDPA's CPU choice whenever there is no mask and no dropout
    if q.device.type != "cuda":
        return MATH
    return aten._fused_sdp_choice(q, k, v, is_causal=True, enable_gqa=k.shape[-3] != q.shape[-3])


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: int) -> tuple[torch.Tensor, ...]:
    """Causal attention by a FUSED kernel -> (out, logsumexp, philox_seed, philox_offset): what its backward takes
    (the philox pair, the CUDA ops' dropout state, is empty on CPU; dropout is 0 here)."""
    if q.device.type == "cpu":
        out, logsumexp = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)
        return out, logsumexp, q.new_empty(0), q.new_empty(0)
    if backend == FLASH:
        out, logsumexp, _, _, _, _, seed, offset, _ = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True)
        return out, logsumexp, seed, offset
    assert backend == EFFICIENT and k.shape[-3] == q.shape[-3], f"not a fused kernel for these heads: {backend}"
    # out, logsumexp, seed, offset
    return tuple(aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, True))


def fused_attention_backward(grad_out, q, k, v, out, logsumexp, seed, offset, backend: int) -> tuple[torch.Tensor, ...]:
    """(dq, dk, dv) of `fused_attention` from its saved output and logsumexp: the forward is not recomputed."""
    if q.device.type == "cpu":
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(grad_out, q, k, v, out, logsumexp, 0.0, True)
    if backend == FLASH:  # cum_seq_q/k: None for dense batches; max_q/max_k: the sequence lengths
        return aten._scaled_dot_product_flash_attention_backward(
            grad_out, q, k, v, out, logsumexp, None, None, q.shape[-2], k.shape[-2], 0.0, True, seed, offset
        )
    dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
        grad_out, q, k, v, None, out, logsumexp, seed, offset, 0.0, [True, True, True, False], True
    )
    return dq, dk, dv


def _fold_lanes(info, in_dims, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """[lanes, B, ...] at any vmapped dim (or unbatched, shared by all lanes) -> [lanes * B, ...]."""
    n = info.batch_size
    folded = []
    for t, d in zip(tensors, in_dims):
        t = t.expand(n, *t.shape) if d is None else t.movedim(d, 0)
        folded.append(t.reshape(n * t.shape[1], *t.shape[2:]))
    return folded


def _unfold_lanes(info, t: torch.Tensor) -> torch.Tensor:
    return t.reshape(info.batch_size, -1, *t.shape[1:])


class _LanesAttention(torch.autograd.Function):
    """(out, logsumexp, seed, offset) of a FUSED kernel, only out differentiable; where SDPA picks none of them,
    (SDPA's out, three empty tensors) and SDPA again in the backward."""

    @staticmethod
    def forward(q, k, v):
        backend = attention_backend(q, k, v)
        if backend in FUSED:
            return fused_attention(q, k, v, backend)
        return sdpa_attention(q, k, v), q.new_empty(0), q.new_empty(0), q.new_empty(0)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.backend = attention_backend(*inputs)  # the tensors forward saw: the same answer
        ctx.save_for_backward(*inputs, *(output if ctx.backend in FUSED else ()))
        ctx.mark_non_differentiable(*output[1:])

    @staticmethod
    def backward(ctx, grad_out, *_):
        if ctx.backend in FUSED:
            return fused_attention_backward(grad_out, *ctx.saved_tensors, ctx.backend)
        q, k, v = (t.detach().requires_grad_() for t in ctx.saved_tensors)
        with torch.enable_grad():
            out = sdpa_attention(q, k, v)
        return torch.autograd.grad(out, (q, k, v), grad_out)

    @staticmethod
    def vmap(info, in_dims, q, k, v):
        out, logsumexp, seed, offset = _LanesAttention.apply(*_fold_lanes(info, in_dims, q, k, v))
        fused = logsumexp.numel() > 0
        return (_unfold_lanes(info, out), _unfold_lanes(info, logsumexp) if fused else logsumexp, seed, offset), (
            0,
            0 if fused else None,
            None,
            None,
        )


def lanes_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention [B, H, T, D] that folds vmapped lanes into the batch (also correct for one model). Under
    autocast, inputs are cast as SDPA's autocast rule would (it is a lower-precision op)."""
    if torch.is_autocast_enabled(q.device.type):
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    return _LanesAttention.apply(q, k, v)[0]


Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Head = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


BLOCK_WEIGHTS = (
    "attn.c_q",
    "attn.c_k",
    "attn.c_v",
    "attn.c_proj",
    "mlp.c_fc",
    "mlp.c_proj",
)  # a block's weights, in block()'s order


# LoRA adapters ride in the params dict beside the weight they adapt: "<weight name minus .weight>.lora_A" [R, in] and
# ".lora_B" [out, R], and LORA_SCALE (alpha / R) once for the model (lora.py makes them). A model without them runs
# exactly the plain path.
LORA_A, LORA_B, LORA_SCALE = "lora_A", "lora_B", "lora.scale"


def adapted_linear(h: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale) -> torch.Tensor:
    """h @ (w + scale * b @ a).T without forming the sum: the frozen w's matmul (one large one for every vmapped
    lane's tokens when w is shared), plus the low-rank path through the R-wide bottleneck."""
    z = F.linear(h, a)
    return F.linear(h, w) + F.linear(z * scale.to(z.dtype), b)


def block(
    x, wq, wk, wv, wo, wfc, wproj, cos, sin, *lora, config: GPTConfig, attend: Attention, adapted: tuple[str, ...] = ()
) -> torch.Tensor:
    """One transformer block on the residual stream x [B, T, C]: x + attn(norm(x)), then x + mlp(norm(x)).
    lora: (scale, a, b, a, b, ...), the adapters of the BLOCK_WEIGHTS named in `adapted`, in that order."""
    B, T = x.shape[:2]
    H, KV, hd = config.n_head, config.n_kv_head, config.head_dim
    adapters = {name: lora[1 + 2 * k : 3 + 2 * k] for k, name in enumerate(adapted)}

    def linear(h, w, name):
        return adapted_linear(h, w, *adapters[name], lora[0]) if name in adapters else F.linear(h, w)

    h = norm(x)
    q = linear(h, wq, "attn.c_q").view(B, T, H, hd)
    k = linear(h, wk, "attn.c_k").view(B, T, KV, hd)
    v = linear(h, wv, "attn.c_v").view(B, T, KV, hd)
    q, k = norm(apply_rotary(q, cos, sin)), norm(apply_rotary(k, cos, sin))
    y = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    x = x + linear(y.transpose(1, 2).reshape(B, T, config.n_embd), wo, "attn.c_proj")
    h = F.relu(linear(norm(x), wfc, "mlp.c_fc")).square()
    return x + linear(h, wproj, "mlp.c_proj")


def forward(
    params: dict[str, torch.Tensor],
    idx: torch.Tensor,
    config: GPTConfig,
    cos_sin: tuple[torch.Tensor, torch.Tensor],
    targets: torch.Tensor | None = None,
    attend: Attention = sdpa_attention,
    head: Head = head_loss,
    remat: bool = False,
) -> torch.Tensor:
    """Logits [B, T, vocab] in float32 (softcapped), or head(x [B*T, C], lm_head, targets [B*T]) when targets are
    given (by default the mean cross-entropy). A vmapped row of lanes passes lanes_attention and
    head.lanes_head_loss (the caller picks; nothing here asks whether it runs under vmap). remat: each block's
    activations are recomputed in the backward (recompute.py), only its input kept: the same numbers, less memory."""
    B, T = idx.shape
    cos, sin = cos_sin[0][:, :T], cos_sin[1][:, :T]
    x = norm(F.embedding(idx, params["transformer.wte.weight"]))
    for i in range(config.n_layer):
        weights = [params[f"transformer.h.{i}.{name}.weight"] for name in BLOCK_WEIGHTS]
        adapted = tuple(name for name in BLOCK_WEIGHTS if f"transformer.h.{i}.{name}.{LORA_A}" in params)
        lora = [params[LORA_SCALE]] if adapted else []
        for name in adapted:
            lora += [params[f"transformer.h.{i}.{name}.{LORA_A}"], params[f"transformer.h.{i}.{name}.{LORA_B}"]]
        run_block = partial(block, config=config, attend=attend, adapted=adapted)
        args = (x, *weights, cos, sin, *lora)
        x = recomputed(run_block, *args) if remat else run_block(*args)
    # slice the padded lm_head rows rather than the logits: the same dot products, but contiguous logits
    # (elementwise ops on a strided slice ran ~3x slower, and its backward zero-fills a padded copy)
    x, w = norm(x), params["lm_head.weight"][: config.vocab_size]
    if targets is None:
        return softcapped_logits(x, w)
    return head(x.view(B * T, config.n_embd), w, targets.reshape(B * T))


@torch.no_grad()
def generate_greedy(
    params: dict[str, torch.Tensor], config: GPTConfig, prompt: list[int], max_tokens: int
) -> list[int]:
    """Greedy decoding (temperature 0), recomputing the whole prefix each step: for checks and notebooks."""
    device = params["lm_head.weight"].device
    cos_sin = rotary_cos_sin(config, device)
    ids = torch.tensor([prompt], device=device)
    out = []
    for _ in range(max_tokens):
        next_id = forward(params, ids, config, cos_sin)[0, -1].argmax()
        out.append(int(next_id))
        ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    return out


def nanochat_depth(depth: int, vocab_size: int = 65536, sequence_len: int = 2048) -> GPTConfig:
    """nanochat's model of a given depth: width 64 x depth, heads of 128 dims (at least one), no GQA, nanochat's
    vocab and context by default (d20: 20 layers, 1280 wide, 10 heads)."""
    width = 64 * depth
    heads = max(1, math.ceil(width / 128))
    return GPTConfig(
        sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_head=heads, n_kv_head=heads, n_embd=width
    )
