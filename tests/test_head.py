"""The lanes' lm_head + softcap + cross-entropy (head.py) against a float64 reference and the single-model head_loss."""

import torch
import torch.nn.functional as F
from torch.func import vmap

from fractal_vmap.head import SOFTCAP, head_loss, lanes_head_loss


def reference_loss(x: torch.Tensor, w: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Written out here: the matmul, the softcap, the mean cross-entropy over targets != -1 (float64 stays float64)."""
    logits = F.linear(x, w).to(torch.promote_types(x.dtype, torch.float32))
    logits = SOFTCAP * torch.tanh(logits / SOFTCAP)
    return F.cross_entropy(logits, targets, ignore_index=-1)


def random_head(gen: torch.Generator, L: int = 3, N: int = 50, C: int = 16, V: int = 37):
    x = torch.randn(L, N, C, generator=gen)
    w = 2 * torch.randn(L, V, C, generator=gen)  # logits of O(10): the softcap's tanh is far from linear
    targets = torch.randint(0, V, (L, N), generator=gen)
    targets[torch.rand(L, N, generator=gen) < 0.3] = -1  # ~30% unsupervised, as SFT batches
    return x, w, targets


def test_losses_and_gradients_match_float64():
    gen = torch.Generator().manual_seed(0)
    x, w, targets = random_head(gen)
    x, w = x.requires_grad_(), w.requires_grad_()
    losses = lanes_head_loss(x, w, targets)
    grad_losses = torch.rand(3, generator=gen) + 0.5  # a different incoming gradient per lane
    dx, dw = torch.autograd.grad(losses, (x, w), grad_losses)

    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    expected = torch.stack([reference_loss(x64[i], w64[i], targets[i]) for i in range(3)])
    dx64, dw64 = torch.autograd.grad(expected, (x64, w64), grad_losses.double())
    # float32 logits of O(10) through tanh and log_softmax over 37 classes: per-token error ~1e-6, means of ~35 tokens
    torch.testing.assert_close(losses.double(), expected, rtol=0, atol=1e-5)
    # gradients are O(1/N) per token; float32 error of each term ~1e-7 relative, summed over <= 50 tokens
    torch.testing.assert_close(dx.double(), dx64, rtol=0, atol=1e-6)
    torch.testing.assert_close(dw.double(), dw64, rtol=0, atol=1e-6)


def assert_lanes_equal_head_loss(losses, dx, dw, x, w, targets):
    """Every lane's loss and gradients are bit-equal to head_loss run on that lane alone (same ops, same shapes)."""
    for i in range(len(losses)):
        xi, wi = x[i].detach().requires_grad_(), w[i].detach().requires_grad_(dw is not None)
        expected = head_loss(xi, wi, targets[i])
        grads = torch.autograd.grad(expected, (xi, wi) if dw is not None else (xi,))
        assert torch.equal(losses[i], expected.detach())
        assert torch.equal(dx[i], grads[0])
        if dw is not None:
            assert torch.equal(dw[i], grads[1])


def test_under_vmap_equals_head_loss_lane_by_lane():
    """As model.forward uses it: vmapped, per-lane x and w, shared targets; then a frozen w shared by every lane."""
    gen = torch.Generator().manual_seed(1)
    x, w, targets = random_head(gen)
    x, w = x.requires_grad_(), w.requires_grad_()
    losses = vmap(lanes_head_loss, in_dims=(0, 0, None))(x, w, targets[0])
    dx, dw = torch.autograd.grad(losses.sum(), (x, w))
    assert_lanes_equal_head_loss(losses, dx, dw, x, w, targets[0].expand(3, -1))

    frozen = w[0].detach()  # needs no gradient: none is computed
    losses = vmap(lanes_head_loss, in_dims=(0, None, 0))(x, frozen, targets)
    (dx,) = torch.autograd.grad(losses.sum(), (x,))
    assert_lanes_equal_head_loss(losses, dx, None, x, frozen.expand(3, -1, -1), targets)
    assert torch.isfinite(losses).all() and (losses > 0).all()


def test_a_nan_lane_leaves_the_others_bit_equal():
    gen = torch.Generator().manual_seed(2)
    x, w, targets = random_head(gen)
    clean = torch.autograd.grad(lanes_head_loss(x.requires_grad_(), w, targets).sum(), x)[0]
    clean_losses = lanes_head_loss(x, w, targets)
    poisoned = x.detach().clone()
    poisoned[1, 4, 2] = float("nan")
    poisoned.requires_grad_()
    losses = lanes_head_loss(poisoned, w, targets)
    (dx,) = torch.autograd.grad(torch.where(torch.isfinite(losses), losses, 0).sum(), poisoned)
    assert torch.isnan(losses[1]) and torch.isnan(dx[1]).any()
    for i in (0, 2):
        assert torch.equal(losses[i], clean_losses[i]) and torch.equal(dx[i], clean[i])


def test_under_autocast_the_logits_are_bfloat16_as_in_finetune():
    gen = torch.Generator().manual_seed(3)
    x, w, targets = random_head(gen)
    x, w = x.requires_grad_(), w.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = lanes_head_loss(x, w, targets)
        expected = [head_loss(x[i], w[i], targets[i]) for i in range(3)]
    full = torch.stack([head_loss(x[i], w[i], targets[i]) for i in range(3)])  # float32 logits
    dx, dw = torch.autograd.grad(losses.sum(), (x, w))
    for i in range(3):  # finetune runs its forward under autocast and its backward outside it: so do the lanes
        assert torch.equal(losses[i], expected[i].detach())
        ex, ew = torch.autograd.grad(expected[i], (x, w))
        assert torch.equal(dx[i], ex[i]) and torch.equal(dw[i], ew[i])
    assert (full - losses).abs().max() > 1e-4  # bfloat16 logits moved the losses: autocast was on
