"""Lane-batched optimizers vs torch.optim run on each lane's slice.

AdamW and Muon's momentum are elementwise, in torch's op order: compared bit for bit. Newton-Schulz (and so Muon's
update) is batched matmuls (bmm, baddbmm) where torch.optim's is single ones (mm, addmm): on AMD EPYC and on the Intel
Xeon of issue 15 they match bit for bit too, but no BLAS promises that a batched matmul sums each slice in a single
one's order, so it is compared within the bfloat16 noise floor of another summation order (NS_ATOL).
"""

import math

import pytest
import torch
from torch.optim._muon import _zeropower_via_newtonschulz

from fractal_vmap import optim
from fractal_vmap.optim import BatchedAdamW, BatchedMuon, lr_multiplier, lr_multiplier_scalar, newton_schulz

BETAS = (0.8, 0.95)
EPS = 1e-10
# Newton-Schulz's noise floor: bfloat16 products, 5 iterations. Measured (AMD EPYC, 70 random matrices a shape, the
# shapes below, fp32 and bf16 inputs): every product summed over its reduction in two halves, as a BLAS that splits it
# over 2 threads would, moves an entry by up to 0.027 (entries up to ~0.45); a wrong iteration count (4 or 6): >= 0.08.
NS_ATOL = 0.05


def stacked_params(gen: torch.Generator, L: int, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    return [torch.randn(L, *s, generator=gen).requires_grad_() for s in shapes]


def twins(params: list[torch.Tensor], lane: int) -> list[torch.Tensor]:
    """Independent single-lane copies of lane `lane` of every stacked param."""
    return [p.detach()[lane].clone().requires_grad_() for p in params]


def replay(ref_opt, ref, lane, lrs, actives, grads) -> None:
    """Step a torch.optim twin of one lane through the same lrs and grads, skipping the steps where the lane was
    inactive."""
    for s in range(len(grads)):
        if not actives[s][lane]:
            continue
        ref_opt.param_groups[0]["lr"] = lrs[s][lane].item()
        for r, g in zip(ref, grads[s]):
            r.grad = g[lane].clone()
        ref_opt.step()


def run_adamw(params, lrs, wds, actives, grads):
    """Step BatchedAdamW through the given per-step lrs, actives and grads."""
    opt = BatchedAdamW(params, betas=BETAS, eps=EPS)
    for lr, active, gs in zip(lrs, actives, grads):
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step(lr, wds, active)
    return opt


def run_muon(params, lrs, actives, grads):
    opt = BatchedMuon(params, momentum=0.95, nesterov=True)
    for lr, active, gs in zip(lrs, actives, grads):
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step(lr, active)
    return opt


# ---------------------------------------------------------------- lr schedule


def test_lr_multiplier_hand_values():
    # total 100, warmup_frac 0.1 -> warmup 10 steps, then cosine over 90 steps down to 0
    total, wf, final = torch.tensor([100.0]), torch.tensor([0.1]), torch.tensor([0.0])
    expected = {0: 0.1, 4: 0.5, 9: 1.0, 10: 1.0, 55: 0.5, 100: 0.0}
    for step, want in expected.items():
        assert lr_multiplier_scalar(step, 100, 0.1, 0.0) == pytest.approx(want, abs=1e-15)
        assert lr_multiplier(step, total, wf, final).item() == pytest.approx(want, abs=1e-15)
    # warmup_frac 0 -> warmup of 1 step: step 0 is full lr, step 1 starts the cosine at 1
    assert lr_multiplier_scalar(0, 50, 0.0, 0.2) == 1.0
    assert lr_multiplier_scalar(1, 50, 0.0, 0.2) == 1.0
    # last step (49) of a 50-step run with warmup 1: progress 48/49, just above final
    want = 0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * 48 / 49))
    assert lr_multiplier_scalar(49, 50, 0.0, 0.2) == pytest.approx(want, abs=1e-15)


def test_lr_multiplier_matches_scalar_twin():
    gen = torch.Generator().manual_seed(0)
    L = 256
    total = torch.randint(1, 1000, (L,), generator=gen).double()
    warmup_frac = torch.rand(L, generator=gen, dtype=torch.float64) * 0.5
    warmup_frac[:16] = 0.0  # warmup 1
    final = torch.rand(L, generator=gen, dtype=torch.float64)
    warmup = [max(1, math.floor(t * f)) for t, f in zip(total.tolist(), warmup_frac.tolist())]
    steps = {0, 1, 999} | set(torch.randint(0, 1000, (64,), generator=gen).tolist())
    steps |= {w + d for w in warmup for d in (-1, 0, 1) if w + d >= 0}  # around every lane's warmup end
    steps |= {int(t) - 1 for t in total.tolist()}  # every lane's last step
    worst = 0.0
    for step in sorted(steps):
        got = lr_multiplier(step, total, warmup_frac, final)
        assert got.dtype == torch.float64
        for i in range(L):
            want = lr_multiplier_scalar(step, int(total[i]), warmup_frac[i].item(), final[i].item())
            worst = max(worst, abs(got[i].item() - want))
    # torch.cos and math.cos may differ by an ulp; values are <= 1, so a few 1e-16
    assert worst <= 4.5e-16, worst


# ---------------------------------------------------------------- AdamW


def test_adamw_matches_torch_per_lane():
    gen = torch.Generator().manual_seed(1)
    L, n_steps = 4, 10
    shapes = [(16, 8), (32,), (5, 3, 7)]
    params = stacked_params(gen, L, shapes)
    initial = [p.detach().clone() for p in params]
    base_lr = torch.tensor([1e-3, 3e-3, 1e-2, 3e-2], dtype=torch.float64)
    wds = torch.tensor([0.0, 0.1, 0.01, 0.3], dtype=torch.float64)
    total = torch.full((L,), float(n_steps), dtype=torch.float64)
    warm, final = torch.full((L,), 0.2, dtype=torch.float64), torch.full((L,), 0.1, dtype=torch.float64)
    lrs = [base_lr * lr_multiplier(s, total, warm, final) for s in range(n_steps)]
    actives = [torch.ones(L, dtype=torch.bool) for _ in range(n_steps)]
    for s in (2, 3, 7):
        actives[s][2] = False  # lane 2 skips some steps
    grads = [[torch.randn(L, *s, generator=gen) for s in shapes] for _ in range(n_steps)]

    opt = run_adamw(params, lrs, wds, actives, grads)

    for lane in range(L):
        ref = twins([torch.nn.Parameter(x) for x in initial], lane)
        ref_opt = torch.optim.AdamW(ref, lr=1.0, betas=BETAS, eps=EPS, weight_decay=wds[lane].item(), foreach=False)
        replay(ref_opt, ref, lane, lrs, actives, grads)
        assert opt.steps[lane].item() == sum(bool(a[lane]) for a in actives)
        for j, r in enumerate(ref):
            state = ref_opt.state[r]
            # measured bit-for-bit on CPU
            torch.testing.assert_close(params[j].detach()[lane], r.detach(), rtol=0, atol=0)
            torch.testing.assert_close(opt.exp_avg[j][lane], state["exp_avg"], rtol=0, atol=0)
            torch.testing.assert_close(opt.exp_avg_sq[j][lane], state["exp_avg_sq"], rtol=0, atol=0)


def test_adamw_lr_is_per_lane():
    # identical lanes and grads, lr differs by 2x: the first-step move must differ by 2x too
    gen = torch.Generator().manual_seed(2)
    x, g = torch.randn(1, 64, 32, generator=gen), torch.randn(1, 64, 32, generator=gen)
    p = x.repeat(2, 1, 1).requires_grad_()
    p.grad = g.repeat(2, 1, 1)
    opt = BatchedAdamW([p], betas=BETAS, eps=EPS)
    lr, wd = torch.tensor([1e-2, 2e-2], dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    opt.step(lr, wd, torch.ones(2, dtype=torch.bool))
    d = p.detach() - x
    # first Adam step moves by ~lr * sign(g); |x| < ~5 so rounding of p is < 5e-7
    torch.testing.assert_close(d[1], 2 * d[0], rtol=0, atol=1e-6)
    assert (d[0].abs() - 1e-2).abs().max() < 1e-6


# ---------------------------------------------------------------- Newton-Schulz


@pytest.mark.parametrize("shape", [(6, 256, 64), (6, 64, 256), (6, 64, 64), (3, 48, 20)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_newton_schulz_matches_torch_per_slice(shape, dtype):
    gen = torch.Generator().manual_seed(3)
    G = torch.randn(*shape, generator=gen).to(dtype)
    G[1] *= 1e-3  # scale must not matter: each slice is normalized by its own norm
    out = newton_schulz(G)
    assert out.dtype == torch.bfloat16 and out.shape == G.shape
    for i in range(shape[0]):
        want = _zeropower_via_newtonschulz(G[i], optim.NS_COEFFS, 5, 1e-7)
        # bit for bit where bmm/baddbmm sum each slice like mm/addmm (AMD EPYC, Intel Xeon with MKL); promised: NS_ATOL
        torch.testing.assert_close(out[i].float(), want.float(), rtol=0, atol=NS_ATOL)


# ---------------------------------------------------------------- Muon


def elementwise_stand_in(G: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """In place of Newton-Schulz on both sides: an elementwise bf16 map, so the rest of Muon (momentum, Nesterov, the lr
    and its shape scaling, inactive lanes, grouping by shape) is compared bit for bit on any BLAS."""
    return torch.tanh(4 * G.float()).bfloat16()


@pytest.mark.parametrize("orthogonalize", ["newton-schulz", "stand-in"])
def test_muon_matches_torch_per_lane(orthogonalize, monkeypatch):
    if orthogonalize == "stand-in":
        monkeypatch.setattr(optim, "newton_schulz", elementwise_stand_in)
        monkeypatch.setattr(torch.optim._muon, "_zeropower_via_newtonschulz", elementwise_stand_in)
    gen = torch.Generator().manual_seed(4)
    L, n_steps = 3, 10
    shapes = [(256, 64), (64, 256), (64, 64), (64, 64)]
    params = stacked_params(gen, L, shapes)
    initial = [p.detach().clone() for p in params]
    base_lr = torch.tensor([0.02, 0.005, 0.05], dtype=torch.float64)
    total = torch.full((L,), float(n_steps), dtype=torch.float64)
    warm, final = torch.full((L,), 0.3, dtype=torch.float64), torch.full((L,), 0.0, dtype=torch.float64)
    lrs = [base_lr * lr_multiplier(s, total, warm, final) for s in range(n_steps)]
    actives = [torch.ones(L, dtype=torch.bool) for _ in range(n_steps)]
    for s in (1, 5, 6):
        actives[s][1] = False
    grads = [[torch.randn(L, *s, generator=gen) for s in shapes] for _ in range(n_steps)]

    opt = run_muon(params, lrs, actives, grads)

    for lane in range(L):
        ref = twins([torch.nn.Parameter(x) for x in initial], lane)
        ref_opt = torch.optim.Muon(ref, lr=1.0, weight_decay=0, momentum=0.95, nesterov=True)
        replay(ref_opt, ref, lane, lrs, actives, grads)
        moved = sum(lrs[s][lane].item() for s in range(n_steps) if actives[s][lane])  # the lane's summed lr
        for j, r in enumerate(ref):
            # the momentum sees only the gradients: elementwise, bit for bit
            buf = ref_opt.state[r]["momentum_buffer"]
            torch.testing.assert_close(opt.momentum_buffer[j][lane], buf, rtol=0, atol=0)
            if orthogonalize == "stand-in":  # every op elementwise, in torch's order
                torch.testing.assert_close(params[j].detach()[lane], r.detach(), rtol=0, atol=0)
                continue
            # each step moves p by lr x sqrt(max(1, rows / cols)) x its Newton-Schulz update, which may differ by up to
            # NS_ATOL (bit for bit where bmm sums like mm), plus an ulp of p a step
            scale = math.sqrt(max(1, shapes[j][0] / shapes[j][1]))
            tol = moved * scale * NS_ATOL + n_steps * torch.finfo(torch.float32).eps * r.detach().abs().max().item()
            torch.testing.assert_close(params[j].detach()[lane], r.detach(), rtol=0, atol=tol)


def test_muon_lr_is_per_lane():
    # identical lanes and grads, lr differs by 2x: the first-step move must differ by 2x too
    gen = torch.Generator().manual_seed(5)
    x, g = torch.randn(1, 128, 32, generator=gen), torch.randn(1, 128, 32, generator=gen)
    p = x.repeat(2, 1, 1).requires_grad_()
    p.grad = g.repeat(2, 1, 1)
    BatchedMuon([p]).step(torch.tensor([0.01, 0.02], dtype=torch.float64), torch.ones(2, dtype=torch.bool))
    d = p.detach() - x
    # NS entries are O(1/sqrt(32)) ~ 0.2, times lr * sqrt(128/32) = 2 lr; rounding of p is < 5e-7
    torch.testing.assert_close(d[1], 2 * d[0], rtol=0, atol=1e-6)
    assert d[0].abs().max() > 1e-3


def test_muon_one_newton_schulz_call_per_shape(monkeypatch):
    calls = []

    def counting(G, *args, **kwargs):
        calls.append(tuple(G.shape))
        return newton_schulz(G, *args, **kwargs)

    monkeypatch.setattr(optim, "newton_schulz", counting)
    gen = torch.Generator().manual_seed(6)
    L = 3
    shapes = [(64, 32), (32, 64), (64, 32), (32, 32), (64, 32)]
    params = stacked_params(gen, L, shapes)
    opt = BatchedMuon(params)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step(torch.full((L,), 0.02, dtype=torch.float64), torch.ones(L, dtype=torch.bool))
    # per step: one call per distinct (r, c), holding every lane of every param of that shape
    assert sorted(calls) == sorted([(9, 64, 32), (3, 32, 64), (3, 32, 32)] * 2)


# ---------------------------------------------------------------- NaN isolation


def _nan_isolation_case(seed: int, shapes):
    """Lane 1 gets NaN/inf grads at some steps and is inactive there; returns inputs for 3 and 2 lanes."""
    gen = torch.Generator().manual_seed(seed)
    L, n_steps = 3, 6
    init = [torch.randn(L, *s, generator=gen) for s in shapes]
    lrs = [torch.rand(L, generator=gen, dtype=torch.float64) * 0.02 + 0.001 for _ in range(n_steps)]
    grads = [[torch.randn(L, *s, generator=gen) for s in shapes] for _ in range(n_steps)]
    actives = [torch.ones(L, dtype=torch.bool) for _ in range(n_steps)]
    bad_steps = (2, 4)
    for s in bad_steps:
        actives[s][1] = False
        grads[s][0][1, 0, 0] = float("nan")
        grads[s][-1][1, 1, 1] = float("inf")
    keep = [0, 2]
    sub = lambda xs: [x[keep].clone() for x in xs]  # noqa: E731
    return init, lrs, grads, actives, bad_steps, keep, sub


def test_adamw_nan_lane_is_isolated():
    shapes = [(16, 8), (8, 4)]
    init, lrs, grads, actives, bad_steps, keep, sub = _nan_isolation_case(7, shapes)
    wds = torch.tensor([0.1, 0.2, 0.05], dtype=torch.float64)
    params = [x.clone().requires_grad_() for x in init]
    opt = BatchedAdamW(params, betas=BETAS, eps=EPS)
    for s, (lr, active, gs) in enumerate(zip(lrs, actives, grads)):
        before = [t[1].clone() for t in params + opt.exp_avg + opt.exp_avg_sq]
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step(lr, wds, active)
        after = [t[1] for t in params + opt.exp_avg + opt.exp_avg_sq]
        if s in bad_steps:  # the inactive lane is untouched
            assert all(torch.equal(a, b) for a, b in zip(after, before))
        assert all(torch.isfinite(t).all() for t in params + opt.exp_avg + opt.exp_avg_sq)

    small = [x.clone().requires_grad_() for x in sub(init)]
    small_lrs, small_actives = [lr[keep] for lr in lrs], [a[keep] for a in actives]
    small_opt = run_adamw(small, small_lrs, wds[keep], small_actives, [sub(gs) for gs in grads])
    for big, little in [(params, small), (opt.exp_avg, small_opt.exp_avg), (opt.exp_avg_sq, small_opt.exp_avg_sq)]:
        for b, s in zip(big, little):
            assert torch.equal(b.detach()[keep], s.detach())


def test_muon_nan_lane_is_isolated():
    shapes = [(64, 32), (32, 64), (64, 32)]
    init, lrs, grads, actives, bad_steps, keep, sub = _nan_isolation_case(8, shapes)
    params = [x.clone().requires_grad_() for x in init]
    opt = BatchedMuon(params)
    for s, (lr, active, gs) in enumerate(zip(lrs, actives, grads)):
        before = [t[1].clone() for t in params + opt.momentum_buffer]
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step(lr, active)
        after = [t[1] for t in params + opt.momentum_buffer]
        if s in bad_steps:
            assert all(torch.equal(a, b) for a, b in zip(after, before))
        assert all(torch.isfinite(t).all() for t in params + opt.momentum_buffer)

    small = [x.clone().requires_grad_() for x in sub(init)]
    small_opt = run_muon(small, [lr[keep] for lr in lrs], [a[keep] for a in actives], [sub(gs) for gs in grads])
    for big, little in [(params, small), (opt.momentum_buffer, small_opt.momentum_buffer)]:
        for b, s in zip(big, little):
            assert torch.equal(b.detach()[keep], s.detach())
