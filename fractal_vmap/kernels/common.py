"""Triton helpers shared by the kernels here: torch's lerp, and stores rounded to nearest even.

Triton's interpreter truncates float32 -> bfloat16 casts (its `to` drops the low bits), where a GPU rounds to
nearest even. Rounding by hand first makes the cast exact, so the interpreter and the GPU store the same bits.
"""

import triton
import triton.language as tl


@triton.jit
def lerp(start, end, weight):
    """torch.lerp as its CPU and CUDA kernels round it: one fma from `start` for weights below 0.5, else from `end`."""
    diff = end - start
    return tl.where(weight < 0.5, tl.fma(weight, diff, start), tl.fma(weight - 1, diff, end))


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
