"""The Triton kernels as torch custom ops (torch.library), each with a fake (meta) implementation.

Why: the CUDA path calls the fused AdamW step, the Muon passes around Newton-Schulz and the lanes' head through
these ops, so a step traced under FakeTensorMode (perf/roofline.py's runtime projection, tasks/nanochat/memory.py's
memory plan) sees the very ops CUDA runs, each as one op with its own shapes, where a plain Python call into Triton
would fail on fake tensors. The real implementations import the Triton modules only when they run; the fake ones
touch no data and give the outputs' shapes. (MemTracker sees an op's outputs, not what its implementation allocates
inside: the memory plan adds the head's [L, chunk, V] logits buffer itself, tasks/nanochat/memory.py.) Nothing here
imports triton.

What each op costs on a GPU (bytes and FLOPs) is counted in kernels/costs.py, beside benchmarks/kernels.py's tables.
"""

import torch
from torch import Tensor


@torch.library.custom_op("fractal_vmap::adamw_step", mutates_args=("p", "exp_avg", "exp_avg_sq"))
def adamw_step(
    p: Tensor,
    g: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    scalars: Tensor,
    active: Tensor,
    beta1: float,
    beta2: float,
    eps: float,
) -> None:
    """kernels/adamw.py's adamw_step: one launch, in place."""
    from fractal_vmap.kernels import adamw

    adamw.adamw_step(p, g, exp_avg, exp_avg_sq, scalars, active, beta1, beta2, eps)


@adamw_step.register_fake
def _(p, g, exp_avg, exp_avg_sq, scalars, active, beta1, beta2, eps) -> None:
    return None


@torch.library.custom_op("fractal_vmap::muon_momentum", mutates_args=("buf", "x"))
def muon_momentum(
    g: Tensor, buf: Tensor, x: Tensor, active: Tensor, momentum: float, nesterov: bool, eps: float
) -> None:
    """kernels/muon.py's momentum_normalize: two launches (momentum, normalize), in place."""
    from fractal_vmap.kernels import muon

    muon.momentum_normalize(g, buf, x, active, momentum, nesterov, eps)


@muon_momentum.register_fake
def _(g, buf, x, active, momentum, nesterov, eps) -> None:
    return None


@torch.library.custom_op("fractal_vmap::muon_update", mutates_args=("p",))
def muon_update(p: Tensor, o: Tensor, neg_lr: Tensor, active: Tensor) -> None:
    """kernels/muon.py's apply_update: one launch, in place."""
    from fractal_vmap.kernels import muon

    muon.apply_update(p, o, neg_lr, active)


@muon_update.register_fake
def _(p, o, neg_lr, active) -> None:
    return None


@torch.library.custom_op("fractal_vmap::triton_head", mutates_args=())
def lanes_head(
    x: Tensor, w: Tensor, targets: Tensor, need_dx: bool, need_dw: bool, dtype: torch.dtype | None
) -> tuple[Tensor, Tensor, Tensor]:
    """kernels/head.py's lanes_head: (mean loss per lane [L], dx, dw), an empty tensor for a gradient not needed."""
    from fractal_vmap.kernels import head

    with torch.autocast(x.device.type, enabled=False):
        losses, dx, dw = head.lanes_head(x, w, targets, need_dx, need_dw, dtype)
    return losses, x.new_empty(0) if dx is None else dx, w.new_empty(0) if dw is None else dw


@lanes_head.register_fake
def _(x, w, targets, need_dx, need_dw, dtype):
    return (
        x.new_empty(x.shape[0], dtype=torch.float32),
        torch.empty_like(x) if need_dx else x.new_empty(0),
        torch.empty_like(w) if need_dw else w.new_empty(0),
    )
