"""train_lanes (a vmapped row of lanes) against train_single (torch.optim, one model), lane by lane: the fidelity
contract of README "Fidelity", tier by tier.

1. Chunk invariance, bit for bit: a lane's numbers do not depend on how many lanes train beside it (1, 2, 3, 8), at
   any learning rate, chaotic ones included. Exact on every CPU: every op is per lane or elementwise, and the batched
   matmuls never run with a batch of one (lanes.MIN_LANES).
2. Isolation, bit for bit: a diverging lane changes no other lane.
3. Lanes vs `finetune`, within the trajectory's float32 noise floor, at learning rates where training is tame; and
   the labels (stable, converged) agree, at any learning rate where the label is robust. Not bit for bit: a batched
   matmul may sum in another order than a single one (Intel Xeon with MKL does; AMD EPYC here does not).

Models: the nanochat fixture (its 30 saved batches, constant lr, all three groups trained), the embedded default model
(its SFT stream, the default warmup + cosine schedule, matrix,unembedding, weight decay 0.1), and a GQA model
(4 query heads on 2 kv heads, random init, the fixture's batches).
"""

import math
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import fractal_vmap.tasks.nanochat.optimizers as optimizers_module
from fractal_vmap.data import lane_batches, make_stream, render_split, total_steps
from fractal_vmap.lanes import MIN_LANES
from fractal_vmap.model import GPTConfig, init_params, param_group
from fractal_vmap.options import FinetuneConfig
from fractal_vmap.reference import train_single
from fractal_vmap.sources import load_model
from fractal_vmap.tasks.nanochat.row import nanochat_row, train_lanes

FIXTURE = Path(__file__).parent / "fixtures" / "nanochat-d2"
CPU = torch.device("cpu")
# The noise floor of a trajectory (benchmarks/fidelity.py, table in benchmarks/README.md): the max per-step |dloss|
# between finetune and finetune with its weight-gradient matmuls summed in another order, as another CPU's BLAS (or
# its batched matmul) sums them. Measured over 30-35 steps on the three models here, at lr 3e-4..1e-2 it is at most
# 0.45 x lr (1.3e-3 at lr 3e-3 on the fixture; mostly 0.03-0.13 x lr), and it grows into chaos above: 1e-2..5e-2 at
# lr 0.1, 0.2-1.3 at lr 0.3-1. So lanes are held to LOSS_TOL_PER_LR x lr = 2 x lr (4x the largest floor measured) at
# TAME_LR and below; a lane mixed up with another, a wrong lr or a skipped update is off by 0.05 to O(1) there.
LOSS_TOL_PER_LR = 2.0
TAME_LR = 0.01
# bfloat16 autocast (the GPU's path, run on CPU): the floor is set by bf16 roundings that a reordered sum flips, not by
# the lr: 1.9e-3 to 4.6e-3 over 12 steps at lr 3e-4..1e-2 on the fixture (benchmarks/fidelity.py --dtype bfloat16).
# 4x the largest:
BF16_TOL = 2e-2
# found by trying (fixture and default model): every learning_rate up to 1e11 stays finite for 30+ steps (the softcap
# and the norms bound the loss), 1e12..3e12 overflow the MLP to inf and give a NaN loss within 10 steps
DIVERGING_LR = 3e12
# a GQA model (4 query heads share 2 kv heads), random init (nanochat's: zero lm_head and c_proj), the fixture's vocab
GQA_CONFIG = GPTConfig(sequence_len=128, vocab_size=289, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)


def loss_tol(cfg: FinetuneConfig) -> float:
    """The lane-vs-finetune tolerance of a cell whose group lrs follow its matrix lr by the default multipliers."""
    lr = cfg.matrix_lr or cfg.learning_rate
    assert lr <= TAME_LR, f"{cfg.run_name}: lr {lr} is beyond the tame regime: compare labels only"
    return LOSS_TOL_PER_LR * lr


def tame_lrs(n: int) -> list[float]:
    """n learning rates drawn fresh each session, log-uniform, one per equal slice of log10 [3e-4, TAME_LR]; a drawn lr
    is in its lane's run_name, which every assertion message shows."""
    rng = random.Random()  # seeded from the OS
    lo, hi = math.log10(3e-4), math.log10(TAME_LR)
    return [10 ** rng.uniform(lo + (hi - lo) * k / n, lo + (hi - lo) * (k + 1) / n) for k in range(n)]


def fixture_cfg(**kw) -> FinetuneConfig:
    """The fixture's run (README): constant lr, all three groups, no weight decay, 30 steps."""
    settings = dict(
        trainable_param_groups="matrix,embedding,unembedding",
        weight_decay=0.0,
        warmup_frac=0.0,
        final_lr_frac=1.0,
        num_iterations=30,
        device="cpu",
    )
    return FinetuneConfig(**{**settings, **kw})


@pytest.fixture(scope="module")
def nanochat():
    config, params, _ = load_model(str(FIXTURE))
    traj = torch.load(FIXTURE / "trajectories.pt")
    inputs, targets = traj["batch_inputs"], traj["batch_targets"]
    return config, params, traj, lambda step: (inputs[step % 30], targets[step % 30])


def fixture_row(traj) -> list[FinetuneConfig]:
    """7 lanes: the fixture's three settings (explicit per-group lrs; small is tame, default and large are not), three
    tame lanes from learning_rate alone (the x10 / x0.2 multipliers), and a diverging lane in the middle."""
    named = [
        fixture_cfg(**{k: traj["settings"][s][k] for k in ("matrix_lr", "unembedding_lr", "embedding_lr")}, run_name=s)
        for s in ("small", "default", "large")
    ]
    plain = [fixture_cfg(learning_rate=lr, run_name=f"lr{lr!r}") for lr in tame_lrs(3)]
    diverging = fixture_cfg(learning_rate=DIVERGING_LR, run_name="diverging")
    return named[:2] + plain[:1] + [diverging] + [named[2]] + plain[1:]


@pytest.fixture(scope="module")
def fixture_lanes(nanochat):
    config, params, traj, batches = nanochat
    cfgs = fixture_row(traj)
    return cfgs, train_lanes(cfgs, config, params, batches, [30] * len(cfgs), CPU)


@pytest.fixture(scope="module")
def default_data(default_model):
    """The default model, its tokenizer and rendered train split (what `finetune` and `grid` train on)."""
    base = FinetuneConfig(device="cpu")
    config, params, tokenizer = load_model(base.model, base.tokenizer, CPU)
    examples, _ = render_split(base, tokenizer, config, "train")
    return config, params, tokenizer, examples


def default_cfg(**kw) -> FinetuneConfig:
    return FinetuneConfig(device="cpu", wandb="disabled", **kw)


# 35 steps of the default stream (70 supervised tokens in batch 0): 2 warmup steps, 33 cosine steps
DEFAULT_NUM_TOKENS = 2400
# tame lanes (lane vs finetune within the noise floor), then labels-only lanes: lr 0.1 converges far below the
# threshold (ratio ~0.5), lr 100 stays finite far above it (ratio ~3.5), DIVERGING_LR gives a NaN loss
DEFAULT_LRS = (0.003, 0.01, 0.1, DIVERGING_LR, 100.0)
ROBUST_MARGIN = 0.2  # a label is robust when the run's loss ratio is this far from the threshold (chaos moves it < 0.1)


@pytest.fixture(scope="module")
def default_lanes(default_data):
    config, params, tokenizer, examples = default_data
    lrs = (*DEFAULT_LRS[:2], *tame_lrs(1), *DEFAULT_LRS[2:])
    cfgs = [default_cfg(learning_rate=lr, num_tokens=DEFAULT_NUM_TOKENS, run_name=f"lr{lr!r}") for lr in lrs]
    stream = make_stream(cfgs[0], tokenizer, examples, cfgs[0].seed)
    steps = total_steps(cfgs[0], stream.batch(0)[1])
    return cfgs, stream, steps, train_lanes(cfgs, config, params, stream.batch, [steps] * len(cfgs), CPU)


def single(cfg: FinetuneConfig, config, params, batches, steps: int):
    """finetune's result for this cell (the reference loop, torch.optim)."""
    return train_single(cfg, config, params, batches, steps, CPU)[0]


def assert_lane_equals_single(lane, ref, tol: float) -> None:
    """Every step's loss within tol, the same labels and counts, every summary number within what tol allows."""
    name = ref.run_name
    assert ref.stable, f"{name}: the reference run diverged, pick another lr"
    assert lane.stable is True and lane.error is None, name
    assert len(lane.losses) == len(ref.losses) == ref.total_steps == lane.total_steps, name
    gap = (torch.tensor(lane.losses, dtype=torch.float64) - torch.tensor(ref.losses, dtype=torch.float64)).abs()
    assert gap.max().item() <= tol, (
        f"{name}: max |dloss| {gap.max().item():.3g} at step {gap.argmax().item()} > {tol:.3g}"
    )
    assert lane.converged == ref.converged, name
    assert lane.steps == ref.steps and lane.tokens_seen == ref.tokens_seen, name
    # ratio = mean(last K losses) / loss0, with loss0 > 3.6 in every run here (measured): ratio gaps < tol
    assert lane.trainable_ratio == pytest.approx(ref.trainable_ratio, abs=tol), name
    for key in ("final_loss", "avg_loss", "trainable_loss0", "trainable_mean_last_k"):
        assert getattr(lane, key) == pytest.approx(getattr(ref, key), abs=tol), f"{name} {key}"
    # the measure sums v = loss / loss0 (or 1 / v, with v ~ 1 where it does): each of the run's terms moves by < tol
    assert lane.measure == pytest.approx(ref.measure, abs=len(ref.losses) * tol), name
    assert (lane.run_name, lane.learning_rate, lane.seed) == (ref.run_name, ref.learning_rate, ref.seed)


def assert_labels_agree(lane, ref, threshold: float = 1.0) -> None:
    """Where training is chaotic only the labels are comparable, and only where they are robust: both runs diverged,
    or both stayed finite with a loss ratio far from the threshold."""
    name = ref.run_name
    assert (lane.stable, lane.converged) == (ref.stable, ref.converged), name
    if ref.stable:
        assert abs(ref.trainable_ratio - threshold) > ROBUST_MARGIN, (
            f"{name}: ratio {ref.trainable_ratio:.3f} is near the threshold: pick another lr"
        )
        assert abs(lane.trainable_ratio - threshold) > ROBUST_MARGIN / 2, name
    else:
        for run in (lane, ref):
            assert run.error is not None and run.error.startswith("non-finite loss"), name
            assert len(run.losses) <= run.total_steps and not math.isfinite(run.losses[-1]), run.losses
            # the run ends at its first non-finite loss
            assert all(math.isfinite(x) for x in run.losses[:-1]), run.losses
            assert run.measure > 0  # the paper's sign convention: positive = did not train


def is_tame(cfg: FinetuneConfig) -> bool:
    return (cfg.matrix_lr or cfg.learning_rate) <= TAME_LR


# ----------------------------------------------------------------------------- tier 1: chunk invariance


def assert_same_numbers(a: list, b: list) -> None:
    """Bit for bit: every loss of every lane, and every number derived from them."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.losses == y.losses or (
            len(x.losses) == len(y.losses)
            and all(u == v or (math.isnan(u) and math.isnan(v)) for u, v in zip(x.losses, y.losses))
        ), x.run_name
        for key in ("stable", "converged", "tokens_seen", "steps", "total_steps", "error", "run_name"):
            assert getattr(x, key) == getattr(y, key), (x.run_name, key)


def chunked(cfgs, config, params, batches, steps, chunk: int) -> list:
    """The lanes trained `chunk` at a time, as grid.train_row does."""
    out = []
    for start in range(0, len(cfgs), chunk):
        out += train_lanes(cfgs[start : start + chunk], config, params, batches, steps[start : start + chunk], CPU)
    return out


@pytest.mark.parametrize("model", ["default", "gqa"])
def test_a_lanes_numbers_do_not_depend_on_its_chunk(model, default_data, nanochat):
    """8 lanes from tame to chaotic and one diverging, trained 8, 3 (chunks of 3 + 3 + 2) and 1 at a time:
    bit-identical."""
    lrs = (0.002, 0.03, 0.3, 1.0, DIVERGING_LR, 3.0, 30.0, 1e4)
    if model == "default":
        config, params, tokenizer, examples = default_data
        cfgs = [default_cfg(learning_rate=lr, num_iterations=12, run_name=f"lr{lr:g}") for lr in lrs]
        batches = make_stream(cfgs[0], tokenizer, examples, cfgs[0].seed).batch
    else:
        config, params, batches = GQA_CONFIG, init_params(GQA_CONFIG, seed=1), nanochat[3]
        cfgs = [fixture_cfg(learning_rate=lr, num_iterations=12, run_name=f"lr{lr:g}") for lr in lrs]
    steps = [12] * 8
    whole = chunked(cfgs, config, params, batches, steps, 8)
    assert len({r.final_loss for r in whole}) == 8  # the rates make a varied row
    assert model == "gqa" or not whole[4].stable  # (the random-init GQA model's zero lm_head keeps DIVERGING_LR finite)
    for chunk in (3, 1):
        assert_same_numbers(chunked(cfgs, config, params, batches, steps, chunk), whole)


def test_a_one_lane_chunk_runs_with_an_idle_second_lane(nanochat):
    """The reason tier 1 holds on every CPU: a batched matmul of one item takes a BLAS's single-matmul path."""
    config, params, _, _ = nanochat
    row = nanochat_row([fixture_cfg(learning_rate=0.01)], config, params, [30], CPU)
    assert MIN_LANES == 2 and row.real == 1
    assert all(p.shape[0] == 2 for p in row.model.params.values())
    assert row.total_steps.tolist() == [30, 0] and row.active.tolist() == [True, False]  # the idle lane never updates


# ----------------------------------------------------------------------------- tier 3: lanes vs finetune


def test_fixture_row_matches_finetune_lane_by_lane(nanochat, fixture_lanes):
    config, params, traj, batches = nanochat
    cfgs, results = fixture_lanes
    assert len(results) == len(cfgs) == 7
    assert len({c.matrix_lr or c.learning_rate for c in cfgs}) == 7  # seven different matrix lrs
    tame = 0
    for cfg, lane in zip(cfgs, results):
        ref = single(cfg, config, params, batches, 30)
        if is_tame(cfg):
            assert_lane_equals_single(lane, ref, loss_tol(cfg))
            # fixture README: 2049 supervised targets in 30 batches
            assert lane.steps == 30 and lane.tokens_seen == 2049
            tame += 1
        else:
            assert_labels_agree(lane, ref)
    assert tame == 4
    # the lanes trained (the labels are not vacuous): the fixture's settings all converge
    assert all(r.converged for r in results if r.run_name in ("small", "default", "large"))
    # and the fixture's "small" lane stays on nanochat's own trajectory (README: <= 2.8e-3 between correct
    # implementations)
    small = torch.tensor(results[0].losses, dtype=torch.float64)
    assert (small - traj["losses"]["eager_ns"]["small"]).abs().max().item() <= 3e-3


def test_default_model_row_matches_finetune_lane_by_lane(default_data, default_lanes):
    config, params, _, _ = default_data
    cfgs, stream, steps, results = default_lanes
    for cfg in cfgs:  # the defaults this comparison is about (recipe.py)
        assert (cfg.trainable_param_groups, cfg.weight_decay, cfg.warmup_frac, cfg.final_lr_frac) == (
            "matrix,unembedding",
            0.1,
            0.06,
            0.0,
        )
    assert steps >= 34 and int(steps * 0.06) >= 2  # at least 30 steps, and a real warmup (2 steps) before the cosine
    outcomes = []
    for cfg, lane in zip(cfgs, results):
        ref = single(cfg, config, params, stream.batch, steps)
        if is_tame(cfg):
            assert_lane_equals_single(lane, ref, loss_tol(cfg))
        else:
            assert_labels_agree(lane, ref)
        outcomes.append((lane.stable, lane.converged))
    # both phases and the unstable one are in this row, so the labels are compared on all three kinds
    assert {(True, True), (True, False), (False, False)} <= set(outcomes), outcomes


def test_gqa_row_matches_finetune_lane_by_lane(nanochat):
    """A GQA model: the lanes' attention takes the grouped k, v as SDPA's enable_gqa does (model.py), so the kv-head
    gradients are summed in the kernel's order in both paths. 30 steps, tame lanes and a labels-only lane."""
    _, _, _, batches = nanochat
    params = init_params(GQA_CONFIG, seed=1)
    cfgs = [fixture_cfg(learning_rate=lr, run_name=f"gqa-lr{lr!r}") for lr in (*tame_lrs(3), 0.1)]
    results = train_lanes(cfgs, GQA_CONFIG, params, batches, [30] * 4, CPU)
    for cfg, lane in zip(cfgs, results):
        ref = single(cfg, GQA_CONFIG, params, batches, 30)
        if is_tame(cfg):
            assert_lane_equals_single(lane, ref, loss_tol(cfg))
        else:
            assert_labels_agree(lane, ref)
    assert all(r.converged for r in results)  # random init, so every lane learns something


def test_bfloat16_autocast_row_matches_finetune(nanochat):
    """The autocast path the GPU runs (bfloat16 matmuls, attention and logits), here on CPU: 3 lanes vs finetune runs
    with --dtype bfloat16, 12 steps of the fixture's batches."""
    config, params, _, batches = nanochat
    cfgs = [
        fixture_cfg(learning_rate=lr, dtype="bfloat16", num_iterations=12, run_name=f"bf16-lr{lr!r}")
        for lr in tame_lrs(3)
    ]
    results = train_lanes(cfgs, config, params, batches, [12] * 3, CPU)
    for cfg, lane in zip(cfgs, results):
        assert_lane_equals_single(lane, single(cfg, config, params, batches, 12), BF16_TOL)
    fp32 = single(replace(cfgs[1], dtype="float32"), config, params, batches, 12)
    # bfloat16 did change the numbers: its 8-bit mantissa moves some step's loss by ~1e-3 (measured 7e-4 to 1.3e-3 at
    # steps 8-12 on a Xeon; float32 noise is ~1e-6), so the largest gap over the curve clears 2e-4 on any CPU
    gap = max(abs(a - b) for a, b in zip(fp32.losses, results[1].losses))
    assert gap > 2e-4, gap


@pytest.mark.parametrize("groups", ["unembedding", "embedding", "matrix"])
def test_rows_training_one_group_match_finetune(nanochat, groups):
    """One trainable group: then the head's input (only lm_head trains) or its weight (only wte or the matrices
    train) is shared by all lanes under vmap, the other stacked. 2 lanes, 8 steps of the fixture's batches."""
    config, params, _, batches = nanochat
    cfgs = [
        fixture_cfg(trainable_param_groups=groups, learning_rate=lr, num_iterations=8, run_name=f"{groups}-lr{lr!r}")
        for lr in tame_lrs(2)
    ]
    for cfg, lane in zip(cfgs, train_lanes(cfgs, config, params, batches, [8, 8], CPU)):
        assert_lane_equals_single(lane, single(cfg, config, params, batches, 8), loss_tol(cfg))


# ----------------------------------------------------------------------------- tier 2: a diverging lane is harmless


def assert_rows_identical(with_diverging: list, without: list) -> None:
    """The other lanes' numbers are bit-for-bit those of a row without the diverging lane (tier 1 says the lane count
    changes no lane's numbers; torch.where keeps the diverging lane's NaN/inf out of every other lane)."""
    assert len(with_diverging) == len(without)
    for a, b in zip(with_diverging, without):
        assert all(math.isfinite(x) for x in a.losses), a.run_name  # no NaN leaked in
        assert a.losses == b.losses, a.run_name  # no drift either: exact, step by step
        for key in (
            "stable",
            "converged",
            "trainable_ratio",
            "final_loss",
            "avg_loss",
            "measure",
            "tokens_seen",
            "steps",
        ):
            assert getattr(a, key) == getattr(b, key), (a.run_name, key)


def test_diverging_lane_changes_no_other_lane_fixture(nanochat, fixture_lanes):
    config, params, _, batches = nanochat
    cfgs, results = fixture_lanes
    keep = [i for i, c in enumerate(cfgs) if c.run_name != "diverging"]
    assert len(keep) == 6 and not results[3].stable  # the diverging lane sits in the middle of the row
    without = train_lanes([cfgs[i] for i in keep], config, params, batches, [30] * len(keep), CPU)
    assert_rows_identical([results[i] for i in keep], without)


def test_diverging_lane_changes_no_other_lane_default_model(default_data, default_lanes):
    config, params, _, _ = default_data
    cfgs, stream, steps, results = default_lanes
    keep = [i for i, c in enumerate(cfgs) if c.learning_rate != DIVERGING_LR]
    without = train_lanes([cfgs[i] for i in keep], config, params, stream.batch, [steps] * len(keep), CPU)
    assert_rows_identical([results[i] for i in keep], without)


# ----------------------------------------------------------------------------- lanes of different lengths, per-lane
# data


def recording(cls, snapshots: list):
    """A subclass of a batched optimizer that snapshots its stacked params after every step."""

    class Recording(cls):
        def step(self, *args):
            super().step(*args)
            snapshots.append([p.detach().clone() for p in self.params])

    return Recording


def test_short_lanes_stop_updating_and_match_their_own_runs(default_data, monkeypatch):
    config, params, tokenizer, examples = default_data
    # final_lr_frac 0.5: past its last step a lane's schedule stays at half its lr, so only the active mask can stop it
    cfgs = [
        default_cfg(learning_rate=lr, num_tokens=n, final_lr_frac=0.5, run_name=f"n{n}")
        for lr, n in ((0.01, 700), (0.004, 140), (0.007, 420))
    ]
    stream = make_stream(cfgs[0], tokenizer, examples, cfgs[0].seed)
    steps = [total_steps(c, stream.batch(0)[1]) for c in cfgs]
    assert steps == [10, 2, 6]  # 70 supervised tokens in batch 0
    muon_snaps, adamw_snaps = [], []
    monkeypatch.setattr(optimizers_module, "BatchedMuon", recording(optimizers_module.BatchedMuon, muon_snaps))
    monkeypatch.setattr(optimizers_module, "BatchedAdamW", recording(optimizers_module.BatchedAdamW, adamw_snaps))
    results = train_lanes(cfgs, config, params, stream.batch, steps, CPU)
    assert len(muon_snaps) == len(adamw_snaps) == 10  # the row runs as long as its longest lane
    for lane, n in enumerate(steps):
        for snaps in (muon_snaps, adamw_snaps):
            for s in range(1, 10):
                same = all(torch.equal(a[lane], b[lane]) for a, b in zip(snaps[s - 1], snaps[s]))
                # a lane updates at each of its own steps and is left exactly as it was after its last one
                assert same == (s >= n), f"lane {lane} ({n} steps): after step {s} changed={not same}"
        assert_lane_equals_single(
            results[lane], single(cfgs[lane], config, params, stream.batch, n), loss_tol(cfgs[lane])
        )
        assert results[lane].steps == results[lane].total_steps == n


# Per-lane data: lane_batches right-pads every lane's batch to the row's longest T (inputs with the pad token, targets
# -1). That changes no loss value (causal attention; measured: step-0 losses identical), but it does change the
# reduction length of the weight-gradient matmuls, a reordered sum like any other (noise floor, LOSS_TOL_PER_LR).
def test_per_lane_seeds_match_finetune_runs_with_those_seeds(default_data):
    config, params, tokenizer, examples = default_data
    seeds = [3, 11, 3, 42]  # two lanes share a stream, the others have their own
    cfgs = [
        default_cfg(learning_rate=lr, num_tokens=500, seed=s, run_name=f"s{s}-lr{lr!r}")
        for s, lr in zip(seeds, tame_lrs(4))
    ]
    streams = {s: make_stream(cfgs[0], tokenizer, examples, s) for s in set(seeds)}
    steps = [total_steps(c, streams[c.seed].batch(0)[1]) for c in cfgs]
    assert len(set(steps)) > 1  # the streams' first batches differ, so the step counts do too
    pad_id = tokenizer.special_id("<|assistant_end|>")
    batches = lane_batches(seeds, streams, pad_id)
    for step in range(max(steps)):  # [L, B, T]: lane i holds its own stream's batch, right-padded to the longest
        inputs, targets = batches(step)
        assert inputs.shape[:2] == targets.shape[:2] == (4, 8)
        for lane, seed in enumerate(seeds):
            x, y = streams[seed].batch(step)
            T = x.shape[1]
            assert torch.equal(inputs[lane, :, :T], x) and torch.equal(targets[lane, :, :T], y)
            assert (targets[lane, :, T:] == -1).all() and (inputs[lane, :, T:] == pad_id).all()
    results = train_lanes(cfgs, config, params, batches, steps, CPU)
    for lane, (cfg, result, n) in enumerate(zip(cfgs, results, steps)):
        padded = single(cfg, config, params, lambda s, lane=lane: tuple(t[lane] for t in batches(s)), n)
        assert_lane_equals_single(result, padded, loss_tol(cfg))
        plain = single(cfg, config, params, make_stream(cfg, tokenizer, examples, cfg.seed).batch, n)
        assert_lane_equals_single(result, plain, loss_tol(cfg))
        assert result.seed == cfg.seed
    assert results[0].tokens_seen != results[1].tokens_seen  # each lane counted its own stream's tokens
    assert results[0].losses[0] == results[2].losses[0] != results[1].losses[0]  # same stream, same first batch


# ----------------------------------------------------------------------------- the loop's bookkeeping


def test_all_lanes_done_stops_the_loop_and_progress_counts_tokens(nanochat):
    """Progress is reported after every step (host values, no sync) with every lane's tokens; the loop checks for
    active lanes every sync_every steps and ends once none is."""
    config, params, _, batches = nanochat
    cfgs = [fixture_cfg(learning_rate=lr) for lr in (0.02, DIVERGING_LR)]
    asked, reports = [], []

    def counting(step):
        asked.append(step)
        return batches(step)

    results = train_lanes(
        cfgs, config, params, counting, [5, 30], CPU, progress=lambda s, n, p: reports.append((s, n, p)), sync_every=5
    )
    diverged_at = len(results[1].losses)  # 9 measured on the fixture: NaN at step 8
    assert 5 < diverged_at < 30 and not results[1].stable
    stop = 5 * math.ceil(diverged_at / 5)  # the first sync after both lanes were done
    assert asked == list(range(stop))  # each batch fetched once, and none after the loop found no active lane
    tokens = 2 * 4 * 64  # every step pushes batch [4, 64] through both lanes
    assert reports == [(s, 30, s * tokens) for s in range(1, stop + 1)]  # 30 = the row's longest lane
    assert results[0].steps == 5 and results[0].stable


def test_row_lanes_must_share_groups_and_dtype(nanochat):
    config, params, _, batches = nanochat
    for other in (fixture_cfg(trainable_param_groups="matrix"), fixture_cfg(dtype="bfloat16")):
        with pytest.raises(ValueError, match="must share"):
            train_lanes([fixture_cfg(), other], config, params, batches, [1, 1], CPU)


def test_frozen_groups_are_shared_not_stacked(nanochat, monkeypatch):
    """With matrix,unembedding trainable (the default), the embedding is not stacked: no optimizer holds it."""
    config, params, _, batches = nanochat
    held = []

    class Spy(optimizers_module.BatchedAdamW):
        def __init__(self, ps, **kw):
            super().__init__(ps, **kw)
            held.append([tuple(p.shape) for p in ps])

    monkeypatch.setattr(optimizers_module, "BatchedAdamW", Spy)
    before = {k: v.clone() for k, v in params.items()}
    cfgs = [FinetuneConfig(learning_rate=lr, num_iterations=2, device="cpu") for lr in (0.01, 0.02, 0.03)]
    train_lanes(cfgs, config, params, batches, [2, 2, 2], CPU)
    unembedding = [tuple(v.shape) for k, v in params.items() if param_group(k) == "unembedding"]
    assert held == [[(3, *shape) for shape in unembedding]]  # one AdamW, for lm_head only, stacked over the 3 lanes
    assert all(torch.equal(v, before[k]) for k, v in params.items())  # the base weights are never trained in place
