"""A grid row with --kernels triton (Triton's interpreter on CPU) against the same row with the torch references:
same labels, losses within the noise floor where training is tame, one lane diverging in the row."""

import pytest
import torch

from fractal_vmap.lanes import train_lanes
from fractal_vmap.recipe import FinetuneConfig
from fractal_vmap.sft import load_source, make_stream, render_split, total_steps

CPU = torch.device("cpu")
# The kernels round differently from the torch path by an ulp here and there (AdamW's sqrt, the head's float32 dx, dw:
# tests/test_kernels.py), which is a reordered-sum-sized difference: the trajectory noise floor of tests/test_lanes.py
# applies, 2 x lr at lr <= 0.01. The diverging lane's labels are compared.
LOSS_TOL_PER_LR = 2.0
LRS = (0.01, 3e12)  # tame; diverging (NaN within 10 steps). Two lanes: the interpreter's cost grows with the lanes


@pytest.fixture(scope="module")
def wide_interpreter_blocks():
    """The interpreter pays per op of each program, not per element: the kernels' interpreter block sizes are small so
    that tests/test_kernels.py's small tensors span several blocks. A whole row of the default model needs whole
    tensors per program (a few hundred times faster); the GPU's block sizes are another matter and are not used here."""
    from fractal_vmap.kernels import adamw, head, muon

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(adamw, "INTERPRET_BLOCK", 1 << 15)
        mp.setattr(muon, "INTERPRET_BLOCK", 1 << 14)
        mp.setattr(muon, "INTERPRET_ITERS", 1)
        mp.setattr(muon, "INTERPRET_TILE", 256)
        mp.setattr(head, "INTERPRET_BLOCK_N", 1 << 11)  # x BLOCK_V: at most triton's 2^20 elements a block
        mp.setattr(head, "INTERPRET_BLOCK_V", 512)
        yield


@pytest.fixture(scope="module")
def rows(default_model, wide_interpreter_blocks):
    base = FinetuneConfig(device="cpu", num_tokens=2100)  # 30 steps of the default stream
    config, params, tokenizer = load_source(base, CPU)
    stream = make_stream(base, tokenizer, render_split(base, tokenizer, config, "train")[0], base.seed)
    steps = total_steps(base, stream.batch(0)[1])
    cfgs = [FinetuneConfig(device="cpu", num_tokens=2100, learning_rate=lr, run_name=f"lr{lr:g}") for lr in LRS]
    return steps, {
        k: train_lanes(cfgs, config, params, stream.batch, [steps] * len(LRS), CPU, kernels=k)
        for k in ("torch", "triton")
    }


def test_triton_row_matches_the_torch_row(rows):
    steps, by_kernels = rows
    assert steps >= 30
    for lr, ref, got in zip(LRS, by_kernels["torch"], by_kernels["triton"]):
        assert (got.stable, got.converged) == (ref.stable, ref.converged), lr
        if lr <= 0.01:
            gap = max(abs(a - b) for a, b in zip(got.losses, ref.losses))
            assert len(got.losses) == len(ref.losses) == steps and gap <= LOSS_TOL_PER_LR * lr, (lr, gap)
    assert [(r.stable, r.converged) for r in by_kernels["triton"]] == [(True, True), (False, False)]
