"""The lanes' lm_head + softcap + cross-entropy, forward and backward at once, chunked over tokens.
Reference: head.head_loss run lane by lane (head._LanesHeadLoss with kernels="torch").

Per chunk of tokens, for all lanes together:
  logits = x_chunk @ w^T           one batched matmul (one plain matmul when w is shared by the lanes), into a
                                   reused [L, chunk, V] buffer in the compute dtype;
  ce_kernel                        per row: softcap 15 tanh(z / 15), an online logsumexp over the vocab in blocks,
                                   the row's loss, then (second sweep) the gradient of the lane's mean loss with
                                   respect to z, written over the logits;
  dx_chunk = dz @ w, dw += dz^T @ x_chunk   float32 accumulation whatever the compute dtype.
So peak memory is the [L, chunk, V] buffer plus the outputs dx and dw: never [L, N, V]. Lanes never mix: a NaN in
one lane's x or w reaches only that lane's rows, losses and gradients.
"""

import torch
import triton
import triton.language as tl

from fractal_vmap.kernels import CHUNK_BYTES, chunk_tokens, interpreting  # noqa: F401 (CHUNK_BYTES: kept here too)
from fractal_vmap.kernels.common import store

SOFTCAP = 15.0  # head.SOFTCAP, passed to ce_kernel as a constexpr (tests/test_kernels.py: equal; head imports us)
BLOCK_N, BLOCK_V = 4, 2048  # rows x vocab columns per step of a program: 32 KB of float32 logits (not tuned)
INTERPRET_BLOCK_N, INTERPRET_BLOCK_V = 16, 64  # the interpreter pays per op: wide programs, several vocab blocks


@triton.jit
def softcap(z, cap):
    """(cap tanh(z / cap), tanh(z / cap)); tanh from one exp (Triton's interpreter has no tanh), odd."""
    u = z / cap
    e = tl.exp(-2.0 * tl.abs(u))
    t = (1.0 - e) / (1.0 + e)
    t = tl.where(u < 0, -t, t)
    return cap * t, t


@triton.jit
def ce_kernel(
    z_ptr, targets_ptr, loss_ptr, scale_ptr, rows, n, V, CAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr
):
    """Rows [pid * BLOCK_N, ...) of z [rows, V] (contiguous; row r belongs to lane r // n): loss_ptr[r] = the row's
    cross-entropy (0 if its target is -1), and z[r] <- d(lane's mean loss)/dz = (softmax - onehot) * scale[lane] *
    (1 - tanh^2), 0 on unsupervised rows."""
    r = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = r < rows
    target = tl.load(targets_ptr + r, mask=row_ok, other=-1)
    scale = tl.load(scale_ptr + r // n, mask=row_ok, other=0.0)
    base = z_ptr + r.to(tl.int64)[:, None] * V
    top = tl.full([BLOCK_N], float("-inf"), tl.float32)  # running max of the softcapped logits
    total = tl.zeros([BLOCK_N], dtype=tl.float32)  # running sum of exp(s - top)
    at_target = tl.zeros([BLOCK_N], dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = row_ok[:, None] & (cols[None, :] < V)
        s, _ = softcap(tl.load(base + cols[None, :], mask=mask, other=0.0).to(tl.float32), CAP)
        s = tl.where(cols[None, :] < V, s, float("-inf"))  # past the vocab: no weight; rows past the end stay finite
        new_top = tl.maximum(top, tl.max(s, axis=1))
        total = total * tl.exp(top - new_top) + tl.sum(tl.exp(s - new_top[:, None]), axis=1)
        top = new_top
        at_target += tl.sum(tl.where(cols[None, :] == target[:, None], s, 0.0), axis=1)
    lse = top + tl.log(total)
    supervised = target != -1
    tl.store(loss_ptr + r, tl.where(supervised, lse - at_target, 0.0), mask=row_ok)
    factor = tl.where(supervised, scale, 0.0)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = row_ok[:, None] & (cols[None, :] < V)
        s, t = softcap(tl.load(base + cols[None, :], mask=mask, other=0.0).to(tl.float32), CAP)
        grad = tl.exp(s - lse[:, None]) - tl.where(cols[None, :] == target[:, None], 1.0, 0.0)
        store(base + cols[None, :], grad * factor[:, None] * (1.0 - t * t), mask)


def _matmul32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b (batched or not) accumulated and returned in float32, for float32 or bfloat16 operands."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        return torch.bmm(a, b, out_dtype=torch.float32) if a.ndim == 3 else torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()  # CPU has no out_dtype: bf16 products are exact in float32, so this is the same sum


def _accumulate32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc [L, m, k] float32 += a @ b in place, accumulated in float32: no acc-sized temporary (dw is [L, V, C])."""
    if a.dtype == torch.float32:
        acc.baddbmm_(a, b)
    elif a.is_cuda:
        torch.baddbmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.baddbmm_(a.float(), b.float())


def lanes_head(
    x: torch.Tensor,
    w: torch.Tensor,
    targets: torch.Tensor,
    need_dx: bool,
    need_dw: bool,
    dtype: torch.dtype | None = None,
    chunk: int | None = None,
):
    """x [L, N, C], w [L, V, C] (per lane) or [V, C] (shared, no dw), targets [L, N] (-1 = unsupervised) ->
    (mean loss per lane [L] float32, dx [L, N, C] in x's dtype or None, dw [L, V, C] in w's dtype or None).
    dtype: the compute dtype of the logits matmul (bfloat16 under autocast; default x's dtype)."""
    L, N, C = x.shape
    shared = w.ndim == 2
    assert not (shared and need_dw), "a shared w is frozen: its dw would be the lanes' sum"
    V = w.shape[-2]
    dtype = dtype or x.dtype
    chunk = min(N, chunk or chunk_tokens(V, dtype))
    xq, wq = x.to(dtype), w.to(dtype)
    w32 = wq.float() if dtype != torch.float32 and not x.is_cuda and need_dx else None  # CPU: w's bf16 values, once
    n_supervised = (targets != -1).sum(1)
    scale = 1.0 / n_supervised.float()  # inf for a lane with no supervised token: its rows are all masked out
    logits_buf = torch.empty(L * chunk * V, dtype=dtype, device=x.device)
    row_loss = torch.empty(L * chunk, dtype=torch.float32, device=x.device)
    loss_sum = torch.zeros(L, dtype=torch.float32, device=x.device)
    dx = torch.empty(L, N, C, dtype=x.dtype, device=x.device) if need_dx else None
    dw = torch.zeros(L, V, C, dtype=torch.float32, device=x.device) if need_dw else None
    block_n, block_v = (INTERPRET_BLOCK_N, INTERPRET_BLOCK_V) if interpreting() else (BLOCK_N, BLOCK_V)
    for start in range(0, N, chunk):
        xc = xq[:, start : start + chunk]
        n = xc.shape[1]
        z = logits_buf[: L * n * V].view(L, n, V)
        # a shared w is expanded (stride 0), not folded into one matmul over all lanes' rows: a BLAS may round a row by
        # its position in a bigger matrix, and a lane's numbers must not depend on its neighbours (lanes.py)
        w_lanes = wq.expand(L, V, C) if shared else wq
        torch.bmm(xc, w_lanes.mT, out=z)
        grid = (triton.cdiv(L * n, block_n),)
        ce_kernel[grid](
            z,
            targets[:, start : start + n].contiguous(),
            row_loss,
            scale,
            L * n,
            n,
            V,
            CAP=SOFTCAP,
            BLOCK_N=block_n,
            BLOCK_V=block_v,
            num_warps=8,
            enable_fp_fusion=False,
        )
        loss_sum += row_loss[: L * n].view(L, n).sum(1)
        if need_dx:
            w_op = w32 if w32 is not None else wq
            dx[:, start : start + n] = _matmul32(z, w_op.expand(L, V, C) if shared else w_op)
        if need_dw:
            _accumulate32(dw, z.mT, xc)
    losses = loss_sum / n_supervised  # the mean over supervised tokens (0/0 = NaN, as torch's cross_entropy)
    return losses, dx, dw if dw is None else dw.to(w.dtype)
