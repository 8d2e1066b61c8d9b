"""The lanes' lm_head + softcap + cross-entropy (head.py) against a float64 reference and the single-model head_loss;
then its Triton kernel (kernels/head.py, run in Triton's CPU interpreter: conftest.py sets TRITON_INTERPRET=1)
against the same references."""

import gc
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch.func import vmap

from fractal_vmap.head import SOFTCAP, head_loss, lanes_head_loss

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


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


# ---------------------------------------------------------------- the Triton kernel (kernels/head.py)


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bfloat16 numbers at |x| (8 significant bits), as float64."""
    return 2.0 ** (torch.frexp(x.abs().float())[1].double() - 8)


@pytest.fixture
def small_chunks(monkeypatch):
    """16-token chunks at vocab 301 in float32 (50 tokens: 3 full chunks and a partial one)."""
    from fractal_vmap.kernels import head

    monkeypatch.setattr(head, "CHUNK_BYTES", 16 * 301 * 4)


def triton_head(x, w, targets, in_dims=(0, 0, 0)):
    return vmap(lambda a, b, c: lanes_head_loss(a, b, c, kernels="triton"), in_dims=in_dims)(x, w, targets)


@needs_triton
@pytest.mark.parametrize("L", [1, 3, 8])
def test_head_kernel_matches_float64(L, small_chunks):
    """As model.forward runs it: vmapped over the lanes, per-lane x and w, each lane with its own incoming gradient."""
    gen = torch.Generator().manual_seed(90 + L)
    x, w, targets = random_head(gen, L, V=301)
    x, w = x.requires_grad_(), w.requires_grad_()
    losses = triton_head(x, w, targets)
    grad_losses = torch.rand(L, generator=gen) + 0.5
    dx, dw = torch.autograd.grad(losses, (x, w), grad_losses)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    expected = torch.stack([reference_loss(x64[i], w64[i], targets[i]) for i in range(L)])
    dx64, dw64 = torch.autograd.grad(expected, (x64, w64), grad_losses.double())
    # float32 logits of O(10) through tanh and an online logsumexp over 301 classes: measured max error 2.5e-6
    torch.testing.assert_close(losses.double(), expected, rtol=0, atol=1e-5)
    # gradients are O(0.1); float32 error of each term ~1e-7 relative, summed over <= 50 tokens: measured max 9e-8
    torch.testing.assert_close(dx.double(), dx64, rtol=0, atol=5e-7)
    torch.testing.assert_close(dw.double(), dw64, rtol=0, atol=5e-7)


@needs_triton
def test_head_kernel_with_shared_inputs_matches_torch(small_chunks):
    """A frozen lm_head shared by the lanes (one matmul over every lane's rows, no dw), and an x shared by the lanes
    (only the lm_head stacked)."""
    gen = torch.Generator().manual_seed(95)
    x, w, targets = random_head(gen, 3, V=301)
    for in_dims, args in [
        ((0, None, 0), (x.clone().requires_grad_(), w[0].clone(), targets)),
        ((None, 0, None), (x[0].clone().requires_grad_(), w.clone().requires_grad_(), targets[0])),
    ]:
        grads_of = [a for a in args[:2] if a.requires_grad]
        got = torch.autograd.grad(triton_head(*args, in_dims=in_dims).sum(), grads_of)
        want_losses = vmap(lanes_head_loss, in_dims=in_dims)(*args)
        want = torch.autograd.grad(want_losses.sum(), grads_of)
        torch.testing.assert_close(triton_head(*args, in_dims=in_dims), want_losses, rtol=0, atol=1e-5)  # as above
        for g, h in zip(got, want):
            torch.testing.assert_close(g, h, rtol=0, atol=5e-7)  # as above: both are within ~1e-7 of float64


@needs_triton
@pytest.mark.parametrize("L", [1, 3])
def test_head_kernel_under_bfloat16_autocast_matches_torch(L, small_chunks):
    """Under autocast the logits are bf16 (as F.linear makes them) and the kernel's softmax is float32 on them."""
    gen = torch.Generator().manual_seed(96 + L)
    x, w, targets = random_head(gen, L, V=301)
    results = []
    for kernels in ("torch", "triton"):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses = vmap(lambda a, b, c: lanes_head_loss(a, b, c, kernels=kernels))(xx, ww, targets)
        results.append((losses, *torch.autograd.grad(losses.sum(), (xx, ww))))
    (want, want_dx, want_dw), (got, dx, dw) = results
    assert dx.dtype == dw.dtype == torch.float32
    # the same bf16 logits on both sides, float32 from there: measured max 3.8e-6
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # torch rounds the logits' gradient to bf16 (both do) and then dx, dw themselves to bf16 (autocast's backward);
    # the kernel accumulates those in float32: one bf16 ulp of the largest entry (measured: half of it)
    for g, h in ((dx, want_dx), (dw, want_dw)):
        torch.testing.assert_close(g, h, rtol=0, atol=bf16_ulp(h.abs().max()).item())


@needs_triton
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy meets the NaN
def test_head_kernel_nan_lane_leaves_the_others_bit_equal(small_chunks):
    gen = torch.Generator().manual_seed(97)
    x, w, targets = random_head(gen, 3, V=301)

    def run_head(x, w):
        x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
        losses = triton_head(x, w, targets)
        return (losses.detach(), *torch.autograd.grad(torch.where(torch.isfinite(losses), losses, 0).sum(), (x, w)))

    clean = run_head(x, w)
    for poison in ("x", "w"):
        bad_x, bad_w = x.clone(), w.clone()
        (bad_x[1, 4, 2] if poison == "x" else bad_w[1, 7, 3]).fill_(float("nan"))
        losses, dx, dw = run_head(bad_x, bad_w)
        assert torch.isnan(losses[1])  # the engine drops a lane on a non-finite loss
        for a, b in zip((losses, dx, dw), clean):
            assert torch.equal(a[[0, 2]], b[[0, 2]])


def peak_temporary_bytes(fn) -> int:
    """Bytes of CPU tensors that `fn` allocates and frees again, at their peak: the profiler's allocation record,
    live bytes summed in time order, minus what is still live at the end (the outputs)."""
    from torch.profiler import ProfilerActivity, profile

    gc.collect()  # earlier tests' garbage freed now, not inside the record (its frees would count as ours: seen, 1 MB)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        gc.collect()  # the interpreter leaves reference cycles: free what they hold inside the record
    del out
    changes = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in changes:
        live += nbytes
        peak = max(peak, live)
    return peak - live


@needs_triton
def test_head_kernel_peak_memory_does_not_grow_with_tokens():
    """Temporaries: the [L, chunk, V] logits buffer and O(L x chunk) more, at 64 tokens as at 512. The lane-by-lane
    reference holds one lane's [N, V] logits and their gradients, so its temporaries grow 8x: the record sees them."""
    from fractal_vmap.kernels.head import lanes_head

    L, C, V, chunk = 3, 16, 301, 32
    buffer = L * chunk * V * 4
    temporaries, reference = {}, {}
    for N in (64, 512):
        x, w, targets = random_head(torch.Generator().manual_seed(98), L, N, C, V)
        temporaries[N] = peak_temporary_bytes(lambda: lanes_head(x, w, targets, True, True, chunk=chunk))
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        reference[N] = peak_temporary_bytes(lambda: lanes_head_loss(xg, wg, targets))
    # measured: 122,916 bytes for both (the buffer 115,584, then the dx chunk, row losses and target chunk)
    assert temporaries[512] == temporaries[64]
    assert buffer <= temporaries[64] <= 1.1 * buffer
    assert reference[512] > 6 * reference[64] > 6 * buffer  # measured 2.41 MB against 285 KB
