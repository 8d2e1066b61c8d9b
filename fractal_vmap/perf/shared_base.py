"""The shape of a LoRA row's step in the runtime projection: the shared frozen base's matmuls against the adapters'.

Under vmap, `x @ W_base` with an unbatched W_base and the lanes' activations [L, B, T, in] is one aten.mm of
[L*B*T, in] @ [in, out]: M grows with the lanes, the weight is read once whatever their number (and where the lanes'
input is still shared, the first block's q, k and v before any adapter acts, M is B*T: computed once for all lanes).
Each lane's adapters are batched matmuls [L, B*T, in] @ [L, in, R] and [L, B*T, R] @ [L, R, out] (and their
backwards), one R-wide dimension each. The frozen lm_head's matmuls run in the lanes' head (kernels/ops.py), also
against one shared weight. roofline.py traces the real step and times every matmul; this sums them up by kind and
shape. On the path traced (the Triton head, flash attention) a LoRA row's only aten matmuls are these two kinds, told
apart by what vmap made of them: an mm reads an unbatched (shared, frozen) weight, a bmm the lanes' own adapters.
"""


def shared_base(matmuls: list, rank: int, row_gpu_s: float, by_op: dict[str, float], tokens: int) -> dict:
    """The traced matmuls (roofline.Matmul) of a LoRA row's step, by kind ("base": the frozen weights', "adapters")
    and shape: their count, projected seconds, share of the row's GPU time (`row_gpu_s`), FLOPs and weight bytes
    read; the head's matmuls from `by_op`; `tokens` = lanes x batch x seq, the M of the lanes' base matmuls."""
    kinds: dict[str, dict[tuple, dict]] = {"base": {}, "adapters": {}}
    for mm in matmuls:
        shapes = kinds["base" if mm.batch == 1 else "adapters"]  # one mm for every lane, or a bmm of per-lane ones
        key = (mm.batch, mm.m, mm.k, mm.n)
        group = shapes.setdefault(key, {"shape": list(key), "count": 0, "seconds": 0.0, "flops": 0, "weight_bytes": 0})
        group["count"] += 1
        group["seconds"] += mm.seconds
        group["flops"] += mm.flops
        group["weight_bytes"] += mm.weight_bytes
    out: dict = {"rank": rank, "tokens": tokens, "row_gpu_s": row_gpu_s}
    for kind, shapes in kinds.items():
        groups = sorted(shapes.values(), key=lambda g: -g["seconds"])
        seconds = sum(g["seconds"] for g in groups)
        out[kind] = {
            "matmuls": sum(g["count"] for g in groups),
            "seconds": seconds,
            "share": seconds / row_gpu_s,
            "flops": sum(g["flops"] for g in groups),
            "weight_bytes": sum(g["weight_bytes"] for g in groups),
            "shapes": groups,
        }
    head = sum(t for name, t in by_op.items() if name.startswith("head ") and name.endswith("bmm"))
    out["head"] = {"seconds": head, "share": head / row_gpu_s}
    return out


def shape_text(shape: list[int]) -> str:
    """[batch, m, k, n] as the product it is: "[m, k] @ [k, n]" (an mm) or "[b, m, k] @ [b, k, n]"."""
    b, m, k, n = shape
    lead = "" if b == 1 else f"{b}, "
    return f"[{lead}{m}, {k}] @ [{lead}{k}, {n}]"


def print_shared_base(s: dict, lanes: int, batch: int, seq: int, console) -> None:
    """The summary as lines and a table under the plan's projection, labelled PROJECTED."""
    from rich.markup import escape
    from rich.table import Table

    base, adapters, head = s["base"], s["adapters"], s["head"]
    shared = sum(g["count"] for g in base["shapes"] if g["shape"][1] == batch * seq)
    text = (
        f"PROJECTED, the shared-base matmuls: {base['matmuls']} a step, one [M, in] @ [in, out] per frozen matrix and "
        f"pass with M = lanes x batch x seq = {lanes} x {batch} x {seq} = {s['tokens']:,} (but {shared}, on the "
        f"lanes' shared batch before any adapter acts, e.g. the first block's q, k, v: M = {batch * seq:,}, once for "
        "all lanes); each weight read once "
        f"whatever the lanes ({base['weight_bytes'] / 2**30:.2f} GiB a step): {base['seconds'] * 1e3:.1f} ms, "
        f"{base['share']:.0%} of the row's GPU time. The adapters (rank {s['rank']}): {adapters['matmuls']} batched "
        f"matmuls [L, B*T, .] @ [L, ., .], {adapters['seconds'] * 1e3:.1f} ms, {adapters['share']:.0%}. The head's "
        f"matmuls on the frozen lm_head (shared too): {head['seconds'] * 1e3:.1f} ms, {head['share']:.0%}."
    )
    console.print(escape(text))
    table = Table(title="PROJECTED matmuls of the LoRA row's step by shape (forward and backward)")
    for name in ("kind", "shape [batch, M, K] @ [batch, K, N]", "count", "ms", "share"):
        table.add_column(escape(name), justify="right")
    for kind in ("base", "adapters"):
        for g in s[kind]["shapes"]:
            table.add_row(
                kind,
                shape_text(g["shape"]),
                str(g["count"]),
                f"{g['seconds'] * 1e3:.2f}",
                f"{g['seconds'] / s['row_gpu_s']:.1%}",
            )
    console.print(table)
