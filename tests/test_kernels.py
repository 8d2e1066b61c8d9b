"""The Triton kernels (fractal_vmap/kernels/) against their plain-torch references, in Triton's CPU interpreter.
The head's kernel is tested in test_head.py, beside its reference.

triton.jit decides at decoration time whether a kernel is compiled or interpreted, triton's own library included, so
conftest.py sets TRITON_INTERPRET=1 before anything imports triton; test_kernels_are_interpreted checks that it took.
Sizes are small and never multiples of the kernels' blocks; inputs are fresh random draws. Lanes: 1, 3 and 8.

The optimizer kernels round as torch's vectorized CPU kernels and its CUDA ones do (one fma per lerp and addcmul), and
are compared with the torch path bit for bit where torch's CPU kernels here do so (TORCH_FMA, probed); its scalar
kernels (ATEN_CPU_CAPABILITY=default, a CPU without AVX2) round the product first, and there the comparison is
within GAP_ULPS.
"""

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fractal_vmap import kernels as fk
from fractal_vmap.errors import UserError
from fractal_vmap.head import lanes_head_loss
from fractal_vmap.optim import BatchedAdamW, BatchedMuon, newton_schulz_iterations, normalized

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "fractal_vmap"
BETAS, EPS = (0.8, 0.95), 1e-10


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bfloat16 numbers at |x| (8 significant bits), as float64."""
    return 2.0 ** (torch.frexp(x.abs().float())[1].double() - 8)


def torch_rounds_as_one_fma() -> bool:
    """Whether this machine's torch CPU kernels round lerp and addcmul as one fma, as the kernels do (and torch's CUDA
    kernels): its vectorized ones do (AVX2, AVX-512); its scalar ones (ATEN_CPU_CAPABILITY=default, or a CPU without
    those) round the product first. Probed on random inputs against the fma computed in float64 (the product exact,
    one rounding; the float32 rounding after it breaks a tie otherwise about once in 2**29 draws)."""
    gen = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(4096, generator=gen) for _ in range(3))
    w = torch.tensor(0.1).item()  # float32 0.1, as lerp_weights rounds a weight
    lerp_fma = (a.double() + w * (b - a).double()).float()
    addcmul_fma = (c.double() + a.double() * b.double()).float()
    return torch.equal(torch.lerp(a, b, w), lerp_fma) and torch.equal(torch.addcmul(c, a, b), addcmul_fma)


# Where torch's CPU kernels round the product first (not as one fma), a lerp or addcmul lands an ulp away from the
# kernel's: the tests below then compare within GAP_ULPS float32 ulps of the largest |value|. Measured with
# ATEN_CPU_CAPABILITY=default (AMD EPYC): at most 1.0 such ulp over these tests' 1-4 steps, moments, momentum and
# Muon's weights; 4x that.
TORCH_FMA = torch_rounds_as_one_fma()
GAP_ULPS = 4


def assert_torch_rounding(got: torch.Tensor, want: torch.Tensor) -> None:
    """got (a kernel's) bit-equal to want (torch's) where torch rounds as one fma; else within GAP_ULPS float32 ulps
    of want's largest |entry|, or for bfloat16 within one bf16 ulp of each entry (the float32 value an ulp away may
    round to the other neighbour)."""
    if TORCH_FMA:
        assert torch.equal(got, want)
    elif want.dtype == torch.bfloat16:
        assert ((got.double() - want.double()).abs() <= bf16_ulp(want)).all()
    else:
        ulp = torch.finfo(torch.float32).eps * want.abs().max().item()
        assert (got.double() - want.double()).abs().max().item() <= GAP_ULPS * ulp


def run(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=full_env, cwd=ROOT
    )


# ---------------------------------------------------------------- import path, laziness, selection


def test_kernels_are_interpreted():
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    from fractal_vmap.kernels import adamw, gram, head, muon

    assert fk.interpreting()
    # tl.sum is triton's own jit function: interpreted only if triton was first imported under TRITON_INTERPRET=1
    for kernel in (
        tl.sum,
        adamw.adamw_kernel,
        muon.momentum_kernel,
        muon.normalize_kernel,
        muon.update_kernel,
        gram.gram_kernel,
        head.ce_kernel,
    ):
        assert isinstance(kernel, InterpretedFunction), (
            f"{kernel} is compiled: set TRITON_INTERPRET=1 before triton is imported"
        )


def test_a_decoy_kernels_package_first_on_the_path_changes_nothing(tmp_path):
    """Hugging Face's `kernels` (a nanochat dependency) may come first on sys.path: ours must still be found, and
    nothing of ours may import a bare `kernels`."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("DECOY = True\n")
    out = run(
        """
        import sys
        import fractal_vmap.kernels, fractal_vmap.kernels.adamw, fractal_vmap.kernels.muon, fractal_vmap.kernels.gram
        import fractal_vmap.kernels.head, fractal_vmap.optim, fractal_vmap.head, fractal_vmap.model
        assert "kernels" not in sys.modules, "something imported a bare `kernels`"
        print(fractal_vmap.kernels.__file__)
        import kernels
        assert kernels.DECOY  # a bare import would have found the decoy
    """,
        {"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}", "TRITON_INTERPRET": "1"},
    )
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == PACKAGE / "kernels" / "__init__.py"
    for path in PACKAGE.rglob("*.py"):  # and none of our sources says `import kernels` / `from kernels import`
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                assert not any(a.name.split(".")[0] == "kernels" for a in node.names), path
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                assert (node.module or "").split(".")[0] != "kernels", path


def test_without_triton_the_torch_paths_run_and_triton_is_refused_clearly():
    out = run(
        """
        import sys
        sys.modules["triton"] = None  # `import triton` now raises ImportError: a bare torch install
        import torch
        import fractal_vmap.optim, fractal_vmap.head
        from fractal_vmap.errors import UserError
        from fractal_vmap.kernels import resolve
        p = torch.randn(2, 4, 3, requires_grad=True)
        p.grad = torch.randn(2, 4, 3)
        opt = fractal_vmap.optim.BatchedAdamW([p])
        lr, wd = torch.full((2,), 1e-3, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
        opt.step(lr, wd, torch.ones(2, dtype=torch.bool))
        assert resolve("auto", "cpu") == "torch" and resolve("auto", "cuda") == "torch"
        try:
            fractal_vmap.optim.BatchedMuon([p], kernels="triton")
        except UserError as e:
            print(e)
    """,
        {"PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"},
    )
    assert out.returncode == 0, out.stderr
    assert "triton is not installed" in out.stdout


def test_resolve_and_the_interpreter_requirement(monkeypatch):
    assert fk.resolve("auto", "cpu") == "torch"
    assert fk.resolve("torch", "cpu") == "torch"
    assert fk.resolve("triton", "cpu") == "triton"  # TRITON_INTERPRET=1 here
    with pytest.raises(UserError, match="unknown kernels"):
        fk.resolve("cuda", "cpu")
    monkeypatch.delenv("TRITON_INTERPRET")
    p = torch.randn(2, 8, 4, requires_grad=True)
    for make in (
        lambda: fk.resolve("triton", "cpu"),
        lambda: BatchedAdamW([p], kernels="triton"),
        lambda: BatchedMuon([p], kernels="triton"),
        lambda: BatchedMuon([p], gram="triton"),
        lambda: lanes_head_loss(
            torch.randn(2, 5, 4), torch.randn(2, 7, 4), torch.zeros(2, 5, dtype=torch.long), kernels="triton"
        ),
    ):
        with pytest.raises(UserError, match="TRITON_INTERPRET=1"):
            make()


def test_the_kernels_compile_for_an_h100(tmp_path):
    """The GPU path cannot run here, but it can be compiled: each kernel, with its launchers' argument types and
    GPU block sizes, through Triton's CUDA backend (ptxas ships with triton) for sm_90, without the interpreter."""
    out = run(
        """
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from fractal_vmap.kernels import adamw, gram, head, muon

        def compile(fn, signature, constexprs, **options):
            sig = dict(signature, **{k: "constexpr" for k in constexprs})
            source = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
            triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)

        def types(kind, *names):
            return {name: kind for name in names}

        exact = dict(num_warps=4, enable_fp_fusion=False)
        for dt in ("fp32", "bf16"):
            compile(
                adamw.adamw_kernel,
                {**types(f"*{dt}", "p_ptr", "g_ptr", "m_ptr", "v_ptr"), "scalars_ptr": "*fp32", "active_ptr": "*u8",
                 **types("i32", "n", "L"), **types("fp32", "w1", "w1_minus_1", "beta2", "w2", "eps")},
                {"BLOCK": adamw.BLOCK},
                **exact,
            )
            compile(
                head.ce_kernel,
                {"z_ptr": f"*{dt}", "targets_ptr": "*i64", **types("*fp32", "loss_ptr", "scale_ptr"),
                 **types("i32", "rows", "n", "V")},
                {"CAP": head.SOFTCAP, "BLOCK_N": head.BLOCK_N, "BLOCK_V": head.BLOCK_V},
                num_warps=8,
                enable_fp_fusion=False,
            )
        compile(
            muon.momentum_kernel,
            {**types("*fp32", "g_ptr", "buf_ptr"), "x_ptr": "*bf16", "sums_ptr": "*fp32", "active_ptr": "*u8",
             "n": "i32", **types("fp32", "w", "w_minus_1", "momentum", "momentum_minus_1")},
            {"NESTEROV": True, "BLOCK": muon.BLOCK, "ITERS": muon.ITERS},
            **exact,
        )
        compile(
            muon.normalize_kernel,
            {"x_ptr": "*bf16", "sums_ptr": "*fp32", **types("i32", "n", "n_chunks"), "eps": "fp32"},
            {"BLOCK": muon.BLOCK, "ITERS": muon.ITERS, "SUMS": muon.SUMS},
            **exact,
        )
        compile(
            muon.update_kernel,
            {"p_ptr": "*fp32", "o_ptr": "*bf16", "neg_lr_ptr": "*fp32", "active_ptr": "*u8",
             **types("i32", "rows", "cols", "o_lane", "o_row", "o_col")},
            {"TILE": muon.TILE},
            **exact,
        )
        for has_c in (False, True):
            compile(
                gram.gram_kernel,
                {**types("*bf16", "y_ptr", "c_ptr", "out_ptr"), "pairs_ptr": "*i32",
                 **types("i32", "n_pairs", "R", "K", "sy_n", "sy_r", "sy_k", "sc_n", "sc_r", "sc_c"),
                 **types("fp32", "alpha", "beta")},
                {"HAS_C": has_c, "UPCAST": False, "BM": gram.BM, "BK": gram.BK},
                num_warps=8,
                num_stages=3,
                enable_fp_fusion=True,
            )
        print("compiled")
    """,
        {"PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path)},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "compiled"


# ---------------------------------------------------------------- AdamW


def adamw_pair(gen, L, shapes, dtype=torch.float32):
    """Two BatchedAdamW over equal copies of random stacked params: torch and triton."""
    init = [torch.randn(L, *s, generator=gen).to(dtype) for s in shapes]
    ref, fused = ([x.clone().requires_grad_() for x in init] for _ in range(2))
    return ref, fused, BatchedAdamW(ref, BETAS, EPS), BatchedAdamW(fused, BETAS, EPS, kernels="triton")


def give_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()


@pytest.mark.parametrize("L", [1, 3, 8])
def test_adamw_kernel_matches_torch(L):
    gen = torch.Generator().manual_seed(10 + L)
    shapes = [(37, 29), (5,)]  # 1073 and 5 elements a lane: neither a multiple of the block
    ref, fused, ref_opt, fused_opt = adamw_pair(gen, L, shapes)
    for _step in range(3):
        grads = [torch.randn(L, *s, generator=gen) for s in shapes]
        lr = torch.rand(L, generator=gen, dtype=torch.float64) * 0.03
        wd = torch.rand(L, generator=gen, dtype=torch.float64) * 0.2
        active = torch.rand(L, generator=gen) < 0.8
        active[0] = True
        give_grads(ref, grads)
        give_grads(fused, grads)
        ref_opt.step(lr, wd, active)
        fused_opt.step(lr, wd, active)
        assert torch.equal(ref_opt.steps, fused_opt.steps)
        for r, f in zip(ref_opt.exp_avg + ref_opt.exp_avg_sq, fused_opt.exp_avg + fused_opt.exp_avg_sq):
            # measured bit-equal: the kernel does torch's ops in torch's order, with its fma where torch has one
            assert_torch_rounding(f, r)
        for r, f in zip(ref, fused):
            # torch's CPU float32 sqrt is not correctly rounded (1 ulp off for ~20% of inputs, measured); the kernel's
            # is. So p may differ by an ulp of the update each step, carried on: measured max 2.4e-7 after 8 steps
            # with |p| < 4.5; allowed: one float32 ulp of the largest |p| (eps * max|p|)
            torch.testing.assert_close(f, r, rtol=0, atol=torch.finfo(torch.float32).eps * r.abs().max().item())


@pytest.mark.parametrize("L", [1, 3])
def test_adamw_kernel_on_bfloat16_rounds_float32_math_once(L):
    """bf16 storage: the kernel computes in float32 and rounds once per stored value. Reference: the torch step on
    float32 copies, rounded to bf16. (torch's own bf16 step rounds its per-lane scalars and every intermediate to
    bf16 and lands up to 4 bf16 ulps away, measured.)"""
    gen = torch.Generator().manual_seed(20 + L)
    shapes = [(37, 29), (5,)]
    ref, fused, ref_opt, fused_opt = adamw_pair(gen, L, shapes, torch.bfloat16)
    ref32 = [p.detach().float().requires_grad_() for p in ref]
    ref32_opt = BatchedAdamW(ref32, BETAS, EPS)
    grads = [torch.randn(L, *s, generator=gen).bfloat16() for s in shapes]
    give_grads(ref32, [g.float() for g in grads])
    give_grads(fused, grads)
    lr, wd = (
        torch.rand(L, generator=gen, dtype=torch.float64) * 0.03,
        torch.rand(L, generator=gen, dtype=torch.float64) * 0.2,
    )
    active = torch.ones(L, dtype=torch.bool)
    ref32_opt.step(lr, wd, active)
    fused_opt.step(lr, wd, active)
    for r, f in zip(ref32 + ref32_opt.exp_avg + ref32_opt.exp_avg_sq, fused + fused_opt.exp_avg + fused_opt.exp_avg_sq):
        assert f.dtype == torch.bfloat16
        # one bf16 ulp: the float32 values differ by at most an ulp of float32 (sqrt, above) before rounding
        assert ((f.detach().double() - r.detach().double()).abs() <= bf16_ulp(r.detach())).all()


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the interpreter's numpy meets the NaN
def test_adamw_kernel_nan_lane_is_unwritten_and_isolated():
    gen = torch.Generator().manual_seed(30)
    L, shapes = 3, [(37, 29), (5,)]
    ref, fused, _, fused_opt = adamw_pair(gen, L, shapes)
    clean = [p.detach().clone().requires_grad_() for p in fused]
    clean_opt = BatchedAdamW(clean, BETAS, EPS, kernels="triton")
    lr, wd = torch.full((L,), 0.01, dtype=torch.float64), torch.full((L,), 0.1, dtype=torch.float64)
    for step in range(2):
        grads = [torch.randn(L, *s, generator=gen) for s in shapes]
        poisoned = [g.clone() for g in grads]
        poisoned[0][1, 3, 4], poisoned[1][1, 2] = float("nan"), float("inf")
        active = torch.tensor([True, step == 1, True])  # lane 1 inactive at its first NaN step, active at the second
        before = [t[1].clone() for t in fused + fused_opt.exp_avg + fused_opt.exp_avg_sq]
        give_grads(fused, poisoned)
        give_grads(clean, grads)
        fused_opt.step(lr, wd, active)
        clean_opt.step(lr, wd, active)
        lane1 = [t[1] for t in fused + fused_opt.exp_avg + fused_opt.exp_avg_sq]
        if step == 0:  # inactive: not written (a write would have been NaN)
            assert all(torch.equal(a, b) for a, b in zip(lane1, before))
        else:  # active with a NaN gradient: its own state goes NaN, as torch's would
            assert torch.isnan(fused_opt.exp_avg[0][1, 3, 4]) and torch.isnan(fused[0].detach()[1, 3, 4])
        for a, b in zip(
            fused + fused_opt.exp_avg + fused_opt.exp_avg_sq, clean + clean_opt.exp_avg + clean_opt.exp_avg_sq
        ):
            assert torch.equal(a.detach()[[0, 2]], b.detach()[[0, 2]])  # the other lanes: bit-equal to a clean run


# ---------------------------------------------------------------- Muon


def muon_reference(g, buf, momentum=0.95, nesterov=True):
    """BatchedMuon's torch ops before Newton-Schulz: the new buffer and the normalized bf16 update."""
    new_buf = buf.lerp(g, 1 - momentum)
    update = g.lerp(new_buf, momentum) if nesterov else new_buf
    return new_buf, normalized(update)


@pytest.mark.parametrize("L", [1, 3, 8])
@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_momentum_and_normalize_kernel_matches_torch(L, nesterov):
    from fractal_vmap.kernels.muon import momentum_normalize

    gen = torch.Generator().manual_seed(40 + L)
    for shape in [(67, 29), (29, 67)]:  # 1943 elements: several chunks of the interpreter's 512, the last one partial
        g, buf = torch.randn(L, *shape, generator=gen), torch.randn(L, *shape, generator=gen)
        g[0] *= 1e-3  # the norm is per matrix: lane 0 has a much smaller one
        want_buf, want_x = muon_reference(g, buf, nesterov=nesterov)
        active = torch.ones(L, dtype=torch.bool)
        active[L // 2] = L == 1  # one inactive lane (when there are several)
        x = torch.empty(L, *shape, dtype=torch.bfloat16)
        new_buf = buf.clone()
        momentum_normalize(g, new_buf, x, active, 0.95, nesterov, 1e-7)
        # measured bit-equal: the same lerps with torch's fma rounding; inactive lanes keep their old buffer
        assert_torch_rounding(new_buf[active], want_buf[active])
        assert torch.equal(new_buf[~active], buf[~active])
        # bit-equal (measured). The one place the kernel may round differently: it sums the squares in another order
        # than torch's vector_norm, so a norm within ~1e-7 of a bf16 rounding tie could round the other way and move
        # that matrix by one bf16 ulp. These inputs have none; with other seeds, check that first.
        assert_torch_rounding(x, want_x)


@pytest.mark.parametrize("L", [1, 3, 8])
def test_muon_update_kernel_matches_torch(L):
    from fractal_vmap.kernels.muon import apply_update

    gen = torch.Generator().manual_seed(50 + L)
    for rows, cols in [(67, 29), (29, 67)]:
        p = torch.randn(L, rows, cols, generator=gen)
        # transposed, as Newton-Schulz returns tall ones
        ortho = torch.randn(L, cols, rows, generator=gen).bfloat16().mT
        neg_lr = -(torch.rand(L, generator=gen, dtype=torch.float64) * 0.05) * max(1, rows / cols) ** 0.5
        active = torch.rand(L, generator=gen) < 0.7
        want = torch.where(active[:, None, None], torch.addcmul(p, ortho, neg_lr.float()[:, None, None]), p)
        got = p.clone()
        apply_update(got, ortho, neg_lr.float(), active)
        assert_torch_rounding(got, want)  # measured bit-equal: torch's addcmul is one fma, as the kernel's


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the interpreter's numpy meets the NaN
def test_muon_kernels_nan_lane_is_unwritten_and_isolated():
    gen = torch.Generator().manual_seed(60)
    L, shapes = 3, [(67, 29), (29, 67), (67, 29)]
    init = [torch.randn(L, *s, generator=gen) for s in shapes]
    fused, clean = ([x.clone().requires_grad_() for x in init] for _ in range(2))
    fused_opt, clean_opt = BatchedMuon(fused, kernels="triton"), BatchedMuon(clean, kernels="triton")
    lr = torch.full((L,), 0.02, dtype=torch.float64)
    grads = [torch.randn(L, *s, generator=gen) for s in shapes]
    poisoned = [g.clone() for g in grads]
    poisoned[0][1, 3, 4], poisoned[2][1, 0, 0] = float("nan"), float("inf")
    active = torch.tensor([True, False, True])
    before = [t[1].clone() for t in fused + fused_opt.momentum_buffer]
    give_grads(fused, poisoned)
    give_grads(clean, grads)
    fused_opt.step(lr, active)
    clean_opt.step(lr, active)
    assert all(torch.equal(t[1], b) for t, b in zip(fused + fused_opt.momentum_buffer, before))  # a write would be NaN
    for a, b in zip(fused + fused_opt.momentum_buffer, clean + clean_opt.momentum_buffer):
        assert torch.equal(a.detach()[[0, 2]], b.detach()[[0, 2]])


# ---------------------------------------------------------------- Newton-Schulz: the symmetric Gram kernel


@pytest.mark.parametrize("shape", [(3, 37, 53), (3, 53, 37), (1, 40, 40)])  # 16 x 16 tiles: partial ones on every edge
def test_symmetric_gram_kernel_is_the_rounded_exact_product(shape):
    from fractal_vmap.kernels.gram import symmetric_gram

    gen = torch.Generator().manual_seed(70)
    X = normalized(torch.randn(*shape, generator=gen))
    Y = X.mT if shape[1] > shape[2] else X  # a transposed view, as newton_schulz_iterations passes tall matrices
    A = symmetric_gram(Y)
    exact = Y.double() @ Y.double().mT
    assert torch.equal(A, A.mT)  # the mirror: below the diagonal is what was computed above it
    # float32 accumulation, then one rounding to bf16: measured max 0.55 bf16 ulp of the exact product
    assert ((A.double() - exact).abs() <= bf16_ulp(exact)).all()
    b, c = -4.7750, 2.0315
    B = symmetric_gram(A, C=A, alpha=c, beta=b)
    exact = b * A.double() + c * (A.double() @ A.double().mT)
    assert ((B.double() - exact).abs() <= bf16_ulp(exact)).all()  # measured max 0.5


def test_newton_schulz_with_the_gram_kernel_matches_bmm(monkeypatch):
    from fractal_vmap.kernels import gram

    monkeypatch.setattr(gram, "INTERPRET_BM", 32)  # 10 products per call: fewer, larger tiles keep this to seconds
    monkeypatch.setattr(gram, "INTERPRET_BK", 32)
    gen = torch.Generator().manual_seed(71)
    for shape in [(3, 37, 53), (3, 53, 37)]:
        X = normalized(torch.randn(*shape, generator=gen))
        want, got = newton_schulz_iterations(X.clone()), newton_schulz_iterations(X.clone(), gram="triton")
        assert got.shape == want.shape and got.dtype == torch.bfloat16
        # both round every product to bf16, each in its own summation order; a flipped ulp in A or B is carried
        # through 5 iterations. Entries are up to ~0.55; measured max difference 0.0068 over 50 matrices
        torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=2**-6)


# ---------------------------------------------------------------- both optimizers, end to end


def test_optimizers_with_triton_kernels_match_torch_over_steps():
    """A few lanes of random stacked params, several steps, lanes dropping out: kernels='triton' tracks 'torch'."""
    gen = torch.Generator().manual_seed(80)
    L, n_steps = 3, 4
    adamw_shapes, muon_shapes = [(41, 24), (7,)], [(48, 20), (20, 48), (48, 20)]
    init = [torch.randn(L, *s, generator=gen) for s in adamw_shapes + muon_shapes]
    runs = {}
    for kernels in ("torch", "triton"):
        params = [x.clone().requires_grad_() for x in init]
        adamw = BatchedAdamW(params[:2], BETAS, EPS, kernels=kernels)
        muon = BatchedMuon(params[2:], kernels=kernels)
        step_gen = torch.Generator().manual_seed(81)
        for step in range(n_steps):
            give_grads(params, [torch.randn(p.shape, generator=step_gen) for p in params])
            active = torch.tensor([True, step < 2, step != 1])
            lr = torch.rand(L, generator=step_gen, dtype=torch.float64) * 0.02
            adamw.step(lr, torch.full((L,), 0.1, dtype=torch.float64), active)
            muon.step(lr, active)
        runs[kernels] = (params, adamw.exp_avg + adamw.exp_avg_sq + muon.momentum_buffer)
    (ref_p, ref_state), (fused_p, fused_state) = runs["torch"], runs["triton"]
    for r, f in zip(ref_state, fused_state):
        assert_torch_rounding(f, r)  # the moments and momentum buffers: bit-equal, as in the tests above
    for r, f in zip(ref_p[:2], fused_p[:2]):  # AdamW: one float32 ulp of max|p| (torch's sqrt, see above)
        torch.testing.assert_close(
            f.detach(), r.detach(), rtol=0, atol=torch.finfo(torch.float32).eps * r.abs().max().item()
        )
    for r, f in zip(ref_p[2:], fused_p[2:]):  # Muon: bit-equal, as its parts above
        assert_torch_rounding(f.detach(), r.detach())


@pytest.mark.parametrize("shared", [False, True], ids=["per-lane-w", "shared-w"])
def test_head_kernel_lane_numbers_do_not_depend_on_the_lane_count(shared):
    """The engine's chunk invariance (lanes.py) holds for the Triton head too: lanes 0 and 1 of a 2-lane call and of a
    5-lane call are bit-identical, loss and gradients, with a shared (frozen) lm_head or one per lane."""
    gen = torch.Generator().manual_seed(31)
    L, N, C, V = 5, 70, 24, 97
    x = torch.randn(L, N, C, generator=gen)
    w = torch.randn(V, C, generator=gen) if shared else torch.randn(L, V, C, generator=gen)
    targets = torch.randint(-1, V, (L, N), generator=gen)

    def run(lanes: int):
        xs = x[:lanes].clone().requires_grad_()
        ws = w.clone() if shared else w[:lanes].clone().requires_grad_()
        losses = torch.vmap(
            lambda a, b, t: lanes_head_loss(a, b, t, kernels="triton"), in_dims=(0, None if shared else 0, 0)
        )(xs, ws, targets[:lanes])
        grads = torch.autograd.grad(losses.sum(), [xs] if shared else [xs, ws])
        return losses, grads

    few, many = run(2), run(5)
    assert torch.equal(few[0], many[0][:2])
    for a, b in zip(few[1], many[1]):
        assert torch.equal(a, b[:2])


def test_the_triton_head_softcaps_as_the_reference_head():
    """kernels/head.py reads one SOFTCAP constant, the reference head's (the kernel cannot import it)."""
    from fractal_vmap import head
    from fractal_vmap.kernels import head as kernel_head

    assert kernel_head.SOFTCAP == head.SOFTCAP
