"""Triton helpers shared by the kernels here: torch's lerp, and stores rounded to nearest even.

Triton's interpreter truncates float32 -> bfloat16 casts (its `to` drops the low bits), where a GPU rounds to
nearest even. Rounding by hand first makes the cast exact, so the interpreter and the GPU store the same bits.
It also keeps float scalar arguments as Python floats, so arithmetic between two of them runs in float64 there but
in float32 on a GPU: the kernels here do none; such values (lerp's weight - 1) come computed from the host.
"""

import torch
import triton
import triton.language as tl


def lerp_weights(weight: float) -> tuple[float, float]:
    """(weight, weight - 1) as torch's lerp kernels compute them for a float32 tensor: weight rounded to float32."""
    w = torch.tensor(weight, dtype=torch.float32)
    return w.item(), (w - 1).item()


@triton.jit
def lerp(start, end, weight, weight_minus_1):
    """torch.lerp as its CPU and CUDA kernels round it: one fma from `start` for weights below 0.5, else from `end`
    (torch's CPU kernel, measured bit-equal). weight_minus_1: from lerp_weights."""
    diff = end - start
    return tl.where(weight < 0.5, tl.fma(weight, diff, start), tl.fma(weight_minus_1, diff, end))


@triton.jit
def round_to_bf16(x):
    """The bfloat16 value nearest to float32 x (ties to even), still as float32; NaN stays NaN."""
    bits = x.to(tl.uint32, bitcast=True)
    lsb = (bits >> 16) & 1  # the last bit kept: a tie rounds towards the even neighbour
    bits = (bits + 0x7FFF + lsb) & 0xFFFF0000  # carries into the exponent as it should (max finite -> inf)
    return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))


@triton.jit
def store(ptr, x, mask):
    """tl.store of float32 x into ptr's dtype, rounded to nearest even."""
    if ptr.dtype.element_ty == tl.bfloat16:
        x = round_to_bf16(x)
    tl.store(ptr, x.to(ptr.dtype.element_ty), mask=mask)
