"""The compiled row step (`--compile on`): a nanochat row's vmapped forward and its backward under torch.compile.

What is compiled. The lanes' losses `vmap(lane loss)(params, inputs, targets)`: Inductor fuses the elementwise work
around the matmuls (norms, rotary, relu^2, softcap, log-softmax, and their backwards) and AOTAutograd compiles the
backward with it. The optimizer update and the loss bookkeeping stay eager (lanes.lanes_step, the same code as the
eager row): on CPU a compiled update measured no faster, and on CUDA the fused Triton optimizers already run it.

What it takes to trace. Dynamo does not honour an autograd.Function's own vmap rule (it inlines the Function and vmaps
the kernel inside, op by op), so the eager row's attention Function cannot be compiled. Here the same kernel calls
(model.fused_attention and its backward, saved logsumexp included) are torch.library custom ops with a vmap rule that
folds the lanes into the kernel's batch, as the eager Function does: opaque to the compiler, the same numbers. The
head: on CUDA with Triton, kernels/head.py's lanes' kernel as a custom op (all lanes' logits of a GPU-sized vocab
never exist at once); elsewhere the plain `head_loss` of one lane, vmapped, whose softcap and cross-entropy the
compiler fuses over all lanes' logits (the default model's on CPU: [8 lanes, ~1800, 265] floats).

Shapes. Every distinct shape is a compile (tens of seconds on 2 CPU cores; Inductor's on-disk cache makes a repeat in
a later process much cheaper), and dynamic shapes do not survive vmap (dynamo specializes the lane and token counts
anyway). So batches are right-padded to a multiple of BUCKET tokens (inputs with token 0, targets with -1: causal
attention and ignored targets leave every real position's loss and gradient unchanged in exact arithmetic), and each
(lanes, padded tokens, data layout, dtype) is compiled once per process: a grid of one chunk size and batches up to
1024 tokens compiles at most 16 times per chunk size. Dead-lane compaction (lanes.run) keeps powers of two lanes
(`lane_counts`) for that reason: a chunk of 8 compacts to 4 and 2 lanes, not to every count.

Memory levers (levers.Levers). Stepping in the backward (hooks on the stacked leaves, which stay eager), micro-batches
(each part its own compiled shape), bf16 momentum and master weights go with the compiled forward unchanged. remat
does not: its recomputation is an autograd.Function with a vmap rule, which dynamo does not honour; a chunk with remat
runs the eager step (row.nanochat_row), and `grid --compile on --levers remat` is refused.

Numerics. Fused kernels round differently from the eager ops, and padding lengthens the matmuls' token sums (another
summation order): the compiled step equals the eager one within the trajectory noise floor of README "Fidelity"
(tests/test_compiled.py). A lane's numbers still do not depend on its chunk, bit for bit (tested).
"""

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import vmap

from fractal_vmap import model
from fractal_vmap.errors import UserError
from fractal_vmap.head import head_loss, lanes_first, scaled_by_lane
from fractal_vmap.kernels import ops
from fractal_vmap.lanes import MIN_LANES

# tokens: batches are padded to a multiple of this (at most 64 - 1 padded columns, ~14% at the default data's ~230)
BUCKET = 64
CHOICES = ("auto", "on", "off")
# distinct shapes one process may compile (dynamo's default of 8 is too few for 16 buckets x chunk sizes)
MAX_COMPILES = 64


# ---------------------------------------------------------------------------------------------------------------
# the lanes' attention as custom ops: the eager Function's kernels, opaque to the compiler


@torch.library.custom_op("fractal_vmap::attention", mutates_args=())
def attention_op(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """model.fused_attention: (out, logsumexp, philox_seed, philox_offset)."""
    backend = model.attention_backend(q, k, v)
    if backend not in model.FUSED:
        raise RuntimeError(
            f"the compiled step needs a fused attention kernel (SDPA picks backend {backend} here): use --compile off"
        )
    return model.fused_attention(q, k, v, backend)


@attention_op.register_fake
def _(q, k, v):
    backend = model.attention_backend(q, k, v)
    # the kernels' meta functions
    return model.fused_attention(q, k, v, backend if backend in model.FUSED else model.FLASH)


@torch.library.custom_op("fractal_vmap::attention_backward", mutates_args=())
def attention_backward_op(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, logsumexp: Tensor, seed: Tensor, offset: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """model.fused_attention_backward: (dq, dk, dv) from the saved output and logsumexp."""
    return tuple(
        model.fused_attention_backward(
            grad_out, q, k, v, out, logsumexp, seed, offset, model.attention_backend(q, k, v)
        )
    )


@attention_backward_op.register_fake
def _(grad_out, q, k, v, out, logsumexp, seed, offset):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _attention_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs, *output)


def _attention_backward(ctx, grad_out, *_):
    return attention_backward_op(grad_out, *ctx.saved_tensors)


def _attention_vmap(info, in_dims, q, k, v):
    out, logsumexp, seed, offset = attention_op(*model._fold_lanes(info, in_dims, q, k, v))
    return (model._unfold_lanes(info, out), model._unfold_lanes(info, logsumexp), seed, offset), (0, 0, None, None)


attention_op.register_autograd(_attention_backward, setup_context=_attention_setup)
attention_op.register_vmap(_attention_vmap)


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """model.lanes_attention for the compiled step (autocast casts as SDPA's rule would)."""
    if torch.is_autocast_enabled(q.device.type):
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    return attention_op(q, k, v)[0]


# ---------------------------------------------------------------------------------------------------------------
# the lanes' Triton head as a custom op (CUDA): no [lanes, tokens, vocab] logits held for the backward


# kernels/ops.py's custom op (the eager Triton head calls it too); its autograd and vmap rules are the compiled step's
triton_head_op = ops.lanes_head


def _head_setup(ctx, inputs, output):
    ctx.need = inputs[3:5]
    ctx.save_for_backward(output[1], output[2])


def _head_backward(ctx, grad_losses, *_):
    dx, dw = ctx.saved_tensors
    grad_x, grad_w = scaled_by_lane(grad_losses, dx if ctx.need[0] else None, dw if ctx.need[1] else None)
    return grad_x, grad_w, None, None, None, None


def _head_vmap(info, in_dims, x, w, targets, need_dx, need_dw, dtype):
    L = info.batch_size
    x, targets = lanes_first(L, in_dims, x, targets)
    if in_dims[1] is not None:  # a frozen lm_head shared by the lanes stays [V, C]: one matmul for all lanes' rows
        w = w.movedim(in_dims[1], 0)
    need_dx, need_dw = x.requires_grad, w.requires_grad  # seen here, on the lanes' own tensors (a vmapped view: False)
    losses, dx, dw = triton_head_op(x, w, targets, need_dx, need_dw, dtype)
    return (losses, dx, dw), (0, 0 if need_dx else None, 0 if need_dw else None)


triton_head_op.register_autograd(_head_backward, setup_context=_head_setup)
triton_head_op.register_vmap(_head_vmap)


def triton_head(x: Tensor, w: Tensor, targets: Tensor) -> Tensor:
    """head.lanes_head_loss(kernels="triton") for the compiled step: one lane's mean loss, all lanes in one call."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None  # the logits' matmul dtype
    # (under vmap the rule sets the flags)
    return triton_head_op(x, w, targets, x.requires_grad, w.requires_grad, dtype)[0]


# ---------------------------------------------------------------------------------------------------------------
# the compiled forward


def _lanes_losses(
    params: dict,
    frozen: dict,
    inputs: Tensor,
    targets: Tensor,
    cos_sin: tuple,
    config: model.GPTConfig,
    data_dim: int | None,
    head,
) -> Tensor:
    """The lanes' losses [L]. Everything is an argument, nothing a closure: dynamo guards on the values' shapes (not
    on which row built them), so every row of a grid reuses one compiled graph per shape."""

    def lane_loss(lane_params, x, y):
        return model.forward({**frozen, **lane_params}, x, config, cos_sin, y, attend=attention, head=head)

    return vmap(lane_loss, in_dims=(0, data_dim, data_dim))(params, inputs, targets)


# torch.compile(_lanes_losses), made on first use (importing torch.compile's stack costs seconds)
_compiled_losses = None
# the (lanes, padded tokens, data layout, dtype) this process compiled: one graph each
shapes_compiled: set[tuple] = set()


def bucket(tokens: int, limit: int) -> int:
    """The padded token count of a batch: the next multiple of BUCKET, but never past `limit` (the rotary table)."""
    return min(-(-tokens // BUCKET) * BUCKET, max(tokens, limit))


def lane_counts(alive: int) -> int:
    """Row.lane_counts of a compiled row: compaction keeps a power of two lanes (at least the engine's minimum), dead
    lanes as idle padding, so that a row compacting from 8 lanes compiles 4 and 2 at most, not every count."""
    return max(MIN_LANES, 1 << (alive - 1).bit_length())


def compiled_forward(
    config: model.GPTConfig, frozen: dict, cos_sin: tuple, data_dim: int | None, kernels: str = "torch"
):
    """A Row.forward for the engine: (params, inputs, targets) -> losses [L], padded to a bucket and compiled.
    kernels: the row's, resolved ("triton" on CUDA: the lanes' Triton head)."""
    global _compiled_losses
    if _compiled_losses is None:
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, MAX_COMPILES)
        # Inductor's CPU scatter-add (the backward of a trainable embedding) adds with atomics in thread order: run to
        # run and chunk to chunk noise. Deterministic mode makes it call aten's kernel. Process-wide, as dynamo guards
        # on it; warn_only: an op without a deterministic kernel warns rather than fails; no NaN-filling of new tensors.
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = False
        import torch._inductor.config as inductor

        inductor.cpp.enable_kernel_profile = True  # fused CPU kernels show in torch.profiler (bench counts launches)
        _compiled_losses = torch.compile(_lanes_losses, dynamic=False, fullgraph=True)
    limit = cos_sin[0].shape[1]
    # the head: on CUDA with Triton, the lanes' kernel (the plain head would hold all lanes' logits for the backward);
    # elsewhere the plain one, which the compiler fuses
    head = triton_head if kernels == "triton" and cos_sin[0].device.type == "cuda" else head_loss

    def forward(params: dict, inputs: Tensor, targets: Tensor) -> Tensor:
        T = inputs.shape[-1]
        padded = bucket(T, limit)
        if padded > T:
            inputs, targets = F.pad(inputs, (0, padded - T), value=0), F.pad(targets, (0, padded - T), value=-1)
        lanes = next(iter(params.values())).shape[0]
        amp = torch.get_autocast_dtype(inputs.device.type) if torch.is_autocast_enabled(inputs.device.type) else None
        shapes_compiled.add((lanes, tuple(inputs.shape), data_dim, amp))
        return _compiled_losses(params, frozen, inputs, targets, cos_sin, config, data_dim, head)

    return forward


def resolve_compile(choice: str, device: torch.device) -> bool:
    """--compile: on, off, or auto. auto is off on CPU: on 2 cores (AMD EPYC, benchmarks/README.md "bench") the
    compiled step ran 1.19x (8 lanes) and 1.15x (16 lanes) the eager row's lane-steps/s, ~0.03 s saved a step, but each
    (lane count, 64-token bucket) costs a compile of ~5-25 s, and a default grid's chunks see several buckets and a
    few dozen steps: the compiles cost more than they save. On CUDA auto is on by PROJECTION, not measurement (no GPU
    was lent): fusing the elementwise work removes launches (223 a step whatever L, against 485-639 eager on CPU) and
    memory passes, which dominate small models there, and a GPU grid's long rows are expected to repay the compiles."""
    if choice not in CHOICES:
        raise UserError(f"--compile {choice!r} is not one of {', '.join(CHOICES)}")
    if choice == "auto":
        return device.type == "cuda"
    return choice == "on"
