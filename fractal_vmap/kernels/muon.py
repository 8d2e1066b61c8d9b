"""Fused Muon passes around Newton-Schulz, for one stacked matrix parameter [L, r, c], all lanes in each launch.
Reference: optim.BatchedMuon and optim.newton_schulz (torch).

Before Newton-Schulz (two launches, one pass over g and the momentum buffer):
  momentum_kernel   buf = lerp(buf, g, 1 - momentum) (stored for active lanes), the Nesterov update
                    lerp(g, buf, momentum), cast to bfloat16 into X, and each chunk's sum of squares;
  normalize_kernel  X /= its matrix's Frobenius norm: the chunks' sums added in a fixed order (deterministic, no
                    atomics), the norm rounded to bfloat16 and clamped at eps, as torch.optim.Muon does in bfloat16.
After it (one launch): update_kernel  p += -lr * sqrt(max(1, r/c)) * O for active lanes (O may be a transposed view).
Arithmetic is float32 whatever the storage dtype; stores are rounded to nearest even.
"""

import torch
import triton
import triton.language as tl

from fractal_vmap.kernels import interpreting
from fractal_vmap.kernels.common import lerp, lerp_weights, round_to_bf16, store

BLOCK, ITERS = 1024, 16  # a program streams ITERS blocks: 16K elements, so a d20 matrix (1.6M-6.6M) has <= 400 chunks
TILE = 64  # update_kernel tiles of 64 x 64: a transposed O is read in whole tiles
INTERPRET_BLOCK, INTERPRET_ITERS, INTERPRET_TILE = (
    256,
    2,
    32,
)  # the interpreter pays per op, not per element: few, wide programs
SUMS = 128  # partial sums added per step in normalize_kernel


def _sizes() -> tuple[int, int, int]:
    return (INTERPRET_BLOCK, INTERPRET_ITERS, INTERPRET_TILE) if interpreting() else (BLOCK, ITERS, TILE)


@triton.jit
def momentum_kernel(
    g_ptr,
    buf_ptr,
    x_ptr,
    sums_ptr,
    active_ptr,
    n,
    w,
    w_minus_1,
    momentum,
    momentum_minus_1,
    NESTEROV: tl.constexpr,
    BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
):
    """Program (chunk, lane) handles elements [chunk * ITERS * BLOCK, ...) of one lane's matrix of n elements.
    w = 1 - momentum, computed in float64 on the host and rounded to float32, as torch does; the *_minus_1: see
    common.lerp_weights."""
    chunk, lane = tl.program_id(0), tl.program_id(1)
    limit = tl.where(tl.load(active_ptr + lane) != 0, n, 0)  # an inactive lane's buffer is not written
    base = lane.to(tl.int64) * n
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(ITERS):
        offs = (chunk * ITERS + i) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(g_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        buf = lerp(tl.load(buf_ptr + base + offs, mask=mask, other=0.0).to(tl.float32), g, w, w_minus_1)
        store(buf_ptr + base + offs, buf, offs < limit)
        if NESTEROV:
            update = lerp(g, buf, momentum, momentum_minus_1)
        else:
            update = buf
        x = round_to_bf16(update)  # the bfloat16 that Newton-Schulz gets; the norm is of these values
        tl.store(x_ptr + base + offs, x.to(tl.bfloat16), mask=mask)
        acc += x * x  # masked-off elements are loaded as 0 and stay 0
    tl.store(sums_ptr + lane * tl.num_programs(0) + chunk, tl.sum(acc, axis=0))


@triton.jit
def normalize_kernel(x_ptr, sums_ptr, n, n_chunks, eps, BLOCK: tl.constexpr, ITERS: tl.constexpr, SUMS: tl.constexpr):
    """X /= max(bf16(||X||), eps) for program (chunk, lane)'s elements; every program of a matrix adds its chunks'
    sums of squares in the same order, so they agree on the norm."""
    chunk, lane = tl.program_id(0), tl.program_id(1)
    total = tl.zeros([SUMS], dtype=tl.float32)
    for start in range(0, n_chunks, SUMS):
        idx = start + tl.arange(0, SUMS)
        total += tl.load(sums_ptr + lane * n_chunks + idx, mask=idx < n_chunks, other=0.0)
    # torch takes the vector_norm of bfloat16 X in float32, rounds it to bfloat16, clamps it at eps (in bfloat16)
    norm = tl.maximum(round_to_bf16(tl.sqrt_rn(tl.sum(total, axis=0))), eps)
    base = lane.to(tl.int64) * n
    for i in range(ITERS):
        offs = (chunk * ITERS + i) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + base + offs, mask=mask).to(tl.float32)
        store(x_ptr + base + offs, tl.div_rn(x, norm), mask)


@triton.jit
def update_kernel(p_ptr, o_ptr, neg_lr_ptr, active_ptr, rows, cols, o_lane, o_row, o_col, TILE: tl.constexpr):
    """Program (tile, lane): p[lane] += neg_lr[lane] * O[lane] on one TILE x TILE tile; O is read through its
    strides."""
    tile, lane = tl.program_id(0), tl.program_id(1)
    tiles_c = tl.cdiv(cols, TILE)
    r = (tile // tiles_c) * TILE + tl.arange(0, TILE)[:, None]
    c = (tile % tiles_c) * TILE + tl.arange(0, TILE)[None, :]
    limit = tl.where(tl.load(active_ptr + lane) != 0, rows, 0)  # an inactive lane: no row at all
    mask = (r < limit) & (c < cols)
    p_off = lane.to(tl.int64) * rows * cols + r * cols + c
    o = tl.load(o_ptr + lane.to(tl.int64) * o_lane + r * o_row + c * o_col, mask=mask).to(tl.float32)
    p = tl.load(p_ptr + p_off, mask=mask).to(tl.float32)
    # torch.addcmul(p, o, neg_lr) is one fma (measured: bit-equal on CPU)
    store(p_ptr + p_off, tl.fma(o, tl.load(neg_lr_ptr + lane), p), mask)


def momentum_normalize(g, buf, x, active, momentum: float, nesterov: bool, eps: float) -> None:
    """In place: buf [L, r, c] <- the momentum step (active lanes), x [L, r, c] bfloat16 <- the normalized update."""
    assert g.is_contiguous() and buf.is_contiguous() and x.is_contiguous() and x.dtype == torch.bfloat16
    block, iters, _ = _sizes()
    L, n = g.shape[0], g[0].numel()
    n_chunks = triton.cdiv(n, block * iters)
    sums = torch.empty(L, n_chunks, dtype=torch.float32, device=g.device)
    flags = active.view(torch.uint8)
    # enable_fp_fusion=False: no mul+add contracted into fma on the GPU, so it rounds exactly as the interpreter
    momentum_kernel[(n_chunks, L)](
        g,
        buf,
        x,
        sums,
        flags,
        n,
        *lerp_weights(1 - momentum),
        *lerp_weights(momentum),
        NESTEROV=nesterov,
        BLOCK=block,
        ITERS=iters,
        num_warps=4,
        enable_fp_fusion=False,
    )
    eps_bf16 = float(torch.tensor(eps, dtype=torch.bfloat16))  # torch clamps the bfloat16 norm at bfloat16(eps)
    normalize_kernel[(n_chunks, L)](
        x, sums, n, n_chunks, eps_bf16, BLOCK=block, ITERS=iters, SUMS=SUMS, num_warps=4, enable_fp_fusion=False
    )


def apply_update(p, o, neg_lr, active) -> None:
    """In place: p [L, r, c] += neg_lr [L] (float32) * o [L, r, c] (any strides) for the lanes where active [L]."""
    assert p.is_contiguous() and o.shape == p.shape
    _, _, tile = _sizes()
    L, rows, cols = p.shape
    grid = (triton.cdiv(rows, tile) * triton.cdiv(cols, tile), L)
    update_kernel[grid](
        p, o, neg_lr, active.view(torch.uint8), rows, cols, *o.stride(), TILE=tile, num_warps=4, enable_fp_fusion=False
    )
