"""LoRA lanes (lora.py, README "LoRA"): the adapted forward and its gradient against a float64 reference, merged
adapters, lanes against `finetune --lora_rank`, chunk invariance with mixed ranks in a row, the base never copied per
lane, rank 0 exactly the full fine-tuning path, and the one-line refusals.

Models: the nanochat fixture (2 layers, 64 wide, its saved batches) and the embedded default model on its SFT stream.
"""

import math
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fractal_vmap import lora
from fractal_vmap.axes import make_axis
from fractal_vmap.data import make_stream, render_split
from fractal_vmap.errors import UserError
from fractal_vmap.lanes import run
from fractal_vmap.model import LORA_A, LORA_B, LORA_SCALE, GPTConfig, forward, init_params, rotary_cos_sin
from fractal_vmap.optim import BatchedAdamW, BatchedMuon
from fractal_vmap.options import FinetuneConfig, GridConfig
from fractal_vmap.reference import ReferenceModel, train_single
from fractal_vmap.sources import load_model
from fractal_vmap.tasks.nanochat import task as nanochat_task
from fractal_vmap.tasks.nanochat.axes import AXES
from fractal_vmap.tasks.nanochat.chunks import train_row
from fractal_vmap.tasks.nanochat.levers import Levers
from fractal_vmap.tasks.nanochat.memory import trace_step
from fractal_vmap.tasks.nanochat.row import nanochat_row, train_lanes

FIXTURE = Path(__file__).parent / "fixtures" / "nanochat-d2"
CPU = torch.device("cpu")
# Lanes vs `finetune --lora_rank`, tame lrs (<= 0.01): the trajectory's noise floor, measured on the default model
# over 30 steps (AMD EPYC, 2 cores): `finetune` against `finetune` on a base nudged by one float32 ulp drifts by at most
# 0.005 x lr at lr 3e-4..1e-2 (0.008 x lr at 3e-2), ranks 2 and 8; lanes against `finetune` measured 0 to 1.4e-6. A
# wrong rank, alpha or lr moves the loss by >= 10 x lr there (rank 2 vs 8 at lr 1e-3: 0.013). Tolerance: 0.05 x lr,
# 6x the largest floor.
LORA_TOL_PER_LR = 0.05
TAME_LR = 0.01


def tame_lrs(n: int) -> list[float]:
    """n learning rates drawn fresh each session, log-uniform, one per equal slice of log10 [3e-4, TAME_LR]."""
    rng = random.Random()
    lo, hi = math.log10(3e-4), math.log10(TAME_LR)
    return [10 ** rng.uniform(lo + (hi - lo) * k / n, lo + (hi - lo) * (k + 1) / n) for k in range(n)]


@pytest.fixture(scope="module")
def fixture_model():
    config, params, _ = load_model(str(FIXTURE))
    traj = torch.load(FIXTURE / "trajectories.pt")
    inputs, targets = traj["batch_inputs"], traj["batch_targets"]
    return config, params, lambda step: (inputs[step % 30], targets[step % 30])


@pytest.fixture(scope="module")
def default_data(default_model):
    base = FinetuneConfig(device="cpu", wandb="disabled")
    config, params, tokenizer = load_model(base.model, base.tokenizer, CPU)
    examples, _ = render_split(base, tokenizer, config, "train")
    return config, params, make_stream(base, tokenizer, examples, base.seed).batch


def lora_cfg(**kw) -> FinetuneConfig:
    return FinetuneConfig(**{**dict(device="cpu", wandb="disabled", lora_rank=4, num_iterations=30), **kw})


def random_model(config: GPTConfig, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    """Base weights with every matrix random (nonzero c_proj and lm_head too), so every path carries a signal."""
    gen = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v.shape, generator=gen) * 0.1).to(dtype) for k, v in init_params(config).items()}


# ----------------------------------------------------------------------------- the adapted forward and gradient


def test_lanes_lora_forward_and_gradient_match_a_float64_reference(fixture_model):
    """Three LoRA lanes of a row (vmapped, float32, ranks 4, alphas 1, 8 and 32, random B so that A's gradient is not
    zero) against an independent float64 reference: the plain forward of the merged model W + (alpha/R) B A, and the
    adapters' gradients from the merged weight's, dB = s G A^T, dA = s B^T G. Tolerance 1e-4 relative to the largest
    entry: float32 rounding, measured 2e-7 (loss) and under 2e-6 (gradients) here; a wrong scale is off by O(1)."""
    config, _, batches = fixture_model
    base = random_model(config, torch.float32, seed=random.randrange(2**31))
    inputs, targets = batches(random.randrange(30))
    cfgs = [lora_cfg(lora_alpha=a, num_iterations=1) for a in (1.0, 8.0, 32.0)]
    row = nanochat_row(cfgs, config, base, [1, 1, 1], CPU)
    with torch.no_grad():
        for name, p in row.model.params.items():
            if name.endswith(LORA_B):
                p.normal_(0, 0.05)
    losses = row.model.losses(0, inputs, targets, row.active)
    grads = torch.autograd.grad(losses.sum(), list(row.model.params.values()))
    cos_sin = rotary_cos_sin(config)
    for lane, cfg in enumerate(cfgs):
        adapters = {k: p[lane].detach().double() for k, p in row.model.params.items()}
        scale = cfg.lora_alpha / cfg.lora_rank
        merged = {k: v.double() for k, v in base.items()}
        for name, a in adapters.items():
            if name.endswith(LORA_A):
                w = lora.adapted_weight(name)
                merged[w] = merged[w] + scale * adapters[name.removesuffix(LORA_A) + LORA_B] @ a
        merged = {k: v.requires_grad_(True) for k, v in merged.items()}
        ref = forward(merged, inputs, config, (cos_sin[0].double(), cos_sin[1].double()), targets)
        ref_grads = dict(zip(merged, torch.autograd.grad(ref, list(merged.values()))))
        assert abs(losses[lane].item() - ref.item()) <= 1e-4 * abs(ref.item())
        for name, grad in zip(row.model.params, grads):
            G = ref_grads[lora.adapted_weight(name)]
            if name.endswith(LORA_A):
                expected = scale * adapters[name.removesuffix(LORA_A) + LORA_B].T @ G
            else:
                expected = scale * G @ adapters[name.removesuffix(LORA_B) + LORA_A].T
            got = grad[lane].double()
            assert (got - expected).abs().max() <= 1e-4 * expected.abs().max(), (lane, name)
            assert expected.abs().max() > 0, name  # A's gradient too: B is random


def test_merged_adapters_reproduce_the_lanes_forward(fixture_model):
    """After 6 steps of a LoRA row (ranks 4, lora_targets c_q,c_v,mlp.c_proj), each lane's adapters merged into the
    base (lora.merged) give a plain model whose logits are the adapted model's within float32 rounding (1e-5 of the
    largest logit; a wrong scale or a transposed B A is off by the adapters' whole contribution, checked below)."""
    config, params, batches = fixture_model
    cfgs = [lora_cfg(learning_rate=lr, lora_targets="c_q,c_v,mlp.c_proj", num_iterations=6) for lr in (3e-3, 3e-2)]
    row = nanochat_row(cfgs, config, params, [6, 6], CPU)
    run(row, batches)
    assert sorted({k.split(".", 3)[3] for k in row.model.params}) == [
        "attn.c_q.lora_A",
        "attn.c_q.lora_B",
        "attn.c_v.lora_A",
        "attn.c_v.lora_B",
        "mlp.c_proj.lora_A",
        "mlp.c_proj.lora_B",
    ]
    cos_sin = rotary_cos_sin(config)
    inputs, _ = batches(7)
    base_logits = forward(params, inputs, config, cos_sin)
    for lane in range(2):
        adapted = {**params, **{k: p[lane].detach() for k, p in row.model.params.items()}}
        adapted[LORA_SCALE] = row.model.settings[LORA_SCALE][lane]
        with torch.no_grad():
            want = forward(adapted, inputs, config, cos_sin)
            got = forward(lora.merged(adapted), inputs, config, cos_sin)
        assert set(lora.merged(adapted)) == set(params)
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()
        assert (want - base_logits).abs().max() > 100 * (got - want).abs().max()  # the adapters did move the model


# ----------------------------------------------------------------------------- lanes vs finetune --lora_rank


def test_lora_lanes_match_finetune_lora_runs(default_data):
    """Default model, its SFT stream, the default schedule and weight decay, 30 steps: 3 tame lanes of rank 4 (alphas
    4, 16, 64) and one chaotic lane (lr 0.3: labels only) against `finetune --lora_rank 4` runs (torch.optim.AdamW)."""
    config, params, batches = default_data
    lrs = tame_lrs(3)
    cfgs = [lora_cfg(learning_rate=lr, lora_alpha=a, run_name=f"lr{lr!r}") for lr, a in zip(lrs, (4.0, 16.0, 64.0))]
    cfgs.append(lora_cfg(learning_rate=0.3, run_name="chaotic"))
    alpha = replace(cfgs[1], lora_alpha=64.0, run_name="alpha64")  # the second lane's, at 4x its alpha
    *lanes, other = train_lanes(cfgs + [alpha], config, params, batches, [30] * 5, CPU)
    for cfg, lane in zip(cfgs, lanes):
        ref, _ = train_single(cfg, config, params, batches, 30, CPU)
        if cfg.learning_rate <= TAME_LR:
            gap = max(abs(a - b) for a, b in zip(lane.losses, ref.losses))
            assert len(lane.losses) == len(ref.losses) == 30
            assert gap <= LORA_TOL_PER_LR * cfg.learning_rate, (cfg.run_name, gap)
            assert lane.converged and ref.converged, cfg.run_name  # LoRA trains at these lrs
        else:
            assert (lane.stable, lane.converged) == (ref.stable, ref.converged), cfg.run_name
    # alpha changes the numbers (by far more than the tolerance): 16 vs 64 at the same lr
    assert max(abs(a - b) for a, b in zip(other.losses, lanes[1].losses)) > 10 * LORA_TOL_PER_LR * lrs[1]


def test_a_lora_lane_starts_exactly_at_the_base_model(fixture_model):
    """B = 0, so step 0's loss is the base model's bit for bit, in a lane and in `finetune`; and every lane's A is
    drawn from its seed (same seed: same A; another seed: another A), B zero."""
    config, params, batches = fixture_model
    full = train_lanes([FinetuneConfig(device="cpu", num_iterations=1)] * 2, config, params, batches, [1, 1], CPU)
    cfgs = [lora_cfg(num_iterations=1, seed=s) for s in (3, 3, 4)]
    lanes = train_lanes(cfgs, config, params, batches, [1, 1, 1], CPU)
    single, _ = train_single(cfgs[0], config, params, batches, 1, CPU)
    assert lanes[0].losses[0] == lanes[2].losses[0] == single.losses[0] == full[0].losses[0]
    row = nanochat_row(cfgs, config, params, [1, 1, 1], CPU)
    a = row.model.params["transformer.h.0.attn.c_q.lora_A"]
    assert torch.equal(a[0], a[1]) and not torch.equal(a[0], a[2])
    assert a[0].abs().max() <= 1 / math.sqrt(config.n_embd) and a[0].std() > 0.3 / math.sqrt(config.n_embd)
    assert all(not p.any() for k, p in row.model.params.items() if k.endswith(LORA_B))


def test_rank_0_is_exactly_the_full_fine_tuning_path(fixture_model):
    """lora_rank 0 (the default): no adapter anywhere, the same stacked groups and optimizers as before LoRA existed
    (Muon on the matrices, AdamW on the lm_head), and `finetune` the same; under LoRA, one AdamW over adapters only."""
    config, params, _ = fixture_model
    row = nanochat_row([FinetuneConfig(device="cpu")] * 2, config, params, [1, 1], CPU)
    assert set(row.model.params) == {k for k in params if k != "transformer.wte.weight"} and not row.model.settings
    kinds = sorted(type(o).__name__ for o, _, _ in row.model.optimizers.owners)
    assert kinds == ["BatchedAdamW", "BatchedMuon"]
    ref = ReferenceModel(FinetuneConfig(device="cpu"), config, params, CPU)
    assert set(ref.params) == set(params) and len(ref.optimizers) == 2
    lora_row = nanochat_row([lora_cfg()] * 2, config, params, [1, 1], CPU)
    (optimizer, group, names), *rest = lora_row.model.optimizers.owners
    assert not rest and isinstance(optimizer, BatchedAdamW) and not isinstance(optimizer, BatchedMuon)
    assert group == "lora" and all(n.endswith((LORA_A, LORA_B)) for n in names)


# ----------------------------------------------------------------------------- mixed ranks, chunk invariance


def assert_same_losses(a: list[dict], b: list[dict]) -> None:
    """Every lane's loss curve bit for bit (NaN where a lane diverged, in both)."""
    assert [r["run_name"] for r in a] == [r["run_name"] for r in b]
    for x, y in zip(a, b):
        torch.testing.assert_close(torch.tensor(x["losses"]), torch.tensor(y["losses"]), rtol=0, atol=0, equal_nan=True)


@pytest.fixture(scope="module")
def lora_plan(default_model):
    cfg = GridConfig(device="cpu", wandb="disabled", axes="lora_rank,lr", rows=2, cols=2, num_tokens=1000)
    return nanochat_task.plan(
        cfg, *(make_axis(n, 2, None, None, "auto", w, AXES) for n, w in (("lora_rank", "rows"), ("lr", "cols")))
    )


def test_mixed_ranks_in_a_row_are_chunk_invariant_and_independent_of_their_neighbours(lora_plan):
    """8 cells of ranks 2, 4 and 8 interleaved, lrs from tame to diverging, trained as one row (chunks.train_row:
    lanes grouped by rank, never padded to a neighbour's) with lane_chunk 8, 3 and 1: bit-identical; and each equals
    its lane trained alone (with an idle second lane)."""
    ranks = (4, 2, 8, 4, 2, 8, 2, 4)
    lrs = (1e-3, 3e-3, 0.01, 0.03, 0.1, 1.0, 1e4, 3e-2)
    cells = [
        lora_cfg(lora_rank=r, learning_rate=lr, num_iterations=8, run_name=f"r{r}-lr{lr:g}")
        for r, lr in zip(ranks, lrs)
    ]

    def trained(chunk: int) -> list[dict]:
        lora_plan.cfg.lane_chunk = chunk
        return train_row(lora_plan, cells)[0]

    whole = trained(8)
    # a varied row: several losses (two chaotic lanes may sit on the same plateau, ln(vocab)) and a diverged lane
    assert len({r["final_loss"] for r in whole if r["stable"]}) >= 6 and [r["stable"] for r in whole].count(False) == 1
    for chunk in (3, 1):
        assert_same_losses(trained(chunk), whole)
    config, params, _ = lora_plan.model
    batches = make_stream(cells[0], lora_plan.model[2], lora_plan.examples, cells[0].seed).batch
    for k in (1, 6):  # alone: no neighbour at all
        alone = train_lanes([cells[k]], config, params, batches, [8], CPU)[0]
        assert_same_losses([alone.to_dict()], whole[k : k + 1])


# ----------------------------------------------------------------------------- the base is shared, never copied


def test_the_base_is_never_copied_per_lane():
    """Real CPU steps with torch's MemTracker (memory.trace_step, fake=False) at 2 and 4 lanes of a model whose base
    (2 layers, 512 wide: 25 MB of block matrices) dwarfs a lane's tokens (1 x 8): what a LoRA lane adds is its
    adapters, their AdamW state and gradients and a few activations, under a tenth of the base; full fine-tuning's
    lanes add at least their own copy of every block matrix (so the check can fail)."""
    config = GPTConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=512)
    base_blocks = 2 * 12 * 512 * 512 * 4  # bytes of the block matrices, float32 (per layer 4 C^2 attention, 8 C^2 MLP)

    def per_lane(**kw) -> float:
        a, b = (trace_step(config, n, 1, 8, "float32", fake=False, **kw) for n in (2, 4))
        assert b.static - a.static >= 0
        return max(b.peak - a.peak, b.static - a.static) / 2

    adapters = sum(math.prod(s) for s in lora.adapter_shapes(config, 2).values()) * 4
    lora_lane = per_lane(lora_rank=2)
    assert lora_lane < base_blocks / 10, lora_lane
    assert lora_lane >= 3 * adapters  # it does hold its adapters, their two AdamW moments and gradients
    assert per_lane() >= base_blocks  # full fine-tuning: its own block matrices (and their Muon momentum) a lane


# ----------------------------------------------------------------------------- bad input: one line, before any work


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(lora_rank=-1), "--lora_rank is -1"),
        (dict(lora_rank=4, lora_alpha=0.0), "--lora_alpha is 0.0"),
        (dict(lora_rank=4, lora_targets="c_proj"), "--lora_targets 'c_proj'"),
        (dict(lora_rank=4, trainable_param_groups="all"), "under LoRA only the adapters"),
    ],
)
def test_bad_lora_settings_are_refused_in_one_line(kw, match):
    from fractal_vmap.recipe import validate

    with pytest.raises(UserError, match=match):
        validate(FinetuneConfig(**kw))


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(axes="lora_alpha,lr"), "lora_alpha would change nothing: LoRA is off"),
        (dict(axes="num_tokens,lr", lora_alpha=8.0), "--lora_alpha 8.0 has no effect: LoRA is off"),
        (dict(axes="lora_rank,lr", row_min=0.0, row_scale="linear"), "the lora_rank axis reaches 0"),
        (
            dict(axes="lora_rank,lr", unembedding_lr=0.1),
            "--unembedding_lr 0.1 has no effect: the unembedding is frozen",
        ),
        (dict(axes="lora_rank,lr", compile="on"), "--compile on does not take LoRA lanes"),
    ],
)
def test_bad_lora_grids_are_refused_in_one_line(default_model, kw, match):
    from fractal_vmap.tasks.nanochat.task import axis_names

    cfg = GridConfig(device="cpu", wandb="disabled", rows=2, cols=2, **kw)
    names = axis_names(cfg)
    row, col = (
        make_axis(n, 2, getattr(cfg, f"{w}_min"), None, getattr(cfg, f"{w}_scale"), w + "s", AXES)
        for n, w in zip(names, ("row", "col"))
    )
    with pytest.raises(UserError, match=match):
        nanochat_task.plan(cfg, row, col)


def test_plan_prints_lora_lanes_bytes_by_kind_and_the_lanes_that_fit():
    """`plan --model default --lora_rank 4` (the d20 command's path on a small model, FakeTensorMode): a lane's trained
    weights are exactly its adapters (float32) and its optimizer state their two AdamW moments (and a few scalars);
    the lanes that fit 80 GB and 141 GB are printed."""
    from io import StringIO

    from rich.console import Console

    from fractal_vmap.default_model import CONFIG
    from fractal_vmap.options import PlanConfig
    from fractal_vmap.perf.plan import print_plan, run_plan

    out = run_plan(PlanConfig(model="default", lora_rank=4, levers="none", batch=2, seq=64))
    adapters = sum(math.prod(s) for s in lora.adapter_shapes(CONFIG, 4).values()) * 4
    per_lane = out["memory"]["per_lane"]
    assert per_lane["params"] == adapters
    # the two moments, plus the lane's step count and settings (a few float64 scalars: measured 89 bytes)
    assert 2 * adapters <= per_lane["optimizer"] <= 2 * adapters + 256
    assert out["lanes_that_fit"]["80GB"] > 0 and out["lanes_that_fit"]["141GB"] > out["lanes_that_fit"]["80GB"]
    text = StringIO()
    print_plan(out, Console(file=text, width=200))
    assert "LoRA lanes of rank 4" in text.getvalue() and "on 141GB" in text.getvalue()


@pytest.mark.parametrize("levers", [Levers(remat=True), Levers(step_in_backward=True), Levers(micro_batches=2)])
def test_memory_levers_on_lora_lanes(fixture_model, levers):
    """The levers `plan` picks for LoRA lanes (remat: each block, adapters included, recomputed in the backward;
    step_in_backward: the adapters' AdamW stepped from the backward's hooks) change no number, bit for bit, as for
    full fine-tuning (tests/test_memory.py); micro-batches sum in another order: within the lanes' tolerance,
    LORA_TOL_PER_LR x lr (measured 1.9e-6 at lr 3e-3 and 6.2e-6 at 3e-2 over these 6 steps)."""
    config, params, batches = fixture_model
    cfgs = [lora_cfg(learning_rate=lr, lora_alpha=a, num_iterations=6) for lr, a in ((3e-3, 8.0), (3e-2, 32.0))]
    plain = train_lanes(cfgs, config, params, batches, [6, 6], CPU)
    with_levers = train_lanes(cfgs, config, params, batches, [6, 6], CPU, levers=levers)
    for cfg, a, b in zip(cfgs, plain, with_levers):
        if levers.micro_batches == 1:
            assert a.losses == b.losses
        else:
            assert max(abs(x - y) for x, y in zip(a.losses, b.losses)) <= LORA_TOL_PER_LR * cfg.learning_rate
            assert a.losses[1:] != b.losses[1:]  # the parts did run (another order, other roundings)
