"""Symmetric products for Newton-Schulz: out = beta * C + alpha * Y @ Y^T for a batch of matrices, computing only the
tiles on and above the diagonal and mirroring them below: half the matmul work of torch.bmm.
Reference: the two products in optim.newton_schulz_iterations (A = X @ X^T, B = b A + c A @ A, A symmetric).

Off by default (BatchedMuon(gram="torch")): a tuned cuBLAS bmm may beat a Triton tile loop doing half the work;
benchmarks/kernels.py measures the two on a GPU. bfloat16 in and out, float32 accumulation.
"""

import torch
import triton
import triton.language as tl

from fractal_vmap.kernels import interpreting
from fractal_vmap.kernels.common import store

BM, BK = 128, 64  # output tile BM x BM, reduction step BK: a usual bf16 tensor-core tiling (not tuned: no GPU yet)
INTERPRET_BM, INTERPRET_BK = 16, 16  # small enough that tests' matrices span several tiles


@triton.jit
def gram_kernel(
    y_ptr,
    c_ptr,
    out_ptr,
    pairs_ptr,
    n_pairs,
    R,
    K,
    sy_n,
    sy_r,
    sy_k,
    sc_n,
    sc_r,
    sc_c,
    alpha,
    beta,
    HAS_C: tl.constexpr,
    UPCAST: tl.constexpr,
    BM: tl.constexpr,
    BK: tl.constexpr,
):
    """Program (t, b): tile pair t = (i, j), i <= j, of matrix b; out is contiguous [N, R, R]."""
    t, b = tl.program_id(0), tl.program_id(1)
    ti, tj = tl.load(pairs_ptr + t), tl.load(pairs_ptr + n_pairs + t)
    rm = ti * BM + tl.arange(0, BM)
    rn = tj * BM + tl.arange(0, BM)
    y = y_ptr + b.to(tl.int64) * sy_n
    acc = tl.zeros([BM, BM], dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        a = tl.load(y + rm[:, None] * sy_r + rk[None, :] * sy_k, mask=(rm[:, None] < R) & (rk[None, :] < K), other=0.0)
        bt = tl.load(y + rn[None, :] * sy_r + rk[:, None] * sy_k, mask=(rn[None, :] < R) & (rk[:, None] < K), other=0.0)
        if UPCAST:  # the interpreter's bf16 tl.dot is wrong; bf16 products are exact in float32 anyway
            a, bt = a.to(tl.float32), bt.to(tl.float32)
        acc = tl.dot(a, bt, acc)
    acc = acc * alpha
    if HAS_C:
        c = tl.load(
            c_ptr + b.to(tl.int64) * sc_n + rm[:, None] * sc_r + rn[None, :] * sc_c,
            mask=(rm[:, None] < R) & (rn[None, :] < R),
            other=0.0,
        )
        acc = acc + beta * c.to(tl.float32)
    out = out_ptr + b.to(tl.int64) * R * R
    store(out + rm[:, None] * R + rn[None, :], acc, (rm[:, None] < R) & (rn[None, :] < R))
    # the mirror below the diagonal; a diagonal tile is stored once
    limit = tl.where(ti != tj, R, 0)
    store(out + rn[None, :] * R + rm[:, None], acc, (rm[:, None] < R) & (rn[None, :] < limit))


_pairs: dict[tuple[int, torch.device], torch.Tensor] = {}


def symmetric_gram(
    Y: torch.Tensor, C: torch.Tensor | None = None, alpha: float = 1.0, beta: float = 0.0
) -> torch.Tensor:
    """beta * C + alpha * Y @ Y^T for Y [N, R, K] bfloat16 (any strides) and C [N, R, R] -> [N, R, R] bfloat16."""
    assert Y.dtype == torch.bfloat16 and Y.ndim == 3
    N, R, K = Y.shape
    bm, bk = (INTERPRET_BM, INTERPRET_BK) if interpreting() else (BM, BK)
    tiles = triton.cdiv(R, bm)
    key = (tiles, Y.device)
    if key not in _pairs:  # the (i, j) tile pairs with i <= j, built once per size
        _pairs[key] = torch.triu_indices(tiles, tiles, device=Y.device).to(torch.int32).contiguous()
    pairs = _pairs[key]
    out = torch.empty(N, R, R, dtype=torch.bfloat16, device=Y.device)
    c_strides = C.stride() if C is not None else (0, 0, 0)
    gram_kernel[(pairs.shape[1], N)](
        Y,
        C if C is not None else out,
        out,
        pairs,
        pairs.shape[1],
        R,
        K,
        *Y.stride(),
        *c_strides,
        alpha,
        beta,
        HAS_C=C is not None,
        UPCAST=interpreting(),
        BM=bm,
        BK=bk,
        num_warps=8,
        num_stages=3,
        enable_fp_fusion=True,
    )
    return out
