"""Lane-batched optimizers: every weight is stacked [L, ...], one independent run per lane.

Lane i of BatchedAdamW / BatchedMuon does what torch.optim.AdamW / torch.optim.Muon does to
that lane's slice with lane i's learning rate. Per-lane scalars are computed in float64 (torch
does that math on Python floats) and cast to the parameter dtype where torch's kernel casts its
scalar. Lanes marked inactive keep parameters and state untouched, via torch.where, so a NaN in
one lane never reaches another. Nothing here syncs with the host.

`kernels="triton"` runs the same steps as fused Triton kernels (fractal_vmap/kernels/adamw.py and muon.py); the code
below is their reference, and tests/test_kernels.py compares the two.
"""

import math

import torch
from torch import Tensor

from fractal_vmap.kernels import resolve

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # quintic Newton-Schulz coefficients, as torch.optim.Muon
NS_EPS = 1e-7  # Newton-Schulz divides by max(norm, eps), as torch.optim.Muon


def lr_multiplier(step: int, total_steps: Tensor, warmup_frac: Tensor, final_lr_frac: Tensor) -> Tensor:
    """Per-lane lr multiplier, float64 [L]: linear warmup, then cosine from 1 down to final_lr_frac."""
    total = total_steps.double()
    warmup = torch.floor(total * warmup_frac.double()).clamp(min=1)
    warm = (step + 1) / warmup
    # progress is clamped at 1 so lanes past their last step stay at final_lr_frac
    progress = ((step - warmup) / (total - warmup).clamp(min=1)).clamp(max=1)
    final = final_lr_frac.double()
    cosine = final + (1 - final) * 0.5 * (1 + torch.cos(math.pi * progress))
    return torch.where(step < warmup, warm, cosine)


def lr_multiplier_scalar(step: int, total_steps: int, warmup_frac: float, final_lr_frac: float) -> float:
    """Plain-Python twin of lr_multiplier for a single run."""
    warmup = max(1, math.floor(total_steps * warmup_frac))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return final_lr_frac + (1 - final_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress))


def _lanes(x: Tensor, like: Tensor) -> Tensor:
    """View a per-lane vector [L] as [L, 1, 1, ...] so it broadcasts against `like`."""
    return x.view(-1, *([1] * (like.ndim - 1)))


def zero_grad(params: list[Tensor]) -> None:
    for p in params:
        p.grad = None


class BatchedAdamW:
    """AdamW with decoupled weight decay, one independent state per lane. kernels: "torch", "triton" or "auto"."""

    def __init__(
        self, params: list[Tensor], betas: tuple[float, float] = (0.8, 0.95), eps: float = 1e-10, kernels: str = "torch"
    ):
        self.params = list(params)
        self.kernels = resolve(kernels, self.params[0].device)
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        L = self.params[0].shape[0]
        self.steps = torch.zeros(L, dtype=torch.float64, device=self.params[0].device)

    def select(self, index: Tensor) -> None:
        """Keep only the state of the lanes at `index`, a tensor at a time (the caller puts the narrowed params in
        self.params, so that each old tensor is freed as its new one is made)."""
        for state in (self.exp_avg, self.exp_avg_sq):
            for i, t in enumerate(state):
                state[i] = t[index]
        self.steps = self.steps[index]

    @torch.no_grad()
    def step(self, lr: Tensor, weight_decay: Tensor, active: Tensor) -> None:
        """lr, weight_decay: float64 [L]; active: bool [L]. Inactive lanes are left as they are."""
        self.steps += active.double()
        # per-lane scalars in float64, as torch does them on Python floats
        # (a lane that never stepped divides by 0 here; where() below drops it)
        decay = 1 - lr * weight_decay
        bias_correction1 = 1 - self.beta1**self.steps
        bias_correction2_sqrt = (1 - self.beta2**self.steps).sqrt()
        step_size = lr / bias_correction1
        if self.kernels == "triton":
            from fractal_vmap.kernels.ops import adamw_step  # the kernel as a custom op (ops.py: traceable)

            # the same per-lane scalars, rounded to float32 as below; a never-stepped lane's (inactive: nothing of it
            # is written) set to 1, so that the kernel computes no inf or NaN it would then drop
            scalars = torch.stack([decay, -step_size, bias_correction2_sqrt]).float()
            scalars = torch.where(self.steps > 0, scalars, 1.0)
            for p, exp_avg, exp_avg_sq in zip(self.params, self.exp_avg, self.exp_avg_sq):
                if p.grad is not None:
                    adamw_step(
                        p.detach(), p.grad, exp_avg, exp_avg_sq, scalars, active, self.beta1, self.beta2, self.eps
                    )
            return
        for p, exp_avg, exp_avg_sq in zip(self.params, self.exp_avg, self.exp_avg_sq):
            if p.grad is None:
                continue
            g = p.grad
            mask = _lanes(active, p)
            new_p = p * _lanes(decay.to(p.dtype), p)
            new_avg = exp_avg.lerp(g, 1 - self.beta1)
            new_sq = (exp_avg_sq * self.beta2).addcmul_(g, g, value=1 - self.beta2)
            denom = (new_sq.sqrt() / _lanes(bias_correction2_sqrt.to(p.dtype), p)).add_(self.eps)
            # torch's addcdiv_(exp_avg, denom, value=-step_size) computes p + (value * exp_avg) / denom
            new_p.addcdiv_(new_avg * _lanes((-step_size).to(p.dtype), p), denom)
            p.copy_(torch.where(mask, new_p, p))
            exp_avg.copy_(torch.where(mask, new_avg, exp_avg))
            exp_avg_sq.copy_(torch.where(mask, new_sq, exp_avg_sq))


def newton_schulz(G: Tensor, steps: int = 5, eps: float = NS_EPS, gram: str = "torch") -> Tensor:
    """Orthogonalize each matrix of G [N, r, c] in bfloat16, exactly as torch.optim.Muon does per matrix (gram
    "torch")."""
    return newton_schulz_iterations(normalized(G, eps), steps, gram)


def normalized(G: Tensor, eps: float = NS_EPS) -> Tensor:
    """G [N, r, c] in bfloat16, each matrix divided by its own Frobenius norm, so its spectral norm is at most 1."""
    X = G.to(dtype=torch.bfloat16, copy=True)
    return X.div_(torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True).clamp(min=eps))


def newton_schulz_iterations(X: Tensor, steps: int = 5, gram: str = "torch") -> Tensor:
    """The quintic iterations on X [N, r, c] bfloat16, each matrix already normalized; transposed when r > c.
    gram="triton" computes the two symmetric products (X X^T and A A^T) with kernels/gram.py, half of each."""
    a, b, c = NS_COEFFS
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    if gram == "triton":
        from fractal_vmap.kernels.gram import symmetric_gram
    for _ in range(steps):
        if gram == "triton":
            A = symmetric_gram(X)
            B = symmetric_gram(A, C=A, alpha=c, beta=b)  # b A + c A @ A, and A @ A = A A^T as A is symmetric
        else:
            A = X @ X.mT
            B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a)
    if tall:
        X = X.mT
    return X


class BatchedMuon:
    """Muon (Nesterov momentum + Newton-Schulz), no weight decay, one independent state per lane.
    kernels: "torch", "triton" or "auto"; gram: "torch" (batched matmuls) or "triton" (kernels/gram.py: half of each
    symmetric product; off by default, "auto" included, until a GPU measurement shows it wins)."""

    def __init__(
        self,
        params: list[Tensor],
        momentum: float = 0.95,
        nesterov: bool = True,
        kernels: str = "torch",
        gram: str = "torch",
        momentum_dtype: torch.dtype | None = None,
    ):
        self.params = list(params)
        assert all(p.ndim == 3 for p in self.params), "BatchedMuon takes stacked matrices [L, r, c]"
        self.kernels = resolve(kernels, self.params[0].device)
        self.gram = "torch" if gram == "auto" else resolve(gram, self.params[0].device)  # auto: not shown to win yet
        self.momentum = momentum
        self.nesterov = nesterov
        # momentum_dtype bfloat16 halves the buffers' memory; they are then rounded every step (the numbers change)
        assert momentum_dtype in (None, torch.float32) or self.kernels == "torch", (
            "the fused Muon kernels keep float32 momentum"
        )
        self.momentum_buffer = [torch.zeros_like(p, dtype=momentum_dtype) for p in self.params]

    def select(self, index: Tensor) -> None:
        """Keep only the state of the lanes at `index` (see BatchedAdamW.select)."""
        for i, t in enumerate(self.momentum_buffer):
            self.momentum_buffer[i] = t[index]

    @torch.no_grad()
    def step(self, lr: Tensor, active: Tensor) -> None:
        """lr: float64 [L]; active: bool [L]. Inactive lanes are left as they are."""
        if self.kernels == "triton":
            return self._fused_step(lr, active)
        # momentum, then group the updates by matrix shape so each shape gets one batched NS call
        by_shape: dict[tuple[int, int], list[tuple[Tensor, Tensor]]] = {}
        for p, buf in zip(self.params, self.momentum_buffer):
            if p.grad is None:
                continue
            g = p.grad
            new_buf = buf.to(g.dtype).lerp(g, 1 - self.momentum)  # (a no-op .to for float32 momentum)
            update = g.lerp(new_buf, self.momentum) if self.nesterov else new_buf
            buf.copy_(torch.where(_lanes(active, buf), new_buf, buf))
            by_shape.setdefault(tuple(p.shape[1:]), []).append((p, update))
        for (rows, cols), group in by_shape.items():
            ortho = newton_schulz(torch.cat([update for _, update in group]), gram=self.gram)
            # torch's 'original' adjust_lr: lr * sqrt(max(1, rows / cols))
            neg_lr = -(lr * math.sqrt(max(1, rows / cols)))
            lanes = group[0][0].shape[0]
            for (p, _), o in zip(group, ortho.split(lanes)):
                # same rounding as torch's param.add_(bf16_update, alpha=-adjusted_lr)
                new_p = torch.addcmul(p, o, _lanes(neg_lr.to(p.dtype), p))
                p.copy_(torch.where(_lanes(active, p), new_p, p))

    def _fused_step(self, lr: Tensor, active: Tensor) -> None:
        """The same step with kernels/muon.py: one pass before Newton-Schulz and one after, per parameter."""
        from fractal_vmap.kernels.ops import muon_momentum, muon_update  # the kernels as custom ops (ops.py)

        by_shape: dict[tuple[int, int], list[tuple[Tensor, Tensor]]] = {}
        for p, buf in zip(self.params, self.momentum_buffer):
            if p.grad is not None:
                by_shape.setdefault(tuple(p.shape[1:]), []).append((p, buf))
        for (rows, cols), group in by_shape.items():
            L = group[0][0].shape[0]
            X = torch.empty(len(group) * L, rows, cols, dtype=torch.bfloat16, device=group[0][0].device)
            for (p, buf), x in zip(group, X.split(L)):
                muon_momentum(p.grad, buf, x, active, self.momentum, self.nesterov, NS_EPS)
            ortho = newton_schulz_iterations(X, gram=self.gram)
            neg_lr = (-(lr * math.sqrt(max(1, rows / cols)))).float()  # float64, rounded as above for float32 params
            for (p, _), o in zip(group, ortho.split(L)):
                muon_update(p.detach(), o, neg_lr, active)
