"""Lane-batched optimizers: every weight is stacked [L, ...], one independent run per lane.

Lane i of BatchedAdamW / BatchedMuon does what torch.optim.AdamW / torch.optim.Muon does to
that lane's slice with lane i's learning rate. Per-lane scalars are computed in float64 (torch
does that math on Python floats) and cast to the parameter dtype where torch's kernel casts its
scalar. Lanes marked inactive keep parameters and state untouched, via torch.where, so a NaN in
one lane never reaches another. Nothing here syncs with the host.
"""

import math

import torch
from torch import Tensor

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # quintic Newton-Schulz coefficients, as torch.optim.Muon


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
    """AdamW with decoupled weight decay, one independent state per lane."""

    def __init__(self, params: list[Tensor], betas: tuple[float, float] = (0.8, 0.95), eps: float = 1e-10):
        self.params = list(params)
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        L = self.params[0].shape[0]
        self.steps = torch.zeros(L, dtype=torch.float64, device=self.params[0].device)

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


def newton_schulz(G: Tensor, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """Orthogonalize each matrix of G [N, r, c] in bfloat16, exactly as torch.optim.Muon does per matrix."""
    a, b, c = NS_COEFFS
    X = G.to(dtype=torch.bfloat16, copy=True)
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    # each matrix divided by its own Frobenius norm, so its spectral norm is at most 1
    X.div_(torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True).clamp(min=eps))
    for _ in range(steps):
        gram = X @ X.mT
        gram_update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        X = torch.baddbmm(X, gram_update, X, beta=a)
    if tall:
        X = X.mT
    return X


class BatchedMuon:
    """Muon (Nesterov momentum + Newton-Schulz), no weight decay, one independent state per lane."""

    def __init__(self, params: list[Tensor], momentum: float = 0.95, nesterov: bool = True):
        self.params = list(params)
        assert all(p.ndim == 3 for p in self.params), "BatchedMuon takes stacked matrices [L, r, c]"
        self.momentum = momentum
        self.nesterov = nesterov
        self.momentum_buffer = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self, lr: Tensor, active: Tensor) -> None:
        """lr: float64 [L]; active: bool [L]. Inactive lanes are left as they are."""
        # momentum, then group the updates by matrix shape so each shape gets one batched NS call
        by_shape: dict[tuple[int, int], list[tuple[Tensor, Tensor]]] = {}
        for p, buf in zip(self.params, self.momentum_buffer):
            if p.grad is None:
                continue
            g = p.grad
            new_buf = buf.lerp(g, 1 - self.momentum)
            update = g.lerp(new_buf, self.momentum) if self.nesterov else new_buf
            buf.copy_(torch.where(_lanes(active, buf), new_buf, buf))
            by_shape.setdefault(tuple(p.shape[1:]), []).append((p, update))
        for (rows, cols), group in by_shape.items():
            ortho = newton_schulz(torch.cat([update for _, update in group]))
            # torch's 'original' adjust_lr: lr * sqrt(max(1, rows / cols))
            neg_lr = -(lr * math.sqrt(max(1, rows / cols)))
            lanes = group[0][0].shape[0]
            for (p, _), o in zip(group, ortho.split(lanes)):
                # same rounding as torch's param.add_(bf16_update, alpha=-adjusted_lr)
                new_p = torch.addcmul(p, o, _lanes(neg_lr.to(p.dtype), p))
                p.copy_(torch.where(_lanes(active, p), new_p, p))
