"""The compiled row step (compiled.py) against the eager one: equal within the trajectory noise floor, a lane's numbers
independent of its chunk bit for bit, compaction and stepping in the backward changing no number, and one compile per
shape, reused by every later row.

The fixture model trains all three groups (the trainable embedding's backward is a scatter-add, the one compiled op
that needed deterministic mode). Batches alternate between 50 and 60 tokens: both padded to 64, one bucket. Compiles
are what this file spends its time on (~20 s each on 2 shared cores): two graphs in all, lane counts 4 and 2.
"""

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from fractal_vmap.errors import UserError
from fractal_vmap.options import FinetuneConfig
from fractal_vmap.sources import load_model
from fractal_vmap.tasks.nanochat import compiled
from fractal_vmap.tasks.nanochat.levers import Levers
from fractal_vmap.tasks.nanochat.row import train_lanes

FIXTURE = Path(__file__).parent / "fixtures" / "nanochat-d2"
CPU = torch.device("cpu")
STEPS = 10
# Lanes vs finetune are held to 2 x lr at lr <= 0.01 (tests/test_lanes.py: 4x the largest float32 noise floor of a
# trajectory, benchmarks/fidelity.py). The compiled step differs from the eager one the same way, by rounding only
# (fused elementwise kernels, token sums over a padded length): measured here 8.9e-5 at lr 1e-3, 1.6e-3 at lr 3e-3 and
# 1.6e-4 at lr 1e-2 over 10 steps (AMD EPYC), within the floor. A wrong mask, a padded token counted or a mixed-up lane
# is O(0.1).
LOSS_TOL_PER_LR = 2.0
TAME_LRS = (0.001, 0.003, 0.01)
WILD_LR = 3e12  # tests/test_lanes.py's diverging lr: chaotic, so rounding decides when it overflows (not compared)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: these small shapes gain little from two, and on a shared machine a second OpenMP thread
    waiting for a busy core stalls every op (tests/test_bench.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def nanochat():
    config, params, _ = load_model(str(FIXTURE))
    traj = torch.load(FIXTURE / "trajectories.pt")
    inputs, targets = traj["batch_inputs"], traj["batch_targets"]

    def batches(step: int):
        """50 tokens on even steps, 60 on odd ones: two lengths, one padded shape."""
        return inputs[step % 30][:, : 50 + 10 * (step % 2)], targets[step % 30][:, : 50 + 10 * (step % 2)]

    return config, params, batches


def cfg(lr: float) -> FinetuneConfig:
    return FinetuneConfig(
        trainable_param_groups="all",
        weight_decay=0.0,
        warmup_frac=0.0,
        final_lr_frac=1.0,
        num_iterations=STEPS,
        device="cpu",
        learning_rate=lr,
        run_name=f"lr{lr:g}",
    )


CFGS = [cfg(lr) for lr in (*TAME_LRS[:2], WILD_LR, TAME_LRS[2])]


@pytest.fixture(scope="module")
def runs(nanochat):
    """The row eager, compiled whole (4 lanes), compiled in chunks of 2, its second lane alone (1 + an idle lane),
    whole with each layer stepped in the backward, and two shorter lanes (compaction to 2 lanes at step 4, and not);
    with the graphs compiled meanwhile (dynamo's count and compiled.py's shapes)."""
    config, params, batches = nanochat
    graphs0, shapes0 = counters["stats"]["unique_graphs"], len(compiled.shapes_compiled)

    def train(cfgs, compile: bool, steps: list[int] | None = None, **kwargs):
        return train_lanes(cfgs, config, params, batches, steps or [STEPS] * len(cfgs), CPU, compile=compile, **kwargs)

    out = {"eager": train(CFGS, False), "whole": train(CFGS, True)}
    out["chunks"] = train(CFGS[:2], True) + train(CFGS[2:], True)
    out["alone"] = train(CFGS[1:2], True)
    out["in_backward"] = train(CFGS, True, levers=Levers(step_in_backward=True))
    short = [STEPS, 4, STEPS, 4]  # at the sync after step 4, two lanes are done: the row goes on with 2
    out["compacted"], out["kept"] = (train(CFGS, True, short, sync_every=2, compact=c) for c in (True, False))
    out["graphs"] = counters["stats"]["unique_graphs"] - graphs0
    out["shapes"] = len(compiled.shapes_compiled) - shapes0
    return out


def same(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(x == y or (math.isnan(x) and math.isnan(y)) for x, y in zip(a, b))


def test_compiled_row_equals_eager_within_the_noise_floor(runs):
    for c, eager, fast in zip(CFGS, runs["eager"], runs["whole"]):
        if c.learning_rate == WILD_LR:  # chaos: rounding decides when it overflows, so only tame lanes compare
            continue
        assert fast.stable and len(fast.losses) == STEPS
        gap = max(abs(a - b) for a, b in zip(eager.losses, fast.losses))
        assert gap <= LOSS_TOL_PER_LR * c.learning_rate, f"{c.run_name}: max |dloss| {gap:.3g}"
        assert fast.tokens_seen == eager.tokens_seen  # padded positions are not supervised tokens
    # the compiled step did run (fused kernels round differently)
    assert runs["eager"][0].losses != runs["whole"][0].losses


def test_compiled_lanes_do_not_depend_on_their_chunk(runs):
    """Bit for bit: 4 lanes at once, 2 + 2, and one lane with an idle second lane."""
    for a, b in zip(runs["whole"], runs["chunks"]):
        assert same(a.losses, b.losses), a.run_name
    assert runs["alone"][0].losses == runs["whole"][1].losses


def test_compaction_and_stepping_in_the_backward_change_no_number(runs):
    """Dropping the done lanes (4 -> 2, a shape already compiled) and the optimizer steps in backward hooks: bit for
    bit."""
    for a, b in zip(runs["whole"], runs["in_backward"]):
        assert same(a.losses, b.losses), a.run_name
    for a, b in zip(runs["compacted"], runs["kept"]):
        assert same(a.losses, b.losses) and a.tokens_seen == b.tokens_seen, a.run_name


def test_one_compile_per_shape_reused_by_later_rows(runs):
    """Lane counts 4 and 2, one bucket (64): two graphs. The later rows (the chunks, the lone lane, the levers, the
    compacted row) are new rows of these shapes: they compiled nothing."""
    assert runs["shapes"] == runs["graphs"] == 2


def test_compaction_keeps_powers_of_two_lanes():
    assert [compiled.lane_counts(n) for n in (1, 2, 3, 4, 5, 8, 9)] == [2, 2, 4, 4, 8, 8, 16]


def test_bucket_pads_to_64_within_the_rotary_table():
    assert [compiled.bucket(t, 2560) for t in (1, 50, 64, 65, 1000)] == [64, 64, 64, 128, 1024]
    assert compiled.bucket(250, 256) == 256 and compiled.bucket(256, 256) == 256  # never past the table (nor below T)


def test_compile_choice():
    assert (
        compiled.resolve_compile("auto", CPU) is False
        and compiled.resolve_compile("auto", torch.device("cuda")) is True
    )
    assert (
        compiled.resolve_compile("on", CPU) is True and compiled.resolve_compile("off", torch.device("cuda")) is False
    )
    with pytest.raises(UserError, match="--compile 'yes'"):
        compiled.resolve_compile("yes", CPU)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("shared_w", [False, True])
def test_triton_head_op_equals_the_eager_triton_head(shared_w):
    """The compiled step's head on CUDA (a custom op around kernels/head.py), run here in Triton's interpreter and
    vmapped as the row does: the eager path's losses and gradients exactly (the same kernel, the same chunks). With
    shared_w, a frozen lm_head shared by all lanes (no dw, one matmul for all lanes' rows)."""
    from fractal_vmap.head import lanes_head_loss

    gen = torch.Generator().manual_seed(31)
    L, N, C, V = 3, 40, 16, 37
    x = torch.randn(L, N, C, generator=gen).requires_grad_()
    w = 2 * torch.randn(V, C, generator=gen) if shared_w else (2 * torch.randn(L, V, C, generator=gen)).requires_grad_()
    targets = torch.randint(0, V, (L, N), generator=gen)
    targets[torch.rand(L, N, generator=gen) < 0.3] = -1
    in_dims = (0, None if shared_w else 0, 0)
    weights = torch.rand(L, generator=gen)  # each lane's own incoming gradient
    results = []
    for head in (compiled.triton_head, lambda a, b, c: lanes_head_loss(a, b, c, kernels="triton")):
        losses = torch.func.vmap(head, in_dims=in_dims)(x, w, targets)
        grads = torch.autograd.grad((losses * weights).sum(), [x] if shared_w else [x, w])
        results.append((losses, grads))
    (losses, grads), (want, want_grads) = results
    assert torch.equal(losses, want) and all(torch.equal(g, h) for g, h in zip(grads, want_grads))
