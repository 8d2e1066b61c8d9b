"""The functional nanochat GPT: parity with nanochat's own outputs, init, GQA, and vmap over stacked lanes."""

import math
import warnings
from functools import partial

import pytest
import torch
from torch.func import vmap

from conftest import FIXTURE
from fractal_vmap import model
from fractal_vmap.checkpoint import load_model
from fractal_vmap.head import head_loss, lanes_head_loss
from fractal_vmap.model import (
    GPTConfig,
    lanes_attention,
    forward,
    generate_greedy,
    init_params,
    param_group,
    param_shapes,
    rotary_cos_sin,
)

# Same op sequence as nanochat in float32 on CPU (measured bit-equal here); another BLAS build may
# reorder sums, which moves logits of magnitude <= 15 by a few float32 ulps (~1e-6), far below 1e-5.
LOGIT_ATOL = 1e-5


@pytest.fixture(scope="module")
def fixture_model():
    config, params, tokenizer = load_model(str(FIXTURE))
    return config, params, tokenizer


@pytest.fixture(scope="module")
def reference():
    return torch.load(FIXTURE / "reference.pt", weights_only=True)


# ---------------------------------------------------------------- parity with nanochat's reference.pt


def test_logits_match_nanochat(fixture_model, reference):
    config, params, _ = fixture_model
    logits = forward(params, reference["idx"], config, rotary_cos_sin(config))
    assert logits.dtype == torch.float32
    assert logits.shape == reference["logits"].shape == (4, 64, 289)
    torch.testing.assert_close(logits, reference["logits"], rtol=0, atol=LOGIT_ATOL)


def test_loss_and_per_token_loss_match_nanochat(fixture_model, reference):
    config, params, _ = fixture_model
    cos_sin = rotary_cos_sin(config)
    loss = forward(params, reference["idx"], config, cos_sin, reference["targets"])
    # a mean of ~177 float32 cross-entropies of size ~8: a reordered sum moves it by ~1e-6
    assert loss.item() == pytest.approx(7.850517749786377, abs=1e-5)
    torch.testing.assert_close(loss, reference["loss"], rtol=0, atol=1e-5)

    per_token = forward(
        params, reference["idx"], config, cos_sin, reference["targets"], head=partial(head_loss, reduction="none")
    )
    per_token = per_token.view(4, 64)
    # per-token losses are single log-softmax values of size <= ~15, same argument as LOGIT_ATOL
    torch.testing.assert_close(per_token, reference["loss_per_token"], rtol=0, atol=1e-5)
    ignored = reference["targets"] == -1
    assert ignored.any() and (per_token[ignored] == 0).all()


def test_rotary_cos_sin_are_nanochats_bf16_tables(fixture_model, reference):
    config, _, _ = fixture_model
    cos, sin = rotary_cos_sin(config)
    assert cos.dtype == sin.dtype == torch.bfloat16
    assert cos.shape == (1, config.sequence_len * 10, 1, config.head_dim // 2)
    assert torch.equal(cos[:, :64], reference["rotary_cos"])
    assert torch.equal(sin[:, :64], reference["rotary_sin"])


def test_greedy_generation_matches_nanochat(fixture_model, reference):
    config, params, _ = fixture_model
    prompt = reference["greedy_prompt"].tolist()
    assert generate_greedy(params, config, prompt, 16) == reference["greedy_tokens"].tolist()


def test_padded_vocab_rows_are_sliced_off(fixture_model, reference):
    """Vocab 289 pads to 320 rows; the 31 padding rows of lm_head never reach the logits."""
    config, params, _ = fixture_model
    assert config.vocab_size == 289 and config.padded_vocab_size == 320
    assert params["lm_head.weight"].shape == params["transformer.wte.weight"].shape == (320, 64)
    assert GPTConfig(vocab_size=320).padded_vocab_size == 320
    assert GPTConfig(vocab_size=321).padded_vocab_size == 384

    gen = torch.Generator().manual_seed(11)
    noisy = dict(params)
    lm_head = params["lm_head.weight"].clone()
    lm_head[289:] = 100 * torch.randn(31, 64, generator=gen)  # would dominate every softmax if not sliced
    noisy["lm_head.weight"] = lm_head
    cos_sin = rotary_cos_sin(config)
    logits = forward(noisy, reference["idx"], config, cos_sin)
    assert logits.shape[-1] == 289
    assert torch.equal(logits, forward(params, reference["idx"], config, cos_sin))


# ---------------------------------------------------------------- init


def test_init_names_and_shapes_are_nanochats(fixture_model):
    config, _, _ = fixture_model
    nanochat_state = torch.load(FIXTURE / "checkpoints" / "model_000000.pt", weights_only=True)
    params = init_params(config, seed=0)
    assert list(param_shapes(config)) == list(nanochat_state)  # same names, nanochat's order
    assert list(params) == list(nanochat_state)
    for name, tensor in nanochat_state.items():
        assert tuple(tensor.shape) == param_shapes(config)[name] == tuple(params[name].shape), name
    assert {param_group(n) for n in params} == {"matrix", "embedding", "unembedding"}


def test_init_statistics():
    """Zero c_proj/lm_head, wte std 1, Linear std 1/sqrt(fan_in)*min(1, sqrt(fan_out/fan_in))."""
    config = GPTConfig(sequence_len=64, vocab_size=1000, n_layer=2, n_head=4, n_kv_head=2, n_embd=256)
    params = init_params(config, seed=3)
    assert all(p.dtype == torch.float32 for p in params.values())
    for name, p in params.items():
        if name == "lm_head.weight" or name.endswith("c_proj.weight"):
            assert torch.count_nonzero(p) == 0, name
    wte = params["transformer.wte.weight"]
    # sample std of n >= 32768 normals has relative s.e. 1/sqrt(2n) <= 0.4%: 3% is > 7 sigma, yet far
    # below the 29% gap a missing min(1, sqrt(fan_out/fan_in)) factor would make for c_k/c_v
    assert wte.std().item() == pytest.approx(1.0, rel=0.03)
    assert abs(wte.mean().item()) < 0.01  # s.e. of the mean is 1/sqrt(1024*256) = 0.002
    expected_std = {
        "attn.c_q.weight": 1 / 16,  # (256, 256)
        "attn.c_k.weight": 1 / 16 * math.sqrt(0.5),  # (128, 256): fan_out < fan_in
        "attn.c_v.weight": 1 / 16 * math.sqrt(0.5),
        "mlp.c_fc.weight": 1 / 16,  # (1024, 256): min(1, 2) = 1
    }
    for i in range(config.n_layer):
        for suffix, std in expected_std.items():
            p = params[f"transformer.h.{i}.{suffix}"]
            assert p.std().item() == pytest.approx(std, rel=0.03), suffix

    assert all(torch.equal(a, b) for a, b in zip(params.values(), init_params(config, seed=3).values()))
    assert not torch.equal(params["transformer.wte.weight"], init_params(config, seed=4)["transformer.wte.weight"])


# ---------------------------------------------------------------- attention and GQA


def attention_reference(q, k, v):
    """Causal softmax(q k^T / sqrt(d)) v in float64, kv heads repeated for grouped queries."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    T = q.shape[2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    return scores.masked_fill(future, float("-inf")).softmax(-1) @ v


def random_qkv(gen, B=2, H=4, KV=2, T=10, D=16):
    return (
        torch.randn(B, H, T, D, generator=gen),
        torch.randn(B, KV, T, D, generator=gen),
        torch.randn(B, KV, T, D, generator=gen),
    )


def test_gqa_attention_matches_float64_reference():
    gen = torch.Generator().manual_seed(5)
    q, k, v = (t.requires_grad_() for t in random_qkv(gen))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = lanes_attention(q, k, v)
    expected = attention_reference(q64, k64, v64)
    # float32 softmax-weighted sums of O(1) values over <= 10 keys: error ~1e-7, 1e-5 leaves margin
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)

    # the backward (the flash kernel's, with the saved logsumexp) against float64 autograd
    grad_out = torch.randn(out.shape, generator=gen)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    expected_grads = torch.autograd.grad(expected, (q64, k64, v64), grad_out.double())
    for g, e in zip(grads, expected_grads):
        # gradients sum a few more O(1) float32 products than the forward; 1e-5 still ~100x the error
        torch.testing.assert_close(g.double(), e, rtol=0, atol=1e-5)


def test_vmapped_attention_folds_lanes_into_batch():
    """vmap over q only (k, v shared: the expand branch) and over all three, vs a loop over lanes."""
    gen = torch.Generator().manual_seed(6)
    qs = torch.randn(3, 2, 4, 10, 16, generator=gen)
    ks = torch.randn(3, 2, 2, 10, 16, generator=gen)
    vs = torch.randn(3, 2, 2, 10, 16, generator=gen)
    shared = vmap(lambda q: lanes_attention(q, ks[0], vs[0]))(qs)
    per_lane = vmap(lanes_attention)(qs, ks, vs)
    # in_dims=1: the lane dim is not in front
    moved = vmap(lanes_attention, in_dims=(1, 1, 1))(qs.movedim(0, 1), ks.movedim(0, 1), vs.movedim(0, 1))
    for lane in range(3):
        # same float32 kernel on the same numbers, only batched differently: ulp-level at most
        torch.testing.assert_close(shared[lane], lanes_attention(qs[lane], ks[0], vs[0]), rtol=0, atol=1e-6)
        torch.testing.assert_close(per_lane[lane], lanes_attention(qs[lane], ks[lane], vs[lane]), rtol=0, atol=1e-6)
    torch.testing.assert_close(moved, per_lane, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", ["fused", "recomputed"])
def test_lane_attention_equals_sdpa_lane_by_lane(backend, monkeypatch):
    """Both ways of the lanes' attention Function (the fused kernel with its saved logsumexp, and SDPA recomputed in
    the backward where SDPA picks no such kernel, forced here), under vmap, give each lane exactly plain SDPA's output
    and gradients: the same kernels on the same rows, and the flash kernel works on each (sequence, head)
    independently of the batch size, so equality is exact."""
    if backend == "recomputed":
        monkeypatch.setattr(model, "attention_backend", lambda q, k, v: model.MATH)
    gen = torch.Generator().manual_seed(16)
    qs, ks, vs = (torch.randn(3, 2, 4, 24, 16, generator=gen).requires_grad_() for _ in range(3))
    out = vmap(lanes_attention)(qs, ks, vs)
    grad_out = torch.randn(out.shape, generator=gen)
    grads = torch.autograd.grad(out, (qs, ks, vs), grad_out)
    for lane in range(3):
        q, k, v = (t[lane].detach().requires_grad_() for t in (qs, ks, vs))
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out[lane])
        assert torch.equal(out[lane], ref)
        for g, r in zip(grads, ref_grads):
            assert torch.equal(g[lane], r)


def test_vmapped_attention_under_autocast_computes_as_sdpa_does():
    """SDPA is a lower-precision op under autocast: float32 inputs are cast to bfloat16. The lane path does the same."""
    gen = torch.Generator().manual_seed(17)
    qs = torch.randn(3, 2, 4, 24, 16, generator=gen)
    k, v = torch.randn(2, 4, 24, 16, generator=gen), torch.randn(2, 4, 24, 16, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vmap(lambda q: lanes_attention(q, k, v))(qs)
        refs = [torch.nn.functional.scaled_dot_product_attention(qs[lane], k, v, is_causal=True) for lane in range(3)]
    assert out.dtype == torch.bfloat16
    for lane in range(3):
        assert torch.equal(out[lane], refs[lane])


def test_gqa_model_equals_mha_model_with_repeated_kv_weights():
    """A GQA model (4 query heads, 2 kv heads) computes what the MHA model with each kv head duplicated does."""
    gqa = GPTConfig(sequence_len=32, vocab_size=100, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    mha = GPTConfig(sequence_len=32, vocab_size=100, n_layer=2, n_head=4, n_kv_head=4, n_embd=64)
    gen = torch.Generator().manual_seed(7)
    params = {name: 0.2 * torch.randn(shape, generator=gen) for name, shape in param_shapes(gqa).items()}
    params["transformer.wte.weight"] = torch.randn(param_shapes(gqa)["transformer.wte.weight"], generator=gen)
    expanded = dict(params)
    hd = gqa.head_dim
    for i in range(gqa.n_layer):
        for kv in ("k", "v"):
            name = f"transformer.h.{i}.attn.c_{kv}.weight"
            heads = params[name].view(gqa.n_kv_head, hd, gqa.n_embd)
            expanded[name] = heads.repeat_interleave(2, dim=0).reshape(mha.n_head * hd, gqa.n_embd)
    idx = torch.randint(0, 100, (2, 32), generator=gen)
    logits = forward(params, idx, gqa, rotary_cos_sin(gqa))
    assert logits.shape == (2, 32, 100) and torch.isfinite(logits).all()
    # the two SDPA paths (enable_gqa vs plain) may sum in a different order: float32 ulps on O(10) logits
    torch.testing.assert_close(logits, forward(expanded, idx, mha, rotary_cos_sin(mha)), rtol=0, atol=1e-5)


# ---------------------------------------------------------------- vmap over stacked lanes


def lane_setup(fixture_model, L: int, seed: int = 0):
    """Frozen wte (shared, unstacked) and L perturbed copies of every matrix + lm_head, stacked."""
    config, params, _ = fixture_model
    gen = torch.Generator().manual_seed(seed)
    frozen = {k: v for k, v in params.items() if param_group(k) == "embedding"}
    stacked = {
        k: torch.stack([v + 0.02 * torch.randn(v.shape, generator=gen) for _ in range(L)])
        for k, v in params.items()
        if param_group(k) != "embedding"
    }
    return config, frozen, stacked


def random_batch(gen, shape, vocab):
    """Random inputs and next-token targets with ~30% ignored (-1) positions."""
    inputs = torch.randint(0, vocab, shape, generator=gen)
    targets = torch.randint(0, vocab, shape, generator=gen)
    targets[torch.rand(shape, generator=gen) < 0.3] = -1
    return inputs, targets


def vmapped_losses_and_grads(config, frozen, stacked, inputs, targets, data_dim):
    """Losses [L] and grads of every stacked tensor from one vmapped forward and one backward."""
    cos_sin = rotary_cos_sin(config)
    leaves = {k: v.detach().clone().requires_grad_() for k, v in stacked.items()}

    def lane_loss(lane, x, y):
        return forward({**frozen, **lane}, x, config, cos_sin, y, attend=lanes_attention, head=lanes_head_loss)

    losses = vmap(lane_loss, in_dims=(0, data_dim, data_dim))(leaves, inputs, targets)
    losses.sum().backward()
    return losses.detach(), {k: v.grad for k, v in leaves.items()}


def single_loss_and_grads(config, frozen, lane_params, inputs, targets):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in lane_params.items()}
    loss = forward({**frozen, **leaves}, inputs, config, rotary_cos_sin(config), targets)
    loss.backward()
    return loss.detach(), {k: v.grad for k, v in leaves.items()}


def assert_lane_matches_single(loss, grads, single_loss, single_grads, lane):
    # Batched GEMMs may sum in another order than the single-lane GEMMs: each float32 result moves by a few
    # ulps (measured: losses ~1e-6 apart, grads equal). 1e-5 relative (to the loss, or to each grad tensor's
    # largest entry) is ~100 ulps: loose for rounding, tight for any real mix-up between lanes (~1e-2).
    assert loss.item() == pytest.approx(single_loss.item(), rel=1e-5), f"lane {lane}"
    for name, g in grads.items():
        expected = single_grads[name]
        scale = expected.abs().max().item()
        assert scale > 0, name  # every trainable tensor gets a gradient
        torch.testing.assert_close(g, expected, rtol=1e-5, atol=1e-5 * scale, msg=f"lane {lane} {name}")


@pytest.mark.parametrize("per_lane_data", [False, True], ids=["shared-data", "per-lane-data"])
def test_vmap_lanes_match_single_model(fixture_model, per_lane_data):
    L = 4
    config, frozen, stacked = lane_setup(fixture_model, L)
    gen = torch.Generator().manual_seed(1)
    shape = (L, 4, 64) if per_lane_data else (4, 64)
    inputs, targets = random_batch(gen, shape, config.vocab_size)
    data_dim = 0 if per_lane_data else None
    losses, grads = vmapped_losses_and_grads(config, frozen, stacked, inputs, targets, data_dim)
    assert losses.shape == (L,)
    assert len(set(losses.tolist())) == L  # the perturbations make every lane different
    for lane in range(L):
        x, y = (inputs[lane], targets[lane]) if per_lane_data else (inputs, targets)
        single_loss, single_grads = single_loss_and_grads(
            config, frozen, {k: v[lane] for k, v in stacked.items()}, x, y
        )
        assert_lane_matches_single(
            losses[lane], {k: g[lane] for k, g in grads.items()}, single_loss, single_grads, lane
        )


def test_vmap_runs_without_per_lane_fallback(fixture_model):
    """No functorch fallback warning, under a flag that does warn for a raw SDPA call (checked first)."""
    config, frozen, stacked = lane_setup(fixture_model, 4)
    inputs, targets = random_batch(torch.Generator().manual_seed(2), (4, 64), config.vocab_size)
    torch._C._functorch._set_vmap_fallback_warning_enabled(True)
    try:
        with warnings.catch_warnings(record=True) as control:
            warnings.simplefilter("always")
            q = torch.randn(3, 2, 2, 8, 4, generator=torch.Generator().manual_seed(3))
            vmap(lambda t: torch.nn.functional.scaled_dot_product_attention(t, t, t, is_causal=True))(q)
        assert any("batching rule" in str(w.message) for w in control)  # the flag works here

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            vmapped_losses_and_grads(config, frozen, stacked, inputs, targets, None)
    finally:
        torch._C._functorch._set_vmap_fallback_warning_enabled(False)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    # the fallback warns "performance drop ... not yet implemented the batching rule for <op>"
    assert not [
        m for m in messages if any(s in m for s in ("batching rule", "performance drop", "vmap", "functorch"))
    ], messages


@pytest.mark.parametrize("L", [4, 8])
def test_one_attention_call_per_layer_for_all_lanes(fixture_model, L):
    """The lanes fold into the fused kernel's batch: n_layer flash calls forward and n_layer backward, each of batch
    L * B, seen by the profiler at the aten level (a per-lane fallback would show L times as many of batch B)."""
    config, frozen, stacked = lane_setup(fixture_model, L)
    B = 2
    inputs, targets = random_batch(torch.Generator().manual_seed(4), (L, B, 64), config.vocab_size)
    cos_sin = rotary_cos_sin(config)
    leaves = {k: v.clone().requires_grad_() for k, v in stacked.items()}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        losses = vmap(
            lambda lane, x, y: forward(
                {**frozen, **lane}, x, config, cos_sin, y, attend=lanes_attention, head=lanes_head_loss
            )
        )(leaves, inputs, targets)
        losses.sum().backward()
    kernels = {
        "aten::_scaled_dot_product_flash_attention_for_cpu": [],
        "aten::_scaled_dot_product_flash_attention_for_cpu_backward": [],
    }
    for event in prof.events():
        if event.name in kernels:
            shapes = event.input_shapes
            kernels[event.name].append(shapes[0][0] if event.name.endswith("cpu") else shapes[1][0])  # q's batch dim
        assert "attention_math" not in event.name  # no unfused fallback either
    assert list(kernels.values()) == [[L * B] * config.n_layer] * 2


def test_nan_lane_is_isolated(fixture_model):
    """A NaN in one lane's weights makes only that lane's loss NaN; the other lanes are unaffected."""
    L, bad = 4, 1
    config, frozen, stacked = lane_setup(fixture_model, L)
    inputs, targets = random_batch(torch.Generator().manual_seed(8), (L, 4, 64), config.vocab_size)
    clean_losses, clean_grads = vmapped_losses_and_grads(config, frozen, stacked, inputs, targets, 0)

    poisoned = {k: v.clone() for k, v in stacked.items()}
    poisoned["transformer.h.0.mlp.c_fc.weight"][bad, 3, 5] = float("nan")
    losses, grads = vmapped_losses_and_grads(config, frozen, poisoned, inputs, targets, 0)

    assert torch.isnan(losses[bad])
    good = [lane for lane in range(L) if lane != bad]
    assert torch.isfinite(clean_losses).all()
    # same shapes and kernels with the same numbers in the clean lanes: bit-equal is expected, and NaN
    # leaking across lanes would not be a small difference anyway
    assert torch.equal(losses[good], clean_losses[good])
    for name, g in grads.items():
        assert torch.equal(g[good], clean_grads[name][good]), name
