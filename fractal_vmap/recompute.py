"""Activation checkpointing that works for stacked lanes: `recomputed(fn, *args)` returns fn(*args) but keeps only
the inputs for the backward, which runs fn again (under the autocast state of the forward) and differentiates that.

Why not torch.utils.checkpoint: under torch.func.vmap its recomputation runs in the backward, outside the vmap that
made the forward, and fails. Here an autograd.Function's vmap rule moves the lane dim out instead: it vmaps fn over
the lanes itself and checkpoints that, one call for all lanes (as model.py's attention folds the lanes into its batch).

The recomputation runs the same ops on the same inputs, so on CPU (deterministic kernels) the values, and with them
the gradients, are bit-identical to the plain forward's: tests/test_memory.py checks it.
"""

from collections.abc import Callable

import torch
from torch.func import vmap


class _Recomputed(torch.autograd.Function):
    @staticmethod
    def forward(fn, *args):
        return fn(*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        fn, *args = inputs
        device = next(a.device.type for a in args if isinstance(a, torch.Tensor))
        # the backward runs outside the forward's autocast: note it, to recompute under the same one
        enabled = torch.is_autocast_enabled(device)
        ctx.fn, ctx.autocast = fn, (device, torch.get_autocast_dtype(device) if enabled else torch.float32, enabled)
        ctx.save_for_backward(*args)

    @staticmethod
    def backward(ctx, grad):
        args = [a.detach().requires_grad_(a.requires_grad) for a in ctx.saved_tensors]
        device, dtype, enabled = ctx.autocast
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
            out = ctx.fn(*args)
        wanted = [a for a in args if a.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad))
        return (None, *(next(grads) if a.requires_grad else None for a in args))

    @staticmethod
    def vmap(info, in_dims, fn, *args):
        lanes = vmap(fn, in_dims=tuple(in_dims[1:]), randomness="error")
        return _Recomputed.apply(lanes, *args), 0


def recomputed(fn: Callable[..., torch.Tensor], *args: torch.Tensor) -> torch.Tensor:
    """fn(*args) (tensors in, one tensor out), its activations recomputed in the backward instead of kept."""
    return _Recomputed.apply(fn, *args)
