"""Fused AdamW step of one stacked parameter [L, ...] for all lanes at once. Reference: optim.BatchedAdamW (torch).

One pass: p, g, exp_avg and exp_avg_sq are read once and p and both moments written once (16 bytes per float32
element, against ~60 for the torch path's separate ops and where()-copies). The per-lane scalars (decoupled decay,
step size, bias correction) come precomputed in float64 by BatchedAdamW and rounded to float32, as the torch path
rounds them. Arithmetic is float32 whatever the storage dtype; results are stored rounded to nearest even. An
inactive lane reads and writes nothing.
"""

import torch
import triton
import triton.language as tl

from fractal_vmap.kernels import interpreting
from fractal_vmap.kernels.common import lerp, lerp_weights, store

BLOCK = 1024  # elements per program: 4 KB of each float32 stream, a usual size for a bandwidth-bound kernel
INTERPRET_BLOCK = 128  # the interpreter runs a program per Python call: small blocks keep tests' edge cases cheap


@triton.jit
def adamw_kernel(
    p_ptr, g_ptr, m_ptr, v_ptr, scalars_ptr, active_ptr, n, L, w1, w1_minus_1, beta2, w2, eps, BLOCK: tl.constexpr
):
    """Program (i, lane) updates elements [i * BLOCK, (i + 1) * BLOCK) of one lane's slice of n elements.
    scalars_ptr: float32 [3, L] = (1 - lr * wd, -lr / bias_correction1, sqrt(bias_correction2));
    w1 = 1 - beta1 and w2 = 1 - beta2, computed in float64 on the host and rounded to float32, as torch does;
    w1_minus_1: see common.lerp_weights."""
    lane = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < tl.where(tl.load(active_ptr + lane) != 0, n, 0)  # an inactive lane: no element at all
    idx = lane.to(tl.int64) * n + offs  # int64: L * n may pass 2**31
    decay = tl.load(scalars_ptr + lane)
    neg_step = tl.load(scalars_ptr + L + lane)
    bc2_sqrt = tl.load(scalars_ptr + 2 * L + lane)
    p = tl.load(p_ptr + idx, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + idx, mask=mask).to(tl.float32)
    m = tl.load(m_ptr + idx, mask=mask).to(tl.float32)
    v = tl.load(v_ptr + idx, mask=mask).to(tl.float32)
    # op by op as torch's CPU kernels round them: lerp (see common.py); v * beta2, then addcmul(g, g, value=w2),
    # which torch computes as one fma of (w2 * g) * g onto it (measured: bit-equal)
    m = lerp(m, g, w1, w1_minus_1)
    v = tl.fma(w2 * g, g, v * beta2)
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p * decay + tl.div_rn(m * neg_step, denom)
    store(p_ptr + idx, p, mask)
    store(m_ptr + idx, m, mask)
    store(v_ptr + idx, v, mask)


def adamw_step(p, g, exp_avg, exp_avg_sq, scalars, active, beta1: float, beta2: float, eps: float) -> None:
    """In place: one AdamW step of p [L, ...] (contiguous, like g and both moments) for the lanes where active [L]."""
    assert p.is_contiguous() and g.is_contiguous() and exp_avg.is_contiguous() and exp_avg_sq.is_contiguous()
    L, n = p.shape[0], p[0].numel()
    block = INTERPRET_BLOCK if interpreting() else BLOCK
    grid = (triton.cdiv(n, block), L)
    # enable_fp_fusion=False: no mul+add contracted into fma on the GPU, so it rounds exactly as the interpreter
    adamw_kernel[grid](
        p,
        g,
        exp_avg,
        exp_avg_sq,
        scalars,
        active.view(torch.uint8),
        n,
        L,
        *lerp_weights(1 - beta1),
        beta2,
        1 - beta2,
        eps,
        BLOCK=block,
        num_warps=4,
        enable_fp_fusion=False,
    )
