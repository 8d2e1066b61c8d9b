"""The single-lane trainer and the `finetune` command.

train_single is checked against the 30-step trajectories that real nanochat wrote (tests/fixtures/nanochat-d2,
see its README for how close two correct implementations can be), then the lr schedule, the lr resolution,
frozen groups, and the `finetune` command end to end on the embedded default model: its result fields, its
labels, its step count, its one-line errors, W&B offline logging and dropped examples.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from fractal_vmap.cli import main
from fractal_vmap.data import render_examples
from fractal_vmap.model import GPTConfig, param_group
from fractal_vmap.options import FinetuneConfig
from fractal_vmap.recipe import group_lrs
from fractal_vmap.reference import train_single
from fractal_vmap.sources import load_model
from fractal_vmap.synth import doc_qa_conversations
from fractal_vmap.tokenizer import byte_tokenizer, load_tokenizer, save_tokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "nanochat-d2"
CPU = torch.device("cpu")
RESULT_FIELDS = (  # the result fields of the classic one-run-per-cell fine-tuning script (README "Result fields")
    "run_name",
    "learning_rate",
    "num_tokens_target",
    "tokens_seen",
    "avg_loss",
    "final_loss",
    "trainable_loss0",
    "trainable_mean_last_k",
    "trainable_ratio",
    "stable",
    "converged",
    "steps",
    "runtime_s",
    "seed",
    "error",
    "grid_i",
    "grid_j",
)


@pytest.fixture(scope="module")
def nanochat():
    """(config, params) of the fixture model, and its trajectories.pt."""
    config, params, _ = load_model(str(FIXTURE))
    return config, params, torch.load(FIXTURE / "trajectories.pt")


def fixture_batches(traj):
    """Batch s of the fixture (cycled, for runs longer than its 30 steps)."""
    inputs, targets = traj["batch_inputs"], traj["batch_targets"]
    return lambda step: (inputs[step % len(inputs)], targets[step % len(targets)])


@pytest.fixture(scope="module")
def trajectories(nanochat):
    """Our 30-step run of every fixture setting: constant lr, all three groups trained, as nanochat's run was."""
    config, params, traj = nanochat
    runs = {}
    for name, s in traj["settings"].items():
        cfg = FinetuneConfig(
            matrix_lr=s["matrix_lr"],
            unembedding_lr=s["unembedding_lr"],
            embedding_lr=s["embedding_lr"],
            weight_decay=s["weight_decay"],
            trainable_param_groups="matrix,embedding,unembedding",
            num_iterations=30,
            warmup_frac=0.0,
            final_lr_frac=1.0,
            device="cpu",
        )
        result, final = train_single(cfg, config, params, fixture_batches(traj), 30, CPU)
        runs[name] = {**result.to_dict(), "params": final}
    return runs


# ----------------------------------------------------------------------------- nanochat's trajectories


# Step 0 is the same forward pass on the same weights, before any optimizer step. The fixture was made on another
# CPU, whose BLAS may sum a matmul in another order: measured 0 ulps apart on AMD EPYC, 1 ulp on Intel Xeon (MKL).
# 4 float32 ulps of the loss (~2e-6 at 7.85) allow that; any real difference in the model is orders larger.
STEP0_ULPS = 4


@pytest.mark.parametrize("setting", ["small", "default", "large"])
def test_step0_loss_is_nanochat_to_float32_rounding(nanochat, trajectories, setting):
    _, _, traj = nanochat
    for variant in traj["losses"]:
        expected = traj["losses"][variant][setting][0].item()
        ulp = np.spacing(np.float32(expected)).item()
        assert abs(trajectories[setting]["losses"][0] - expected) <= STEP0_ULPS * ulp, variant


@pytest.mark.parametrize(
    "setting, tol",
    [
        # fixture README: correct implementations (fused vs for-loop AdamW, compiled vs eager NS, ...) differ by <=
        # 2.8e-3
        ("small", 3e-3),
        # fixture README: <= 1.5e-2 between correct implementations; the bf16 Newton-Schulz amplifies op-order changes
        ("default", 2e-2),
    ],
)
def test_trajectory_matches_nanochat(nanochat, trajectories, setting, tol):
    _, _, traj = nanochat
    ours = torch.tensor(trajectories[setting]["losses"], dtype=torch.float64)
    assert ours.shape == (30,)
    for variant in ("compiled_ns", "eager_ns"):
        gap = (ours - traj["losses"][variant][setting]).abs()
        assert gap.max().item() <= tol, (
            f"{setting} vs {variant}: max |dloss| {gap.max().item():.3g} at step {gap.argmax().item()}"
        )
    assert trajectories[setting]["stable"] and trajectories[setting]["converged"]


def test_large_lr_trajectory_is_finite(trajectories):
    # fixture README: the large setting is chaotic (gaps up to 0.9), so only its stability is comparable
    run = trajectories["large"]
    assert len(run["losses"]) == 30 and all(math.isfinite(x) for x in run["losses"])
    assert run["stable"] and run["error"] is None
    assert all(torch.isfinite(p).all() for p in run["params"].values())


@pytest.mark.parametrize(
    "setting, tol",
    [
        # fixture README: worst-tensor rel. L2 gap between correct implementations is <= 4.5e-3; +10% for thread-count
        # noise
        ("small", 5e-3),
        # fixture README: <= 5.4e-2 (zero-init c_proj drifts most); +10% for thread-count noise
        ("default", 6e-2),
    ],
)
def test_final_state_matches_nanochat(nanochat, trajectories, setting, tol):
    _, params, traj = nanochat
    reference = traj["final_state"]["compiled_ns"][setting]
    ours = trajectories[setting]["params"]
    assert set(ours) == set(reference)
    for name, ref in reference.items():
        rel = ((ours[name] - ref).norm() / ref.norm()).item()
        assert rel <= tol, f"{setting} {name}: rel. L2 diff {rel:.3g}"
        # and it did train: every tensor moved much further from the start than from nanochat's result
        moved = ((params[name] - ref).norm() / ref.norm()).item()
        assert moved > 2 * rel, f"{setting} {name}: moved {moved:.3g} vs gap {rel:.3g}"


# ----------------------------------------------------------------------------- schedule and lrs


def expected_multiplier(step: int, total: int, warmup_frac: float, final: float) -> float:
    """nanochat's schedule (optim.py), in float64: linear warmup (step+1)/warmup, then cosine from 1 down to final."""
    warmup = max(1, int(total * warmup_frac))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / (total - warmup)
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))


def test_lr_schedule_is_applied_every_step(nanochat):
    """With the default warmup_frac/final_lr_frac, both optimizers step with base lr x the scheduled multiplier."""
    config, params, traj = nanochat
    steps = 34  # int(34 * 0.06) = 2 warmup steps, then 32 cosine steps
    cfg = FinetuneConfig(learning_rate=0.01, init_lr_frac=0.5, num_iterations=steps, device="cpu")
    assert (cfg.warmup_frac, cfg.final_lr_frac) == (0.06, 0.0)  # the defaults are what this test is about
    logged, used = [], []
    hook = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: used.append((type(opt).__name__, [dict(g, params=None) for g in opt.param_groups]))
    )
    try:
        result, _ = train_single(
            cfg, config, params, fixture_batches(traj), steps, CPU, log=lambda s, m: logged.append((s, m))
        )
    finally:
        hook.remove()
    assert [s for s, _ in logged] == list(range(steps))
    want = [expected_multiplier(s, steps, 0.06, 0.0) for s in range(steps)]
    assert want[:3] == [0.5, 1.0, 1.0] and 0 < want[-1] < 0.01  # the shape: warmup, peak, decay towards 0
    for (step, metrics), w in zip(logged, want):
        assert metrics["train/lr_mult"] == pytest.approx(w, rel=1e-12, abs=1e-15)  # float64 both ways: rounding only
        assert metrics["train/loss"] == result.losses[step]
    # the lrs the optimizers actually stepped with: AdamW holds lm_head only (wte frozen), Muon the matrices
    base_unembedding = 0.01 * 0.2 * (64 / 768) ** -0.5 * 0.5
    base_matrix = 0.01 * 0.5
    assert [kind for kind, _ in used] == ["AdamW", "Muon"] * steps
    for step, w in enumerate(want):
        (_, adamw_groups), (_, muon_groups) = used[2 * step], used[2 * step + 1]
        assert [g["lr"] for g in adamw_groups] == [pytest.approx(base_unembedding * w, rel=1e-12, abs=1e-15)]
        assert [g["lr"] for g in muon_groups] == [pytest.approx(base_matrix * w, rel=1e-12, abs=1e-15)]
    # nanochat's optimizer settings (recipe.py): decoupled weight decay on the AdamW groups only
    (adamw,) = used[0][1]
    assert (adamw["betas"], adamw["eps"], adamw["weight_decay"]) == ((0.8, 0.95), 1e-10, 0.1)
    (muon,) = used[1][1]
    assert (muon["momentum"], muon["nesterov"], muon["weight_decay"]) == (0.95, True, 0.0)
    assert muon["ns_steps"] == 5 and muon["ns_coefficients"] == (3.4445, -4.7750, 2.0315)
    assert muon["adjust_lr_fn"] in (
        None,
        "original",
    )  # None is torch's default, "original": lr * sqrt(max(1, rows/cols))


# the fixture README's table of actual AdamW lrs (lm_head / wte), printed to 6 decimals
README_LRS = {"default": (0.013856, 0.692820), "small": (0.0013856, 0.069282), "large": (0.346410, 6.928203)}


@pytest.mark.parametrize("setting", ["default", "small", "large"])
def test_group_lrs_reproduce_the_fixture_table(nanochat, setting):
    config, _, traj = nanochat
    s = traj["settings"][setting]
    cfg = FinetuneConfig(matrix_lr=s["matrix_lr"], unembedding_lr=s["unembedding_lr"], embedding_lr=s["embedding_lr"])
    lrs = group_lrs(cfg, config)
    unembedding, embedding = README_LRS[setting]
    assert lrs["matrix"] == s["matrix_lr"]  # Muon's lr is not scaled
    assert lrs["unembedding"] == pytest.approx(unembedding, abs=5e-7)  # the table is rounded to 6 decimals
    assert lrs["embedding"] == pytest.approx(embedding, abs=5e-7)


def test_group_lrs_defaults_from_learning_rate(nanochat):
    config, _, _ = nanochat
    # default/small settings are lr, 10 lr, 0.2 lr: the same table from learning_rate alone
    for lr, setting in ((0.02, "default"), (0.002, "small")):
        lrs = group_lrs(FinetuneConfig(learning_rate=lr), config)
        assert lrs["matrix"] == lr
        assert lrs["unembedding"] == pytest.approx(README_LRS[setting][0], abs=5e-7)
        assert lrs["embedding"] == pytest.approx(README_LRS[setting][1], abs=5e-7)
    # exact formula; the AdamW scale is 1 at n_embd 768 and 2 at n_embd 192
    for n_embd, scale in ((768, 1.0), (192, 2.0), (64, (64 / 768) ** -0.5)):
        cfg = GPTConfig(n_embd=n_embd, n_head=1, n_kv_head=1)
        lrs = group_lrs(FinetuneConfig(learning_rate=0.03, init_lr_frac=0.25), cfg)
        assert lrs["matrix"] == pytest.approx(0.03 * 0.25, rel=1e-12)  # rel 1e-12: float rounding of a few products
        assert lrs["embedding"] == pytest.approx(0.03 * 10 * scale * 0.25, rel=1e-12)
        assert lrs["unembedding"] == pytest.approx(0.03 * 0.2 * scale * 0.25, rel=1e-12)


def test_group_lrs_overrides(nanochat):
    config, _, _ = nanochat
    scale = (64 / 768) ** -0.5
    cfg = FinetuneConfig(learning_rate=0.02, matrix_lr=0.007, embedding_lr=0.5, unembedding_lr=0.003, init_lr_frac=2.0)
    lrs = group_lrs(cfg, config)
    assert lrs["matrix"] == pytest.approx(0.014, rel=1e-12)
    assert lrs["embedding"] == pytest.approx(0.5 * scale * 2, rel=1e-12)
    assert lrs["unembedding"] == pytest.approx(0.003 * scale * 2, rel=1e-12)
    # the multipliers apply only when the lr itself is not given
    lrs = group_lrs(
        FinetuneConfig(learning_rate=0.02, embedding_lr_mult=3.0, unembedding_lr_mult=0.5, unembedding_lr=0.001), config
    )
    assert lrs["embedding"] == pytest.approx(0.06 * scale, rel=1e-12)
    assert lrs["unembedding"] == pytest.approx(0.001 * scale, rel=1e-12)


def test_group_lrs_reject_non_positive_trainable_lr(nanochat):
    from fractal_vmap.errors import UserError

    config, _, _ = nanochat
    with pytest.raises(UserError, match="matrix learning rate"):
        group_lrs(FinetuneConfig(matrix_lr=0.0), config)
    with pytest.raises(UserError, match="embedding learning rate"):
        group_lrs(FinetuneConfig(embedding_lr=-1.0, trainable_param_groups="embedding"), config)
    # a frozen group's lr is never used, so it may be anything
    assert group_lrs(FinetuneConfig(embedding_lr=0.0), config)["matrix"] == 0.02


# ----------------------------------------------------------------------------- frozen groups


def test_default_groups_freeze_the_embedding(nanochat):
    config, params, traj = nanochat
    before = {k: v.clone() for k, v in params.items()}
    cfg = FinetuneConfig(num_iterations=5, device="cpu")
    assert cfg.trainable_param_groups == "matrix,unembedding"
    _, after = train_single(cfg, config, params, fixture_batches(traj), 5, CPU)
    for name, value in after.items():
        if param_group(name) == "embedding":
            assert torch.equal(value, before[name]), name
        else:
            assert not torch.equal(value, before[name]), f"{name} did not train"
    for name, value in params.items():  # the caller's params are not touched
        assert torch.equal(value, before[name]), name


# ----------------------------------------------------------------------------- the finetune command


def run_cli(tmp_path, *args):
    """`fractal-vmap finetune ...` in-process; returns the result JSON."""
    out = tmp_path / "r.json"
    main(["finetune", "--out", str(out), *args])
    return json.loads(out.read_text())


def chat_jsonl(path: Path, rows: list[tuple[str, str]]) -> Path:
    """A JSONL dataset of one user/assistant exchange per line."""
    path.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}]}) + "\n"
            for u, a in rows
        )
    )
    return path


@pytest.fixture(scope="module")
def default_stream_supervised(default_model):
    """Supervised targets at each position of epoch 0 of the default train stream (seed 999), counted here, not by
    SFTStream."""
    tokenizer = load_tokenizer(default_model / "tokenizer")
    examples, _ = render_examples(doc_qa_conversations(4000, seed=0, split="train"), tokenizer, 1024)
    supervised = [sum(mask[1:]) for _, mask in examples]  # mask[1:] lines up with the targets
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(999)).tolist()  # epoch 0 is seed + 0
    return [supervised[i] for i in order]


def test_finetune_default_trains(tmp_path, capsys, default_stream_supervised):
    result = run_cli(tmp_path, "--wandb", "disabled", "--num_tokens", "3000")
    for field in RESULT_FIELDS:
        assert field in result, field
    supervised = default_stream_supervised
    steps = math.ceil(3000 / sum(supervised[:8]))  # device_batch_size 8: the first batch is positions 0..7
    assert result["steps"] == steps and 8 * steps <= len(supervised)  # all of it within epoch 0
    assert result["tokens_seen"] == sum(supervised[: 8 * steps])
    losses = result["losses"]
    assert len(losses) == steps and all(math.isfinite(x) for x in losses)
    assert result["final_loss"] == losses[-1] < losses[0] == result["trainable_loss0"]
    assert result["avg_loss"] == pytest.approx(sum(losses) / steps, rel=1e-12)  # float64 mean, summation order only
    assert result["trainable_mean_last_k"] == pytest.approx(sum(losses[-20:]) / 20, rel=1e-12)
    assert result["trainable_ratio"] == pytest.approx(result["trainable_mean_last_k"] / losses[0], rel=1e-12)
    assert result["trainable_ratio"] < 1
    assert result["stable"] is True and result["converged"] is True and result["error"] is None
    assert result["run_name"] == "finetune-lr0.02-tok3000-seed999"
    assert (result["learning_rate"], result["num_tokens_target"], result["seed"]) == (0.02, 3000, 999)
    assert result["grid_i"] is None and result["grid_j"] is None
    assert result["runtime_s"] > 0 and result["dropped_examples"] == 0
    assert math.isfinite(result["val_loss"])  # the default dataset brings a validation split
    out = capsys.readouterr().out
    assert str(tmp_path / "r.json") in out
    # the live view, as plain lines off a terminal: the last step's line carries its loss (4 significant digits)
    assert f"finetune {result['run_name']}: step {steps}/{steps} · loss {losses[-1]:.4g} · " in out


def test_finetune_absurd_lr_diverges(tmp_path):
    result = run_cli(tmp_path, "--wandb", "disabled", "--num_tokens", "3000", "--learning_rate", "1000")
    losses = result["losses"]
    # stopped at the first NaN, which strict JSON writes as null
    assert losses[-1] is None and result["final_loss"] is None and all(math.isfinite(x) for x in losses[:-1])
    assert result["steps"] == len(losses)
    assert result["stable"] is False and result["converged"] is False
    assert result["error"] is not None and f"step {len(losses) - 1}" in result["error"]


def test_finetune_large_lr_is_stable_but_not_converged(tmp_path):
    result = run_cli(tmp_path, "--wandb", "disabled", "--num_tokens", "3000", "--learning_rate", "30")
    assert all(math.isfinite(x) for x in result["losses"])
    assert result["stable"] is True and result["error"] is None
    assert result["trainable_ratio"] >= 1 and result["converged"] is False


def strict(path: Path):
    """A parse_constant for json.loads that fails on NaN and Infinity in `path`."""

    def refuse(constant: str):
        raise AssertionError(f"{path} holds {constant}: not strict JSON")

    return refuse


def test_finetune_wandb_offline(tmp_path, capsys):
    import wandb

    result = run_cli(tmp_path, "--wandb", "offline", "--num_tokens", "1000", "--run_name", "offline-check")
    wandb.teardown()  # waits for W&B's service to write out and close its files (reading them earlier is a race)
    assert result["stable"] and result["run_name"] == "offline-check"
    runs = list((tmp_path / "wandb").glob("offline-run-*"))  # start_run puts runs beside the result JSON
    assert len(runs) == 1
    assert f"to upload it: wandb sync {runs[0]}" in capsys.readouterr().out  # the exact command, this run's folder
    for path in tmp_path.rglob("*.json"):  # the result and W&B's files: strict JSON, no NaN
        json.loads(path.read_text(), parse_constant=strict(path))
    (log,) = runs[0].glob("run-*.wandb")
    data = log.read_bytes()
    # the .wandb file is a log of protobuf records whose metric keys are stored as plain strings:
    # one history record per step, each with train/loss, and the summary with the result fields
    assert data.count(b"train/loss") >= result["steps"]
    assert b"trainable_ratio" in data


def test_finetune_drops_examples_without_supervised_tokens(tmp_path):
    """Conversations whose assistant tokens are all cut off by max_seq_len are dropped, so no batch is all -1 (NaN
    loss)."""
    tokenizer = load_tokenizer(FIXTURE / "tokenizer")
    long_question = "Please read this long question carefully before you answer it. " * 3
    assert len(tokenizer.encode(long_question)) > 25  # with max_seq_len 24 no assistant token survives after it
    rows = [
        ("hi", "ok then"),
        (long_question, "yes"),
        ("what?", "this"),
        (long_question, "no"),
        ("go", "went"),
        (long_question, ""),
        ("one more", "fine"),
    ]
    path = chat_jsonl(tmp_path / "mixed.jsonl", rows)
    # batch size 1: every step is one example, so a kept example without a supervised token would give a NaN loss
    result = run_cli(
        tmp_path,
        "--wandb",
        "disabled",
        "--model",
        str(FIXTURE),
        "--dataset",
        str(path),
        "--max_seq_len",
        "24",
        "--device_batch_size",
        "1",
        "--num_iterations",
        "8",
    )
    assert result["dropped_examples"] == 3
    assert result["stable"] is True and len(result["losses"]) == 8 and all(math.isfinite(x) for x in result["losses"])
    # 8 steps of batch size 1 over the 4 kept examples: two whole epochs
    kept = [json.loads(line) for line in path.read_text().splitlines() if long_question not in line]
    kept = [tokenizer.render_conversation(chat, max_tokens=25)[1] for chat in kept]  # 25 = max_seq_len + 1
    assert len(kept) == 4 and result["tokens_seen"] == 2 * sum(sum(mask[1:]) for mask in kept)


# ----------------------------------------------------------------------------- bad input


def bad_inputs(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (extra flags, text the error line must contain)."""
    good = chat_jsonl(tmp / "good.jsonl", [("hi", "ok")])
    broken = tmp / "broken.jsonl"
    broken.write_text(good.read_text() + "{not json\n" + good.read_text())
    empty_answers = chat_jsonl(tmp / "empty.jsonl", [("hello there", ""), ("how are you", "")])
    save_tokenizer(byte_tokenizer(), tmp / "bytes-tokenizer")
    model = ["--model", str(FIXTURE)]
    return {
        "unknown group": ([*model, "--dataset", str(good), "--trainable_param_groups", "matrix,bias"], "bias"),
        "zero lr": ([*model, "--dataset", str(good), "--learning_rate", "0"], "learning_rate"),
        "negative lr": ([*model, "--dataset", str(good), "--learning_rate=-0.5"], "learning_rate"),
        "missing model": (["--model", str(tmp / "no-such-model"), "--dataset", str(good)], "no-such-model"),
        "malformed jsonl": ([*model, "--dataset", str(broken)], "line 2"),
        # empty assistant replies are still supervised by <|assistant_end|>: max_seq_len 4 cuts before any of it
        "no supervised tokens": (
            [*model, "--dataset", str(empty_answers), "--max_seq_len", "4"],
            "no supervised tokens",
        ),
        "vocab mismatch": (
            [*model, "--tokenizer", str(tmp / "bytes-tokenizer"), "--dataset", str(good)],
            "vocab_size is 289",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "unknown group",
        "zero lr",
        "negative lr",
        "missing model",
        "malformed jsonl",
        "no supervised tokens",
        "vocab mismatch",
    ],
)
def test_bad_input_is_one_error_line(tmp_path, capsys, case):
    flags, expected = bad_inputs(tmp_path)[case]
    out = tmp_path / "r.json"
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "--wandb", "disabled", "--out", str(out), *flags])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    lines = [line for line in (captured.out + captured.err).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("error:") and expected in lines[0], lines[0]
    assert "Traceback" not in captured.out + captured.err
    assert not out.exists()


def test_config_file_sets_options_and_flags_override_it(tmp_path, default_model):
    """`--config_path` takes a YAML file with the options under `cfg:`; a flag on the command line wins over it."""
    config_file = tmp_path / "finetune.yaml"
    config_file.write_text("cfg:\n  learning_rate: 0.05\n  num_tokens: 400\n  seed: 7\n")
    result = run_cli(tmp_path, "--config_path", str(config_file), "--seed", "11", "--wandb", "disabled")
    assert result["learning_rate"] == 0.05 and result["num_tokens_target"] == 400
    assert result["seed"] == 11
