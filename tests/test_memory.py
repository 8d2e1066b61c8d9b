"""The memory levers of a row (tasks/nanochat/levers.py) and dead-lane compaction (lanes.run).

Stepping each layer's optimizer in the backward (post-accumulate-grad hooks, Newton-Schulz batched per layer instead
of per shape across layers) and recomputing blocks in the backward (recompute.py) must change no number, bit for bit,
on CPU; so must dropping dead lanes from a row. Micro-batches and bfloat16 momentum change the numbers: they are held
to measured drifts. On the nanochat fixture (30 saved batches) and the default model, a few steps each.
"""

import json
import math
from pathlib import Path

import pytest
import torch

from fractal_vmap import lanes
from fractal_vmap.errors import UserError
from fractal_vmap.files import finite_or_none
from fractal_vmap.model import forward, rotary_cos_sin
from fractal_vmap.options import FinetuneConfig
from fractal_vmap.sources import load_model
from fractal_vmap.tasks.nanochat.levers import Levers
from fractal_vmap.tasks.nanochat.row import nanochat_row, train_lanes

FIXTURE = Path(__file__).parent / "fixtures" / "nanochat-d2"
CPU = torch.device("cpu")
DIVERGING_LR = 3e12  # a NaN loss within 10 steps on the fixture (tests/test_lanes.py)
EXACT = (Levers(step_in_backward=True), Levers(remat=True), Levers(step_in_backward=True, remat=True))


@pytest.fixture(scope="module")
def nanochat():
    config, params, _ = load_model(str(FIXTURE))
    traj = torch.load(FIXTURE / "trajectories.pt")
    inputs, targets = traj["batch_inputs"], traj["batch_targets"]
    return config, params, lambda step: (inputs[step % 30], targets[step % 30])


def cfg(**kw) -> FinetuneConfig:
    """The fixture's setting (constant lr, no weight decay) with every group trained: AdamW on two groups, Muon."""
    settings = dict(trainable_param_groups="all", weight_decay=0.0, warmup_frac=0.0, final_lr_frac=1.0, device="cpu")
    return FinetuneConfig(**{**settings, **kw})


def same_numbers(a: list, b: list) -> None:
    """Bit for bit: every loss (NaN where NaN) and every label and count."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert len(x.losses) == len(y.losses) and all(
            u == v or (math.isnan(u) and math.isnan(v)) for u, v in zip(x.losses, y.losses)
        ), x.run_name
        for key in ("stable", "converged", "tokens_seen", "steps", "total_steps", "error"):
            assert getattr(x, key) == getattr(y, key), (x.run_name, key)


def row_cfgs(dtype: str = "float32") -> list[FinetuneConfig]:
    """Tame to chaotic lrs and a diverging lane."""
    return [cfg(learning_rate=lr, dtype=dtype, run_name=f"lr{lr:g}") for lr in (0.003, 0.05, DIVERGING_LR, 1.0)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_levers_that_keep_the_numbers_keep_them_bit_for_bit(nanochat, dtype):
    """Under bfloat16 autocast too: the recomputation runs under the forward's autocast, not the backward's none."""
    config, params, batches = nanochat
    cfgs, steps = row_cfgs(dtype), [10] * 4
    plain = train_lanes(cfgs, config, params, batches, steps, CPU)
    assert not plain[2].stable and all(r.stable for i, r in enumerate(plain) if i != 2)  # the diverging lane diverged
    for levers in EXACT:
        same_numbers(train_lanes(cfgs, config, params, batches, steps, CPU, levers=levers), plain)


def test_recomputed_blocks_give_the_same_gradients_for_one_model(nanochat):
    """The single-model path of recompute.py (no vmap): loss and every gradient bit-identical."""
    config, params, batches = nanochat
    inputs, targets = batches(0)
    cos_sin = rotary_cos_sin(config)
    grads = []
    for remat in (False, True):
        leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        loss = forward(leaves, inputs, config, cos_sin, targets, remat=remat)
        loss.backward()
        grads.append((loss.detach(), {k: v.grad for k, v in leaves.items()}))
    assert torch.equal(grads[0][0], grads[1][0])
    assert all(torch.equal(grads[0][1][k], grads[1][1][k]) for k in params)


def test_stepping_in_the_backward_frees_each_layers_gradients(nanochat, monkeypatch):
    """The per-layer step runs as the layer's gradients arrive: while the backward goes on, no optimizer has more than
    its own layer's gradients alive, and the first to step is the head's (its gradient is the first one ready)."""
    config, params, batches = nanochat
    row = nanochat_row([cfg(learning_rate=0.01)] * 2, config, params, [1, 1], CPU, levers=Levers(step_in_backward=True))
    optimizers = row.model.optimizers.owners
    assert len(optimizers) == 2 + config.n_layer  # AdamW for wte and for lm_head, one Muon per layer
    alive = []
    for optimizer, _group, names in optimizers:

        def spy(*args, optimizer=optimizer, names=names, original=optimizer.step):
            alive.append((names, [k for k, p in row.model.params.items() if p.grad is not None]))
            original(*args)

        monkeypatch.setattr(optimizer, "step", spy)
    lanes.lanes_step(row, 0, *batches(0))
    assert len(alive) == len(optimizers)
    assert alive[0][0] == ["lm_head.weight"]
    for names, with_grads in alive:
        assert set(with_grads) == set(names)  # earlier layers' gradients are gone, later ones' not yet made


def test_micro_batches_drift_within_the_noise_floor(nanochat):
    """Two micro-batches of 2 sequences against one batch of 4: the same objective summed in another order. Held to
    the lanes-vs-finetune tolerance of tests/test_lanes.py (2 x lr at tame lrs, 4x the noise floor measured there)."""
    config, params, batches = nanochat
    cfgs = [cfg(learning_rate=lr, run_name=f"lr{lr:g}") for lr in (0.001, 0.004, 0.01)]
    whole = train_lanes(cfgs, config, params, batches, [12] * 3, CPU)
    parts = train_lanes(cfgs, config, params, batches, [12] * 3, CPU, levers=Levers(micro_batches=2))
    for c, a, b in zip(cfgs, whole, parts):
        gap = max(abs(x - y) for x, y in zip(a.losses, b.losses))
        assert gap <= 2 * c.learning_rate, (c.run_name, gap)
        assert a.tokens_seen == b.tokens_seen and b.stable
    assert abs(whole[0].losses[0] - parts[0].losses[0]) < 1e-5  # the first loss: the same mean, 2 roundings apart


def test_bfloat16_momentum_halves_it_and_stays_near(nanochat, monkeypatch):
    config, params, batches = nanochat
    row = nanochat_row([cfg()] * 2, config, params, [1, 1], CPU, levers=Levers(momentum_dtype="bfloat16"))
    muon = row.model.optimizers.owners[-1][0]
    assert all(b.dtype == torch.bfloat16 for b in muon.momentum_buffer)
    cfgs = [cfg(learning_rate=lr, run_name=f"lr{lr:g}") for lr in (0.001, 0.01)]
    fp32 = train_lanes(cfgs, config, params, batches, [12] * 2, CPU)
    bf16 = train_lanes(cfgs, config, params, batches, [12] * 2, CPU, levers=Levers(momentum_dtype="bfloat16"))
    for c, a, b in zip(cfgs, fp32, bf16):
        gap = max(abs(x - y) for x, y in zip(a.losses, b.losses))
        assert 0 < gap <= 2 * c.learning_rate, (c.run_name, gap)  # it does change the numbers, within the floor


# ----------------------------------------------------------------------------- dead lanes


def watch_compaction(monkeypatch) -> list[int]:
    """The widths rows are compacted to."""
    widths = []
    compact = lanes.Row.compact

    def spy(row, keep):
        widths.append(len(keep))
        compact(row, keep)

    monkeypatch.setattr(lanes.Row, "compact", spy)
    return widths


@pytest.mark.parametrize("levers", [Levers(), Levers(step_in_backward=True)], ids=["plain", "step_in_backward"])
def test_a_row_with_dead_lanes_dropped_equals_the_uncompacted_row(nanochat, monkeypatch, levers):
    """6 lanes: 3 diverge within 10 steps, one finishes after 4; synced every 2 steps, so the row is compacted as they
    go, down to the idle-padded minimum. Every lane's result is the uncompacted row's, bit for bit."""
    config, params, batches = nanochat
    lrs = (0.01, DIVERGING_LR, 0.004, DIVERGING_LR * 3, 0.02, DIVERGING_LR * 10)
    cfgs = [cfg(learning_rate=lr, run_name=f"lr{lr:g}") for lr in lrs]
    steps = [16, 16, 4, 16, 16, 16]
    full = train_lanes(cfgs, config, params, batches, steps, CPU, sync_every=2, levers=levers, compact=False)
    widths = watch_compaction(monkeypatch)
    compacted = train_lanes(cfgs, config, params, batches, steps, CPU, sync_every=2, levers=levers)
    assert widths and widths[-1] == 2 and widths == sorted(widths, reverse=True), widths
    assert sum(not r.stable for r in full) == 3 and full[2].steps == 4
    same_numbers(compacted, full)


def test_compaction_with_per_lane_data(nanochat, monkeypatch):
    """Lanes with their own data (batches [L, B, T], as lanes with their own seeds get): the data of the lanes left
    follows them. Lane k reads the fixture's batches from batch 7k on."""
    config, params, batches = nanochat

    def per_lane(step):
        pairs = [batches(step + 7 * k) for k in range(3)]
        return torch.stack([x for x, _ in pairs]), torch.stack([y for _, y in pairs])

    cfgs = [cfg(learning_rate=lr, run_name=f"lr{lr:g}") for lr in (0.01, DIVERGING_LR, 0.02)]
    full = train_lanes(cfgs, config, params, per_lane, [12] * 3, CPU, sync_every=2, compact=False)
    widths = watch_compaction(monkeypatch)
    compacted = train_lanes(cfgs, config, params, per_lane, [12] * 3, CPU, sync_every=2)
    assert widths == [2] and not full[1].stable and full[0].losses[0] != full[2].losses[0]
    same_numbers(compacted, full)


# ----------------------------------------------------------------------------- lane chunks sized by memory


def test_a_small_memory_budget_splits_the_row_and_changes_no_number(default_model, tmp_path, monkeypatch):
    """A 1 x 5 grid row (lr 0.01 .. 1e12: tame to diverging, 6 steps) with --memory_budget set so that only 2 lanes fit
    even with the levers on (auto picks the most frugal): chunks of 2, and every number is the unsplit row's. Then an
    out-of-memory in a chunk of 2 still halves it (to 1, run with an idle lane), and changes no number either."""
    from dataclasses import replace

    from fractal_vmap.grid.pipeline import plan_grid
    from fractal_vmap.options import GridConfig
    from fractal_vmap.tasks.nanochat import chunks
    from fractal_vmap.tasks.nanochat.chunks import train_row
    from fractal_vmap.tasks.nanochat.memory import HEADROOM, estimate_memory

    cfg = GridConfig(
        axes="num_tokens,lr",
        rows=1,
        cols=5,
        row_min=400,
        row_max=400,
        col_min=0.01,
        col_max=1e12,
        device="cpu",
        wandb="disabled",
        run_dir=str(tmp_path / "run"),
    )
    plan = plan_grid(cfg)
    cells = plan.cells[0]
    whole, chunk = train_row(plan, cells)
    assert chunk == 5
    config = plan.model[0]
    frugal = estimate_memory(
        config, cfg.device_batch_size, cfg.max_seq_len, levers=Levers(step_in_backward=True, remat=True)
    )
    budget = int(frugal.peak(2) / HEADROOM) + 1
    small = replace(plan, cfg=replace(cfg, memory_budget=str(budget)))
    assert chunks.chunk_size(small, 5)[:2] == (2, Levers(step_in_backward=True, remat=True))
    split, chunk = train_row(small, cells)
    assert chunk == 2

    def strip(results):  # NaN as null, so that equal results compare equal
        return json.dumps(finite_or_none([{k: v for k, v in r.items() if k != "runtime_s"} for r in results]))

    assert strip(split) == strip(whole) and not whole[-1]["stable"]
    real, seen = chunks.train_lanes, []

    def no_pairs(cfgs, *args, **kwargs):
        seen.append(len(cfgs))
        if len(cfgs) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(cfgs, *args, **kwargs)

    monkeypatch.setattr(chunks, "train_lanes", no_pairs)
    halved, chunk = train_row(small, cells)
    assert seen == [2, 1, 1, 1, 1, 1] and chunk == 1
    assert strip(halved) == strip(whole)
    # a budget below what one chunk needs is refused with one line, before any training
    with pytest.raises(UserError, match="memory budget"):
        chunks.chunk_size(replace(plan, cfg=replace(cfg, memory_budget="1MB")), 5)
