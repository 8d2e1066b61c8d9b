"""Triton kernels for the hot loop, each beside its plain-torch reference in fractal_vmap/ (optim.py, head.py).

The import path is `fractal_vmap.kernels`, never a top-level `kernels`: that name belongs to Hugging Face's
`kernels` package, which nanochat depends on. Nothing here imports triton: the kernel modules (adamw, muon,
gram, head) do, and they are imported only when a "triton" path runs, so the engine works on a bare torch install.

Selection: "torch" (the references), "triton" (these kernels) or "auto" (triton on CUDA when it imports, else
torch). "triton" on a CPU tensor runs Triton's interpreter, which needs TRITON_INTERPRET=1 in the environment before
the kernels are first imported: slow, for tests and debugging only.
"""

import contextlib
import os

import torch

from fractal_vmap.errors import UserError

CHOICES = ("auto", "torch", "triton")

CHUNK_BYTES = 64 * 2**20  # logits buffer per lane: vocab 65536 in float32 -> 256 tokens a chunk (16 lanes: 1 GiB)


def chunk_tokens(vocab: int, dtype: torch.dtype) -> int:
    """Tokens per chunk of the lanes' head: CHUNK_BYTES of logits per lane. It depends on the vocab and dtype only, not
    on the number of lanes, so a lane's sums run in the same order whatever its neighbours."""
    return max(16, CHUNK_BYTES // (vocab * torch.finfo(dtype).bits // 8))


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_available() -> bool:
    """Whether triton imports (it comes with the CUDA torch wheels; a bare torch install has none)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve(kernels: str, device: torch.device | str) -> str:
    """ "auto" -> "triton" on CUDA when triton imports, else "torch"; "torch" and "triton" pass through, checked."""
    device = torch.device(device)
    if kernels not in CHOICES:
        raise UserError(f"unknown kernels {kernels!r}: use one of {', '.join(CHOICES)}")
    if kernels == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if kernels == "triton":
        check_triton(device)
    return kernels


_tracing = False  # within tracing(): the Triton path on CPU tensors, as their custom ops' fake implementations


@contextlib.contextmanager
def tracing():
    """Take the Triton path on (fake) CPU tensors without the interpreter, for a step traced under FakeTensorMode
    (perf/roofline.py, tasks/nanochat/memory.py): the kernels enter it as custom ops (ops.py) whose fake
    implementations run, never a Triton kernel, so the device check has nothing to guard."""
    global _tracing
    before, _tracing = _tracing, True
    try:
        yield
    finally:
        _tracing = before


def check_triton(device: torch.device | str) -> None:
    """Raise a UserError unless the Triton kernels can run on `device`; call it before any work is done."""
    device = torch.device(device)
    if _tracing:
        return
    if not triton_available():
        raise UserError(
            "kernels 'triton' asked for but triton is not installed: install triton, or use kernels 'torch'"
        )
    if device.type == "cpu" and not interpreting():
        raise UserError(
            "kernels 'triton' on CPU tensors need TRITON_INTERPRET=1 set before start (Triton's slow "
            "interpreter, for tests and debugging): set it, or use kernels 'torch' on CPU"
        )
    if device.type not in ("cpu", "cuda"):
        raise UserError(
            f"kernels 'triton' run on CUDA (or on CPU under TRITON_INTERPRET=1), not on {device.type}: use kernels "
            "'torch'"
        )
