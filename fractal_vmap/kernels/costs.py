"""What the Triton kernels and their torch references move, op by op: the bytes each reads and writes per element
(benchmarks/kernels.py prints these tables; on CUDA it measures the kernels against them), and the launches of one
call of each custom op of ops.py with their bytes and matmul shapes, which perf/roofline.py charges in a traced step.
Plain data and arithmetic: no torch, no triton.
"""

from dataclasses import dataclass

# (read, written) bytes per element of a float32 parameter; per-lane scalars [L] and masks are negligible.

ADAMW_TORCH = [  # optim.BatchedAdamW, kernels="torch"
    ("new_p = p * decay", 4, 4),
    ("new_m = m.lerp(g, 1 - beta1)", 8, 4),
    ("new_v = v * beta2", 4, 4),
    ("new_v.addcmul_(g, g)", 12, 4),
    ("new_v.sqrt()", 4, 4),
    ("/ bias_correction2", 4, 4),
    (".add_(eps)", 4, 4),
    ("new_m * -step_size", 4, 4),
    ("new_p.addcdiv_(., denom)", 12, 4),
    ("p.copy_(where(active, new_p, p))", 12, 8),
    ("m.copy_(where(active, new_m, m))", 12, 8),
    ("v.copy_(where(active, new_v, v))", 12, 8),
]
ADAMW_FUSED = [("adamw_kernel: read p, g, m, v; write p, m, v", 16, 12)]  # torch.optim.AdamW(fused=True) moves the same

MUON_TORCH = [  # optim.BatchedMuon, kernels="torch" (fp32 params, the update in bf16)
    ("new_buf = buf.lerp(g, 1 - momentum)", 8, 4),
    ("update = g.lerp(new_buf, momentum)", 8, 4),
    ("buf.copy_(where(active, new_buf, buf))", 12, 8),
    ("torch.cat(updates)", 4, 4),
    (".to(bfloat16)", 4, 2),
    ("vector_norm", 2, 0),
    ("div_(norm)", 2, 2),
    ("[Newton-Schulz]", 0, 0),
    ("addcmul(p, O, -lr)", 6, 4),
    ("p.copy_(where(active, new_p, p))", 12, 8),
]
MUON_FUSED = [
    ("momentum_kernel: read g, buf; write buf, bf16 X", 8, 6),
    ("normalize_kernel: X /= norm", 2, 2),
    ("[Newton-Schulz]", 0, 0),
    ("update_kernel: p += -lr * O", 6, 4),
]

# per logit of the [tokens, vocab] lm_head output, bf16 autocast (the matmuls themselves are the same on both sides)
HEAD_TORCH = [  # head.head_loss and its autograd backward, one lane at a time
    ("linear -> bf16 logits", 0, 2),
    (".float()", 2, 4),
    ("/ 15", 4, 4),
    ("tanh", 4, 4),
    ("* 15", 4, 4),
    ("log_softmax (max, sum, out)", 12, 4),
    ("nll backward (grad)", 0, 4),
    ("log_softmax backward", 12, 4),
    ("* 15 backward", 4, 4),
    ("tanh backward", 8, 4),
    ("/ 15 backward", 4, 4),
    ("to bf16 backward", 4, 2),
    ("dz read by the dx and dw matmuls", 4, 0),
]
HEAD_FUSED = [  # kernels/head.py, per chunk of tokens
    ("bmm -> bf16 logits chunk", 0, 2),
    ("ce_kernel sweep 1: logsumexp", 2, 0),
    ("ce_kernel sweep 2: dz over z", 2, 2),
    ("dz read by the dx and dw matmuls", 4, 0),
]


def per_element(table: list[tuple[str, int, int]], start: int = 0, stop: int | None = None) -> int:
    """Bytes read + written per element by the ops table[start:stop]."""
    return sum(r + w for _, r, w in table[start:stop])


@dataclass(frozen=True)
class Launch:
    """One kernel launch: the bytes it moves and, for a matmul, its (batch, m, n, k) at `dtype_bytes` a value."""

    name: str
    bytes: float
    matmul: tuple[int, int, int, int] | None = None


def adamw_launches(numel: int) -> list[Launch]:
    """ops.adamw_step on a float32 parameter of numel elements (all lanes): one pass, read p, g, m, v, write p, m, v."""
    return [Launch("triton adamw", per_element(ADAMW_FUSED) * numel)]


def muon_momentum_launches(numel: int) -> list[Launch]:
    """ops.muon_momentum: the momentum pass (g, buf -> buf, bf16 X) and the normalize pass over X."""
    return [
        Launch("triton muon momentum", per_element(MUON_FUSED, 0, 1) * numel),
        Launch("triton muon normalize", per_element(MUON_FUSED, 1, 2) * numel),
    ]


def muon_update_launches(numel: int) -> list[Launch]:
    """ops.muon_update: p += -lr * O (read p, bf16 O; write p)."""
    return [Launch("triton muon update", per_element(MUON_FUSED, 3, 4) * numel)]


def head_launches(
    L: int, N: int, C: int, V: int, chunk: int, shared_w: bool, need_dx: bool, need_dw: bool, x_bytes: int, w_bytes: int
) -> list[Launch]:
    """ops.lanes_head (kernels/head.py) at bf16 compute: the casts of x and w, then per chunk of tokens the logits bmm,
    ce_kernel's two sweeps, the dx bmm (float32 out) and the dw baddbmm (float32 accumulator read and written)."""
    w_numel = (1 if shared_w else L) * V * C
    out = [Launch("head cast x", L * N * C * (x_bytes + 2)), Launch("head cast w", w_numel * (w_bytes + 2))]
    for start in range(0, N, chunk):
        n = min(chunk, N - start)
        logits = L * n * V
        out.append(Launch("head logits bmm", L * n * C * 2 + w_numel * 2 + logits * 2, (L, n, V, C)))
        out.append(Launch("triton head cross-entropy", logits * per_element(HEAD_FUSED, 1, 3)))
        if need_dx:
            out.append(Launch("head dx bmm", logits * 2 + w_numel * 2 + L * n * C * 4, (L, n, C, V)))
        if need_dw:
            out.append(Launch("head dw bmm", logits * 2 + L * n * C * 2 + L * V * C * 8, (L, V, C, n)))
    return out
