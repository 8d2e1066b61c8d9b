"""How many lanes fit, without a GPU: the real training step (`lanes.lanes_step` on a `row.nanochat_row`) traced
under FakeTensorMode (tensors with shapes and no storage) with torch's own memory tracker, MemTracker, which sees every
allocation and free. So `fractal-vmap plan --model d20 --lanes 16 --gpu_mem 80GB` answers on a laptop.

A step's peak memory is linear in the lanes: every per-lane tensor is stacked [L, ...], and what is not (the frozen
weights, the head's one-lane-at-a-time logits) is a fixed cost. So two traces (2 and 4 lanes) give the fixed bytes and
the bytes per lane, by kind: the lanes' weights, their optimizer state, the activations kept for the backward, what the
head keeps (each lane's lm_head and input gradients), and what the backward and update add at the peak (gradients
and temporaries). tests/test_plan.py checks the estimate against the allocations of real CPU steps.

Not in the trace: the CUDA context and cuBLAS workspaces (a few hundred MB, outside torch's allocator) and the
caching allocator's fragmentation: HEADROOM leaves room for both.
"""

import contextlib
import functools
import re
from dataclasses import asdict, dataclass, field, replace

import torch

from fractal_vmap.errors import UserError
from fractal_vmap.head import lanes_head_loss
from fractal_vmap.lanes import MIN_LANES, lanes_step
from fractal_vmap.model import GPTConfig, param_shapes
from fractal_vmap.options import FinetuneConfig
from fractal_vmap.tasks.nanochat.levers import Levers
from fractal_vmap.tasks.nanochat.row import nanochat_row

HEADROOM = 0.9  # plan chunks to use at most 90% of the memory: CUDA context, cuBLAS workspaces, fragmentation


TRACE_LANES = (MIN_LANES, 2 * MIN_LANES)  # the two traced widths: the smallest a chunk runs with, and twice that


KINDS = ("params", "optimizer", "activations", "head", "backward")  # per-lane bytes, in the order they are printed


KIND_NAMES = {
    "params": "trained weights (float32; LoRA: the adapters)",
    "optimizer": "optimizer state",
    "activations": "activations kept for the backward",
    "head": "head (lm_head and input gradients)",
    "backward": "gradients and temporaries at the peak",
}


# lever settings tried in turn until the lanes fit: the default path first, then the levers that change no number
LEVER_LADDER = (Levers(), Levers(step_in_backward=True), Levers(remat=True), Levers(step_in_backward=True, remat=True))


def parse_bytes(text: str) -> int:
    """ "80GB" -> 80e9, "74.5GiB" -> 74.5 * 2^30, "500MB", or a plain number of bytes."""
    units = {
        "": 1,
        "B": 1,
        "KB": 1e3,
        "MB": 1e6,
        "GB": 1e9,
        "TB": 1e12,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "TIB": 2**40,
    }
    match = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if match is None or match.group(2).upper() not in units:
        raise UserError(f"memory size {text!r} is not a size: write e.g. 80GB, 74.5GiB or 500MB")
    return int(float(match.group(1)) * units[match.group(2).upper()])


@dataclass
class Trace:
    """One traced step of a row of `lanes` lanes: bytes alive at its landmarks."""

    lanes: int
    static: int  # before the step: the base model, the stacked weights, the optimizer state
    params: int  # of which the stacked trained weights
    before_backward: int  # after the forward: static + activations + what the head keeps
    head: int  # what the head's forward keeps for the backward
    peak: int  # the step's peak


def trace_step(
    config: GPTConfig,
    lanes: int,
    batch: int,
    seq: int,
    dtype: str = "float32",
    groups: str = "matrix,unembedding",
    levers: Levers = Levers(),
    fake: bool = True,
    kernels: str = "torch",
    lora_rank: int = 0,
    lora_targets: str = "all",
) -> Trace:
    """Trace one training step of `lanes` lanes with MemTracker, under FakeTensorMode (no memory used, nothing
    computed); fake=False runs the step for real on CPU, random weights (to check the estimate against). kernels
    "triton": the CUDA path (fake only), whose head (kernels/ops.py) also holds a [lanes, chunk, vocab] buffer."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    from fractal_vmap.kernels import chunk_tokens, tracing

    assert fake or kernels == "torch", "a real CPU step runs the torch path"

    cpu = torch.device("cpu")  # fake CPU tensors: CUDA ones would need a CUDA driver for the backward
    cfg = FinetuneConfig(
        device="cpu", dtype=dtype, trainable_param_groups=groups, lora_rank=lora_rank, lora_targets=lora_targets
    )
    marks: dict[str, int] = {}
    with FakeTensorMode() if fake else contextlib.nullcontext():
        params = {
            k: torch.randn(s) * 0.02 for k, s in param_shapes(config).items()
        }  # the base model, as a grid holds it
        idx = torch.randint(0, config.vocab_size, (batch, seq))
        tracker = MemTracker()
        tracker.track_external(*params.values(), idx)

        def alive() -> int:
            return tracker.get_tracker_snapshot()[cpu]["Total"]

        def head(x, w, targets):  # the lanes' head, noting what its forward keeps
            before = alive()
            loss = lanes_head_loss(x, w, targets, kernels=kernels)
            if kernels == "triton":  # the kernel's temporaries, alive with dx and dw at its end (MemTracker sees a
                # custom op's outputs only): the logits buffer, and dw's float32 accumulator when w is not float32
                V, C = w.shape[-2:]
                torch.empty(lanes * min(x.numel() // C, chunk_tokens(V, torch.bfloat16)) * V, dtype=torch.bfloat16)
                if "unembedding" in groups and w.dtype != torch.float32:
                    torch.empty(lanes, V, C)
            marks["head"] = alive() - before
            return loss

        with tracker, tracing() if kernels == "triton" else contextlib.nullcontext():
            row = nanochat_row(
                [cfg] * lanes, config, params, [1] * lanes, cpu, kernels=kernels, head=head, levers=levers
            )
            marks["static"] = alive()
            update = row.model.update

            def noting(step, losses, active):  # called by lanes_step after the forward, before the backward
                marks["before_backward"] = alive()
                update(step, losses, active)

            row.model.update = noting
            lanes_step(row, 0, idx, idx)
        peak = tracker.get_tracker_snapshot("peak")[cpu]["Total"]
        params_bytes = sum(p.numel() * p.element_size() for p in row.model.params.values())
    return Trace(lanes, marks["static"], params_bytes, marks["before_backward"], marks["head"], peak)


@dataclass
class MemoryPlan:
    """Peak bytes of a step as fixed + lanes x per lane, per lane split by kind (KINDS)."""

    config: dict
    batch: int
    seq: int
    dtype: str
    levers: dict
    fixed: int
    per_lane: dict[str, int] = field(default_factory=dict)

    @property
    def lane_bytes(self) -> int:
        return sum(self.per_lane.values())

    def peak(self, lanes: int) -> int:
        """The estimated peak of a chunk of `lanes` lanes (never fewer than the engine runs with)."""
        return self.fixed + max(lanes, MIN_LANES) * self.lane_bytes

    def lanes_that_fit(self, memory: int, headroom: float = HEADROOM) -> int:
        """The most lanes whose peak stays within headroom x memory; 0 if not even the smallest chunk (MIN_LANES, a
        single lane runs with an idle one) does."""
        lanes = int((memory * headroom - self.fixed) // self.lane_bytes)
        return lanes if lanes >= MIN_LANES else 0


@functools.lru_cache(maxsize=64)
def estimate_memory(
    config: GPTConfig,
    batch: int,
    seq: int,
    dtype: str = "float32",
    groups: str = "matrix,unembedding",
    levers: Levers = Levers(),
    kernels: str = "torch",
    lora_rank: int = 0,
    lora_targets: str = "all",
) -> MemoryPlan:
    """The linear memory model from two traced steps (TRACE_LANES lanes). Cached: a grid's rows ask it again.
    kernels "triton": the CUDA path's (the Triton optimizer steps and head), traced all the same. lora_rank > 0: LoRA
    lanes (only their adapters and its optimizer state are per lane; the base is fixed)."""
    lora = dict(lora_rank=lora_rank, lora_targets=lora_targets)
    a, b = (trace_step(config, n, batch, seq, dtype, groups, levers, kernels=kernels, **lora) for n in TRACE_LANES)

    def slope(get) -> int:
        return round((get(b) - get(a)) / (b.lanes - a.lanes))

    per_lane = {
        "params": slope(lambda t: t.params),
        "optimizer": slope(lambda t: t.static - t.params),
        "activations": slope(lambda t: t.before_backward - t.static - t.head),
        "head": slope(lambda t: t.head),
        "backward": slope(lambda t: t.peak - t.before_backward),
    }
    fixed = a.peak - a.lanes * sum(per_lane.values())
    return MemoryPlan(asdict(config), batch, seq, dtype, asdict(levers), fixed, per_lane)


def plan_levers(
    config: GPTConfig,
    lanes: int,
    memory: int,
    batch: int,
    seq: int,
    dtype: str,
    groups: str = "matrix,unembedding",
    base: Levers = Levers(),
    kernels: str = "torch",
    lora_rank: int = 0,
    lora_targets: str = "all",
) -> MemoryPlan:
    """The first of LEVER_LADDER (with `base`'s number-changing settings) under which `lanes` lanes fit in `memory`;
    if none does, the most frugal one (then fewer lanes than asked fit)."""
    for rung in LEVER_LADDER:
        levers = replace(
            base, step_in_backward=rung.step_in_backward or base.step_in_backward, remat=rung.remat or base.remat
        )
        if levers.micro_batches > 1 and levers.step_in_backward:
            continue
        plan = estimate_memory(config, batch, seq, dtype, groups, levers, kernels, lora_rank, lora_targets)
        if plan.lanes_that_fit(memory) >= lanes:
            return plan
    return plan


def parse_levers(
    text: str,
    micro_batches: int = 1,
    momentum_dtype: str = "float32",
    master_dtype: str = "float32",
    dtype: str = "bfloat16",
) -> Levers | None:
    """--levers as Levers with the number-changing settings (None for auto); one UserError line for a bad value."""
    for name, value in (("momentum_dtype", momentum_dtype), ("master_dtype", master_dtype)):
        if value not in ("float32", "bfloat16"):
            raise UserError(f"--{name} {value!r} is not one of float32, bfloat16")
    if master_dtype == "bfloat16" and dtype != "bfloat16":
        raise UserError("--master_dtype bfloat16 needs the bfloat16 autocast: add --dtype bfloat16")
    if micro_batches < 1:
        raise UserError(f"--micro_batches is {micro_batches}: it must be at least 1")
    if text == "auto":
        return None
    names = [] if text == "none" else [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in ("step_in_backward", "remat")]
    if unknown or (text != "none" and not names):
        raise UserError(f"--levers {text!r}: use auto, none, or a comma list of step_in_backward, remat")
    if "step_in_backward" in names and micro_batches > 1:
        raise UserError(
            "--micro_batches > 1 keeps every gradient between micro-batches: it does not combine with step_in_backward"
        )
    return Levers(
        step_in_backward="step_in_backward" in names,
        remat="remat" in names,
        micro_batches=micro_batches,
        momentum_dtype=momentum_dtype,
        master_dtype=master_dtype,
    )
