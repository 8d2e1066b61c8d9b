"""The lanes' attention on CUDA: the fused kernel SDPA picks (flash, memory-efficient), called with its saved output
and logsumexp in the backward, never recomputed.

On CPU (always run): the dispatch, traced on fake CUDA tensors (torch's FakeTensorMode needs no GPU; the kernels'
meta functions give the shapes). SDPA's own choice cannot be asked without a GPU, so it is set here to what SDPA
answers on an H100 (flash for bfloat16, memory-efficient for float32). On a GPU (skipped without one): the CPU
path's tests, mirrored.
"""

import types

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.func import vmap
from torch.utils._python_dispatch import TorchDispatchMode

from fractal_vmap import model
from fractal_vmap.model import lanes_attention

aten = torch.ops.aten
FORWARDS = {aten._scaled_dot_product_flash_attention.default, aten._scaled_dot_product_efficient_attention.default}
BACKWARDS = {
    aten._scaled_dot_product_flash_attention_backward.default,
    aten._scaled_dot_product_efficient_attention_backward.default,
}
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class RecordOps(TorchDispatchMode):
    """Every aten op called inside, with the shapes of its tensor arguments."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((func, [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]))
        return func(*args, **(kwargs or {}))

    def of(self, ops: set) -> list[tuple]:
        return [(f, shapes) for f, shapes in self.calls if f in ops]


def sdpa_choice_on_h100(q, k, v) -> int:
    """What SDPA picks on an H100 for causal attention without a mask: flash for half types, else memory-efficient
    (which takes no grouped heads: then math)."""
    if q.dtype in (torch.bfloat16, torch.float16):
        return model.FLASH
    return model.EFFICIENT if k.shape[-3] == q.shape[-3] else model.MATH


def fake_ctx() -> types.SimpleNamespace:
    """A stand-in for autograd's ctx: autograd's engine cannot run a backward on fake CUDA tensors without a GPU, so the
    Function's own setup_context and backward are called directly."""
    ctx = types.SimpleNamespace(mark_non_differentiable=lambda *t: None)
    ctx.save_for_backward = lambda *t: setattr(ctx, "saved_tensors", t)
    return ctx


@pytest.mark.parametrize("dtype, kv_heads, kernel", [(torch.bfloat16, 2, "flash"), (torch.float32, 4, "efficient")])
def test_cuda_dispatch_calls_the_fused_kernel_and_its_backward(monkeypatch, dtype, kv_heads, kernel):
    """Under vmap, one call of SDPA's fused kernel for all lanes (lanes folded into the batch, GQA k, v with their own
    head count); the backward is that kernel's backward on the saved output and logsumexp, with no forward call."""
    monkeypatch.setattr(model, "attention_backend", sdpa_choice_on_h100)
    L, B, H, T, D = 3, 2, 4, 16, 64
    with FakeTensorMode():
        q = torch.empty(L, B, H, T, D, device="cuda", dtype=dtype)
        k, v = (torch.empty(L, B, kv_heads, T, D, device="cuda", dtype=dtype) for _ in range(2))
        with RecordOps() as forward_ops:
            out = vmap(lanes_attention)(q, k, v)
        assert out.shape == (L, B, H, T, D) and out.device.type == "cuda"
        [(op, shapes)] = forward_ops.of(FORWARDS)
        assert kernel in str(op)
        assert shapes[:3] == [(L * B, H, T, D), (L * B, kv_heads, T, D), (L * B, kv_heads, T, D)]

        folded = [t.flatten(0, 1) for t in (q, k, v)]
        ctx = fake_ctx()
        with RecordOps() as backward_ops:
            output = model._LanesAttention.forward(*folded)
            model._LanesAttention.setup_context(ctx, folded, output)
            n_forward = len(backward_ops.of(FORWARDS))
            grads = model._LanesAttention.backward(ctx, torch.empty_like(output[0]), None, None, None)
    assert ctx.backend == sdpa_choice_on_h100(*folded)
    assert len(backward_ops.of(FORWARDS)) == n_forward == 1  # nothing recomputed in the backward
    [(op, shapes)] = backward_ops.of(BACKWARDS)
    assert kernel in str(op)
    assert [g.shape for g in grads] == [t.shape for t in folded]


def test_cuda_attention_recomputes_only_where_sdpa_picks_no_fused_kernel(monkeypatch):
    """float32 with grouped heads: SDPA picks math (the memory-efficient kernel takes no GQA), so the Function runs
    SDPA and keeps no logsumexp."""
    monkeypatch.setattr(model, "attention_backend", sdpa_choice_on_h100)
    with FakeTensorMode():
        q = torch.empty(2, 4, 16, 64, device="cuda")
        k, v = (torch.empty(2, 2, 16, 64, device="cuda") for _ in range(2))
        with RecordOps() as ops:
            out, logsumexp, _, _ = model._LanesAttention.forward(q, k, v)
    assert not ops.of(FORWARDS) and out.shape == q.shape and logsumexp.numel() == 0


# ---------------------------------------------------------------- on a GPU: the CPU tests, mirrored


def random_qkv(L: int, kv_heads: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    shape = (L, 2, 4, 64, 64)  # lanes, batch, heads, tokens, head_dim
    kv_shape = (L, 2, kv_heads, 64, 64)
    return [
        torch.randn(s, generator=gen, device="cuda", dtype=dtype).requires_grad_() for s in (shape, kv_shape, kv_shape)
    ]


@cuda
@pytest.mark.parametrize("dtype, kv_heads", [(torch.bfloat16, 2), (torch.bfloat16, 4), (torch.float32, 4)])
def test_cuda_lane_attention_equals_sdpa_lane_by_lane(dtype, kv_heads):
    """Each lane gets SDPA's output exactly (the same kernel on the same rows, per (sequence, head) independent of the
    batch) and SDPA's gradients within the kernels' own run-to-run noise: FA2's backward sums dq with atomic adds in
    no fixed order, so 2 ulps of the dtype (bfloat16: rtol 1.6e-2; float32: 1e-5). Not yet measured on a GPU."""
    qs, ks, vs = random_qkv(3, kv_heads, dtype, seed=16)
    out = vmap(lanes_attention)(qs, ks, vs)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (qs, ks, vs), grad_out)
    rtol = 1.6e-2 if dtype == torch.bfloat16 else 1e-5
    for lane in range(3):
        q, k, v = (t[lane].detach().requires_grad_() for t in (qs, ks, vs))
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv_heads != 4)
        ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out[lane])
        assert torch.equal(out[lane], ref)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g[lane], r, rtol=rtol, atol=rtol * r.abs().max().item())


@cuda
@pytest.mark.parametrize("dtype, kv_heads", [(torch.bfloat16, 2), (torch.float32, 4)])
def test_cuda_one_fused_call_each_way_for_all_lanes(dtype, kv_heads):
    """The profiler sees one fused forward of batch L * B and one fused backward, and no forward in the backward."""
    L = 4
    qs, ks, vs = random_qkv(L, kv_heads, dtype, seed=4)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        out = vmap(lanes_attention)(qs, ks, vs)
        out.sum().backward()
    names = [e.name for e in prof.events()]
    forwards = [e.input_shapes[0][0] for e in prof.events() if e.name in {str(op.name()) for op in FORWARDS}]
    assert forwards == [L * 2], names
    assert sum(e.name in {str(op.name()) for op in BACKWARDS} for e in prof.events()) == 1, names
    assert not any("attention_math" in n for n in names)
