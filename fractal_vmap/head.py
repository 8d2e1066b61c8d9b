"""The lm_head, softcap and cross-entropy: one function for a single model, and the stacked lanes' version.

For L stacked lanes, running the head under vmap materializes the logits of all lanes at once, [L, N, vocab] floats,
and autograd keeps several tensors of that size. On CPU a few lanes' worth falls out of cache, and every elementwise
pass over them (softcap, log_softmax and their backwards) ran 3x slower per lane than over one lane's logits. On a GPU
they do not fit at all for a real vocab (16 lanes of d20 at 8 x 1024 tokens, vocab 65536: 34 GB per tensor).

So the lanes' loss is computed lane by lane. The loss is the end of the graph, so each lane's gradients with respect
to its x and w are computed right away by the very `head_loss` a single model runs, and its logits are freed before
the next lane. Backward then only scales them by each lane's incoming gradient. The numbers are bit-equal to
`finetune`'s, since they come from the same ops on the same shapes.

`kernels="triton"` computes the same for all lanes at once, chunked over tokens, with no per-lane launch
(fractal_vmap/kernels/head.py); the lane-by-lane loop here is its reference.
"""

import torch
import torch.nn.functional as F

from fractal_vmap.kernels import check_triton

SOFTCAP = 15.0  # logits = 15 * tanh(logits / 15), nanochat's softcap


def softcapped_logits(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """float32 logits x @ w.T, softcapped."""
    logits = F.linear(x, w).float()
    return SOFTCAP * torch.tanh(logits / SOFTCAP)


def head_loss(x: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the softcapped logits against targets (-1 = not supervised)."""
    logits = softcapped_logits(x, w)
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1, reduction=reduction)


class _LanesHeadLoss(torch.autograd.Function):
    """x [L, N, C], w [L, V, C] (or [V, C], frozen, with kernels="triton"), targets [L, N] -> (mean loss per lane [L],
    dx, dw); dx or dw is None when x or w needs no gradient."""

    @staticmethod
    def forward(x, w, targets, kernels):
        need = (x.requires_grad, w.requires_grad)
        if kernels == "triton":
            check_triton(x.device)
            from fractal_vmap.kernels.ops import lanes_head  # the kernel as a custom op (ops.py: traceable)

            device = x.device.type  # under autocast the logits are computed in its dtype, as F.linear would
            dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
            losses, dx, dw = lanes_head(x.detach(), w.detach(), targets, need[0], need[1], dtype)
            return losses, dx if need[0] else None, dw if need[1] else None
        losses, dx, dw = [], [], []
        device = x.device.type
        # autocast keeps the low-precision copy of every leaf that needs grad until the forward ends, and each lane's
        # xi, wi is one: without its cache, a lane's copies go with the lane (at d20: 0.18 GB a lane). Same numbers.
        dtype, enabled = torch.get_autocast_dtype(device), torch.is_autocast_enabled(device)
        for xi, wi, ti in zip(x, w, targets):
            xi, wi = xi.detach().requires_grad_(need[0]), wi.detach().requires_grad_(need[1])
            with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled, cache_enabled=False):
                loss = head_loss(xi, wi, ti)
            if any(need):
                with torch.autocast(x.device.type, enabled=False):  # finetune's backward runs outside autocast too
                    grads = iter(torch.autograd.grad(loss, [t for t, n in zip((xi, wi), need) if n]))
                if need[0]:
                    dx.append(next(grads))
                if need[1]:
                    dw.append(next(grads))
            losses.append(loss.detach())
        return torch.stack(losses), torch.stack(dx) if dx else None, torch.stack(dw) if dw else None

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, dx, dw = output
        ctx.save_for_backward(dx, dw)
        ctx.mark_non_differentiable(*(t for t in (dx, dw) if t is not None))

    @staticmethod
    def backward(ctx, grad_losses, _grad_dx, _grad_dw):
        dx, dw = ctx.saved_tensors
        return (*scaled_by_lane(grad_losses, dx, dw), None, None)

    @staticmethod
    def vmap(info, in_dims, x, w, targets, kernels):
        L = info.batch_size
        # the Triton path takes a frozen w shared by the lanes as it is, [V, C]: one matmul for all lanes' rows
        keep_w = kernels == "triton" and in_dims[1] is None and not w.requires_grad
        x, targets = lanes_first(L, in_dims, x, targets)
        w = w if keep_w else w.expand(L, *w.shape) if in_dims[1] is None else w.movedim(in_dims[1], 0)
        losses, dx, dw = _LanesHeadLoss.apply(x, w, targets, kernels)
        return (losses, dx, dw), (0, None if dx is None else 0, None if dw is None else 0)


def scaled_by_lane(grad_losses: torch.Tensor, dx: torch.Tensor | None, dw: torch.Tensor | None):
    """The head's backward: each lane's saved gradients times its incoming gradient (1 for a summed loss)."""
    scale = grad_losses[:, None, None]
    return (None if dx is None else dx * scale.to(dx.dtype), None if dw is None else dw * scale.to(dw.dtype))


def lanes_first(L: int, in_dims, x: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A vmap rule's x and targets with the lane dim first ([L, N, C], [L, N]): moved there, or expanded when shared."""
    return tuple(
        t.expand(L, *t.shape) if d is None else t.movedim(d, 0) for t, d in zip((x, targets), (in_dims[0], in_dims[2]))
    )


def lanes_head_loss(x: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, kernels: str = "torch") -> torch.Tensor:
    """`head_loss` (mean) of each lane: x [L, N, C], w [L, V, C], targets [L, N] -> [L]; under vmap, one lane's
    x [N, C], w [V, C], targets [N] -> a scalar. kernels: "torch" (lane by lane, bit-equal to head_loss) or "triton"
    (all lanes at once, chunked; check it with fractal_vmap.kernels.resolve before the run)."""
    return _LanesHeadLoss.apply(x, w, targets, kernels)[0]
