"""The float32 noise floor of a fine-tuning trajectory: how far two correct runs drift apart when only the summation
order of a matmul differs, as it does between two CPUs' BLAS (or a batched and a single matmul on some of them).

For each model and learning rate, `finetune`'s reference loop (single.py) runs twice on the same batches: as is, and
with every linear layer's weight gradient summed over the tokens in two parts (dW = dY[:h]^T X[:h] + dY[h:]^T X[h:],
h = N/3 + 1),
which is what a BLAS with another blocking of the reduction does. The largest per-step |dloss| between the two is
that trajectory's noise floor: lanes are held to a tolerance derived from it (tests/test_lanes.py), at learning rates
where it is small (the non-chaotic regime). Muon's bfloat16 Newton-Schulz turns a 1-ulp gradient change into a
1-bf16-ulp update change now and then, so the floor grows with the learning rate until training turns chaotic.

Also measured: the lanes engine against `finetune` on this machine, as is (0 where the BLAS computes a batched
matmul like a single one, as on AMD EPYC).

    uv run python benchmarks/fidelity.py            # ~3 min on 2 cores
"""

import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from simple_parsing import ArgumentParser
from torch.overrides import TorchFunctionMode

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS_DIR, environment, write_json  # noqa: E402

from fractal_vmap.checkpoint import load_model  # noqa: E402
from fractal_vmap.cli import tune_allocator  # noqa: E402
from fractal_vmap.lanes import train_lanes  # noqa: E402
from fractal_vmap.model import GPTConfig, init_params  # noqa: E402
from fractal_vmap.recipe import FinetuneConfig  # noqa: E402
from fractal_vmap.sft import load_source, make_stream, render_split, total_steps  # noqa: E402
from fractal_vmap.single import train_single  # noqa: E402

FIXTURE = Path(__file__).parent.parent / "tests" / "fixtures" / "nanochat-d2"
CPU = torch.device("cpu")
# a GQA model (4 query heads share 2 kv heads), random init, trained on the fixture's batches
GQA_CONFIG = GPTConfig(sequence_len=128, vocab_size=289, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)


@dataclass
class Options:
    lrs: list[float] = field(default_factory=lambda: [0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0])
    models: str = ""  # only the models whose name contains this (default: all)
    dtype: str = "float32"  # or bfloat16: the autocast path the GPU runs, here on CPU
    steps: int = 0  # steps per run (0: each model's own, 35 for the default model, 30 for the others)
    out: str = ""  # default: benchmarks/results/fidelity-cpu-<dtype>.json


class _SplitSumLinear(torch.autograd.Function):
    """F.linear whose weight gradient sums the tokens in two parts: another summation order, same math."""

    @staticmethod
    def forward(x, w):
        return F.linear(x, w)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        g2, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
        h = g2.shape[0] // 3 + 1  # off any power-of-two block a BLAS would split the reduction at itself
        grad_w = g2[:h].T @ x2[:h] + g2[h:].T @ x2[h:]
        return grad @ w, grad_w


class SplitSumMatmuls(TorchFunctionMode):
    """Every F.linear in the block computes its weight gradient as _SplitSumLinear does. Under autocast the inputs are
    cast first, as autocast would: each part's bf16 product is then rounded on its own before the two are added (up to
    two more roundings than one bf16 matmul: if anything, this overstates a bf16 BLAS's reordering noise)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.linear and len(args) == 2 and not kwargs:
            if torch.is_autocast_enabled("cpu"):
                args = tuple(a.to(torch.get_autocast_dtype("cpu")) for a in args)
            return _SplitSumLinear.apply(*args)
        return func(*args, **(kwargs or {}))


def fixture_cfg(lr: float, **kw) -> FinetuneConfig:
    """The fixture's recipe (its README): every group trained, constant lr, no weight decay; lr sets every group."""
    return FinetuneConfig(
        learning_rate=lr,
        trainable_param_groups="all",
        weight_decay=0.0,
        warmup_frac=0.0,
        final_lr_frac=1.0,
        device="cpu",
        num_iterations=30,
        **kw,
    )


def setups():
    """name -> (config, params, batches, steps, cfg for an lr): the models the tests compare lanes on."""
    base = FinetuneConfig(device="cpu", num_tokens=2400)  # 35 steps of the default stream
    config, params, tokenizer = load_source(base, CPU)
    stream = make_stream(base, tokenizer, render_split(base, tokenizer, config, "train")[0], base.seed)
    steps = total_steps(base, stream.batch(0)[1])
    traj = torch.load(FIXTURE / "trajectories.pt")
    inputs, targets = traj["batch_inputs"], traj["batch_targets"]
    fixture_batches = lambda s: (inputs[s % 30], targets[s % 30])  # noqa: E731
    fixture_config, fixture_params, _ = load_model(str(FIXTURE))
    return {
        "default model (SFT recipe)": (
            config,
            params,
            stream.batch,
            steps,
            lambda lr: FinetuneConfig(device="cpu", num_tokens=2400, learning_rate=lr),
        ),
        "nanochat-d2 fixture": (fixture_config, fixture_params, fixture_batches, 30, fixture_cfg),
        "GQA 4q/2kv random init": (GQA_CONFIG, init_params(GQA_CONFIG, seed=1), fixture_batches, 30, fixture_cfg),
    }


def max_gap(a: list[float], b: list[float]) -> float:
    n = min(len(a), len(b))
    if len(a) != len(b):
        return float("inf")  # one run diverged earlier than the other
    return max(abs(x - y) for x, y in zip(a[:n], b[:n]))


def main() -> None:
    parser = ArgumentParser()
    parser.add_arguments(Options, dest="opts")
    opts = parser.parse_args().opts
    tune_allocator()
    console = Console()
    rows = []
    for name, (config, params, batches, steps, make_cfg) in setups().items():
        if opts.models not in name:
            continue
        steps = opts.steps or steps
        cfgs = [replace(make_cfg(lr), dtype=opts.dtype, num_iterations=steps) for lr in opts.lrs]
        lanes = train_lanes(cfgs, config, params, batches, [steps] * len(cfgs), CPU)
        for cfg, lane in zip(cfgs, lanes):
            single, _ = train_single(cfg, config, params, batches, steps, CPU)
            with SplitSumMatmuls():
                reordered, _ = train_single(cfg, config, params, batches, steps, CPU)
            rows.append(
                {
                    "model": name,
                    "lr": cfg.learning_rate,
                    "steps": steps,
                    "final_loss": single.final_loss,
                    "converged": single.converged,
                    "ratio": single.trainable_ratio,
                    "noise_floor": max_gap(single.losses, reordered.losses),
                    "labels_agree": single.converged == reordered.converged,
                    "lane_vs_finetune": max_gap(lane.losses, single.losses),
                }
            )
            console.print(rows[-1])
    table = Table(
        title="float32 noise floor: max per-step |dloss| between finetune and finetune with reordered matmul sums"
    )
    for col in ("model", "lr", "steps", "final loss", "converged (ratio)", "noise floor", "lanes vs finetune here"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["model"],
            f"{r['lr']:g}",
            str(r["steps"]),
            f"{r['final_loss']:.4f}",
            f"{r['converged']} ({r['ratio']:.3f})",
            f"{r['noise_floor']:.2e}",
            f"{r['lane_vs_finetune']:.2e}",
        )
    console.print(table)
    write_json(
        {"environment": environment(CPU), "options": asdict(opts), "rows": rows},
        Path(opts.out or RESULTS_DIR / f"fidelity-cpu-{opts.dtype}.json"),
    )


if __name__ == "__main__":
    main()
