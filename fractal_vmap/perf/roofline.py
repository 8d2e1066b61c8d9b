"""A GPU runtime projection made without a GPU. It is a projection, not a measurement: every figure it prints says so.

One training step is traced under FakeTensorMode with torch's roofline estimator (RuntimeEstimator, its
"operator-level-cost-model": each op takes max(FLOPs / peak, bytes moved / bandwidth) at the pinned datasheet device),
for a vmapped row of L lanes (`lanes.lanes_step`, the grid's step) on the path CUDA runs (kernels "triton": the fused
AdamW, the Muon passes around Newton-Schulz and the lanes' head, which enter the trace as the custom ops of
kernels/ops.py and are charged the launches and bytes kernels/costs.py counts for them) and for one model's
`finetune` step (torch.optim AdamW + Muon), the sequential loop being L of those. With lora_rank > 0 both are the
LoRA steps (a row of adapters on the shared frozen base; `finetune --lora_rank`, AdamW on the adapters), and the
row's matmuls are summed up by kind and shape (shared_base.py: the base's one [L*B*T, in] @ [in, out] each). To the
ops' times a host cost per kernel launch is added by replaying the op sequence through a launch queue: the host
issues an op every LAUNCH_US, the GPU runs them in order, so a step of many small ops is launch-bound and one of
large ops is not. The ops are the
eager step's: the compiled step (`--compile`) fuses the elementwise ones, which this does not project.

What the estimator is told, and why:
- matmuls (mm, addmm, bmm, baddbmm, and the head's) are timed by device.py's stated model of the GPU (wave and tile
  quantization over its SMs at cuBLAS's tile sizes, a sustained share of the peak), not torch's flat 75% of peak;
- the device is registered from NVIDIA's datasheet numbers (device.GPUS) at half its dense FLOP/s: torch's flops_to_ns
  halves the FLOPs (into multiply-adds) and then divides by 75% of the FLOP/s it is given, which would run an op at
  150% of the datasheet's peak; with half the FLOP/s, the other ops' FLOPs run at 75% of peak (they are bound by
  their bytes anyway);
- its accelerator check is patched out (it only guards the benchmarking mode; the roofline reads the pinned device);
- attention returns a bfloat16 output and a float32 logsumexp, which its compute model refuses (one output dtype):
  those ops are estimated here with torch's own get_compute_time (rescaled to device.ATTENTION_EFFICIENCY) and
  get_transfer_time on the output's dtype;
- `prim.*` ops (tensor.device queries) move no data: they cost nothing and launch nothing.
"""

import contextlib
import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from unittest import mock

import torch
import torch.utils._pytree as pytree

from fractal_vmap import lora
from fractal_vmap.kernels import chunk_tokens, costs, tracing
from fractal_vmap.lanes import lanes_step
from fractal_vmap.model import GPTConfig, param_shapes
from fractal_vmap.options import FinetuneConfig
from fractal_vmap.perf.device import ATTENTION_EFFICIENCY, GPUS, Gpu, matmul_seconds  # noqa: F401 (GPUS: re-exported)
from fractal_vmap.perf.shared_base import shared_base
from fractal_vmap.reference import ReferenceModel
from fractal_vmap.tasks.nanochat.levers import Levers
from fractal_vmap.tasks.nanochat.row import nanochat_row

# Host time per kernel launch in eager PyTorch: NVIDIA's floor for launching an empty kernel is ~3 us on recent GPUs
# and drivers (NVIDIA developer forums, "Too much time for kernel launch latency", 2022), and Python and torch's
# dispatcher add several us per op before it (more under vmap, whose batching rules run per op). 10 us is assumed.
LAUNCH_US = 10.0
GPUS_PER_NODE = 8


def register(gpu: Gpu) -> str:
    """Register the GPU with torch's datasheet table (see the module docstring for the halving); returns its name."""
    from torch._inductor.analysis.device_info import DeviceInfo, register_device_info

    name = f"fractal-vmap {gpu.name}"
    bf16, fp32 = gpu.bf16_tflops / 2, gpu.fp32_tflops / 2
    register_device_info(
        name,
        DeviceInfo(
            tops={torch.bfloat16: bf16, torch.float16: bf16, torch.float32: fp32, torch.float64: fp32},
            dram_bw_gbs=gpu.hbm_gbs,
            dram_gb=gpu.memory_gb,
        ),
    )
    return name


@dataclass(frozen=True)
class Matmul:
    """One traced aten matmul: `batch` products [m, k] x [k, n] (mm: batch 1), its projected seconds and the bytes of
    its second operand (x @ W's weight: read once however large m is)."""

    batch: int
    m: int
    k: int
    n: int
    seconds: float
    weight_bytes: int

    @property
    def flops(self) -> int:
        return 2 * self.batch * self.m * self.k * self.n


def op_times(step: Callable[[], None], gpu: Gpu, matmuls: list[Matmul] | None = None) -> list[tuple[str, float]]:
    """(op, seconds at the roofline) of each kernel-launching op of step(), traced under the caller's FakeTensorMode;
    each aten matmul's shape and time also appended to `matmuls` if given."""
    from torch.distributed._tools.runtime_estimator import RuntimeEstimator
    from torch.utils._runtime_estimation import _VIEW_OPS, get_compute_time, get_transfer_time

    name, times = register(gpu), []

    class OpTimes(RuntimeEstimator):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func.namespace == "prim":  # tensor metadata (.device): no data moved, no kernel
                return func(*args, **kwargs)
            if func.namespace == "fractal_vmap":  # a Triton kernel's custom op: the launches costs.py counts
                out = func(*args, **kwargs)
                times.extend((launch.name, launch_seconds(launch, gpu)) for launch in kernel_launches(func, args))
                return out
            if func._overloadpacket in MATMULS:  # the device model's matmul, not a flat share of the peak
                out = func(*args, **kwargs)
                times.append((func._overloadpacket.__name__, matmul_op_seconds(func, args, out, gpu)))
                if matmuls is not None:
                    a, b = args[-2:]
                    batch = a.shape[0] if a.ndim == 3 else 1
                    shape = (batch, a.shape[-2], a.shape[-1], b.shape[-1])
                    matmuls.append(Matmul(*shape, times[-1][1], b.numel() * b.element_size()))
                return out
            if func._overloadpacket in MIXED_OUTPUT_OPS:
                out = func(*args, **kwargs)
                moved = get_transfer_time(pytree.tree_leaves((args, kwargs)), pytree.tree_leaves(out), gpu_type=name)
                # torch's compute time is at 75% of peak (the halving above): rescaled to the flash kernels' share
                compute = get_compute_time(func._overloadpacket, args, kwargs, out, {args[0].dtype}, gpu_type=name)
                ms = max(moved, compute * 0.75 / ATTENTION_EFFICIENCY) / 1e6
            else:
                out, ms = self._estimate(func, args, kwargs)
            if func._overloadpacket not in _VIEW_OPS:  # torch's list of ops that make views: no kernel
                times.append((func._overloadpacket.__name__, ms / 1e3))
            return out

    with mock.patch.object(torch.accelerator, "is_available", lambda: True), contextlib.redirect_stdout(io.StringIO()):
        with OpTimes(gpu_type=name)("operator-level-cost-model"):
            step()
    return times


aten = torch.ops.aten
MIXED_OUTPUT_OPS = {
    aten._scaled_dot_product_flash_attention_for_cpu,
    aten._scaled_dot_product_flash_attention_for_cpu_backward,
    aten._scaled_dot_product_flash_attention,
    aten._scaled_dot_product_flash_attention_backward,
    aten._scaled_dot_product_efficient_attention,
    aten._scaled_dot_product_efficient_attention_backward,
}


MATMULS = {aten.mm, aten.addmm, aten.bmm, aten.baddbmm}


def matmul_op_seconds(func, args, out, gpu: Gpu) -> float:
    """An aten matmul's time (device.matmul_seconds) from its operands' shapes: mm/addmm [m, k] x [k, n], bmm/baddbmm
    [b, m, k] x [b, k, n]; the bytes are its operands read (the added one too) and its output written."""
    a, b = args[-2:]
    batch = a.shape[0] if a.ndim == 3 else 1
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    moved = (
        sum(t.numel() * t.element_size() for t in args if isinstance(t, torch.Tensor))
        + out.numel() * out.element_size()
    )
    return matmul_seconds(gpu, batch, m, n, k, moved, tensor_cores=a.dtype in (torch.bfloat16, torch.float16))


def kernel_launches(func, args) -> list[costs.Launch]:
    """The launches of one call of a kernels/ops.py custom op, from its arguments' shapes."""
    name = func._overloadpacket.__name__
    if name == "adamw_step":
        return costs.adamw_launches(args[0].numel())
    if name == "muon_momentum":
        return costs.muon_momentum_launches(args[0].numel())
    if name == "muon_update":
        return costs.muon_update_launches(args[0].numel())
    if name == "triton_head":
        x, w, _, need_dx, need_dw, dtype = args
        (L, N, C), V = x.shape, w.shape[-2]
        chunk = min(N, chunk_tokens(V, dtype or x.dtype))
        return costs.head_launches(L, N, C, V, chunk, w.ndim == 2, need_dx, need_dw, x.element_size(), w.element_size())
    raise NotImplementedError(f"no cost model for the custom op {name}: add it to kernels/costs.py")


def launch_seconds(launch: costs.Launch, gpu: Gpu) -> float:
    """A kernel launch at the roofline: its bytes over the bandwidth; a matmul (bf16) by the device model."""
    if launch.matmul is not None:
        return matmul_seconds(gpu, *launch.matmul, launch.bytes)
    return launch.bytes / (gpu.hbm_gbs * 1e9)


def launch_bound(times: list[float], launch_s: float) -> float:
    """A step's wall time: the host issues op k at k x launch_s, the GPU runs each op when issued and the previous
    done."""
    end = 0.0
    for k, t in enumerate(times):
        end = max(k * launch_s, end) + t
    return end


def row_step_times(
    config: GPTConfig,
    lanes: int,
    batch: int,
    seq: int,
    levers: Levers,
    gpu: Gpu,
    groups: str,
    lora_rank: int = 0,
    lora_targets: str = "all",
    matmuls: list[Matmul] | None = None,
) -> list[tuple[str, float]]:
    """The op times of one grid step (lanes.lanes_step) of `lanes` lanes, bf16 autocast as on CUDA; lora_rank > 0:
    LoRA lanes (the base frozen and shared). The lanes share one batch, as a grid row's lanes do."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    cfg = lane_config(groups, lora_rank, lora_targets)
    with FakeTensorMode():
        params = {k: torch.empty(s) for k, s in param_shapes(config).items()}
        idx = torch.randint(0, config.vocab_size, (batch, seq))
        with tracing():  # the Triton path on fake CPU tensors: its custom ops' fake implementations run
            row = nanochat_row(
                [cfg] * lanes, config, params, [1] * lanes, torch.device("cpu"), kernels="triton", levers=levers
            )
            return op_times(lambda: lanes_step(row, 0, idx, idx), gpu, matmuls)


def lane_config(groups: str, lora_rank: int, lora_targets: str) -> FinetuneConfig:
    """A traced lane's settings: bf16 autocast as on CUDA, the trained groups or (lora_rank > 0) LoRA adapters."""
    return FinetuneConfig(
        device="cpu", dtype="bfloat16", trainable_param_groups=groups, lora_rank=lora_rank, lora_targets=lora_targets
    )


def single_step_times(
    config: GPTConfig, batch: int, seq: int, gpu: Gpu, groups: str, lora_rank: int = 0, lora_targets: str = "all"
) -> list[tuple[str, float]]:
    """The op times of one `finetune` step (reference.ReferenceModel's loss and update): forward under bf16 autocast,
    backward, torch.optim AdamW (foreach, its CUDA default) and Muon (LoRA: AdamW on the adapters), gradients
    dropped. Its loss.item() is the host sync each step starts from."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    cfg = lane_config(groups, lora_rank, lora_targets)
    with FakeTensorMode():
        params = {k: torch.empty(s) for k, s in param_shapes(config).items()}
        idx = torch.randint(0, config.vocab_size, (batch, seq))
        model = ReferenceModel(cfg, config, params, torch.device("cpu"), foreach=True)
        return op_times(lambda: model.update(0, 1, model.loss(idx, idx)), gpu)


def flops_per_token(config: GPTConfig, seq: int, lora_rank: int = 0, lora_targets: str = "all") -> float:
    """Model FLOPs per trained token (nanochat's estimate): 6 x the non-embedding params, plus
    12 x layers x heads x head_dim x sequence for attention. LoRA: the frozen weights' forward and input gradients,
    4 x theirs (no weight gradients), plus 6 x the adapters'."""
    params = sum(math.prod(s) for k, s in param_shapes(config).items() if k != "transformer.wte.weight")
    attention = 12 * config.n_layer * config.n_head * config.head_dim * seq
    if lora_rank == 0:
        return 6 * params + attention
    adapters = sum(math.prod(s) for s in lora.adapter_shapes(config, lora_rank, lora_targets).values())
    return 4 * params + 6 * adapters + attention


@dataclass
class Projection:
    """One step of a row of `lanes` lanes against `lanes` steps of one model, projected on `gpu`."""

    gpu: str
    lanes: int
    levers: dict
    launch_us: float
    row_s: float  # the row's step, launches included
    row_gpu_s: float  # its ops alone, back to back
    row_launches: int
    single_s: float  # one model's step, launches included
    single_gpu_s: float
    single_launches: int
    model_flops: float  # per row step
    row_by_op: dict[str, float]  # the row's GPU seconds by op, largest first
    shared_base: dict | None = None  # LoRA: the shared base's matmuls against the adapters' (perf/shared_base.py)

    @property
    def speedup(self) -> float:
        """The row against the sequential loop (lanes x one model's step)."""
        return self.lanes * self.single_s / self.row_s

    def mfu(self, gpu: Gpu) -> float:
        """Model FLOPs per second of the row's step, over the datasheet's dense bf16 peak."""
        return self.model_flops / self.row_s / (gpu.bf16_tflops * 1e12)


def project_runtime(
    config: GPTConfig,
    lanes: int,
    gpu: str = "h100",
    batch: int = 8,
    seq: int = 1024,
    levers: Levers = Levers(),
    groups: str = "matrix,unembedding",
    launch_us: float = LAUNCH_US,
    lora_rank: int = 0,
    lora_targets: str = "all",
) -> Projection:
    """Project one grid step of `lanes` lanes and the sequential loop's `lanes` finetune steps on a datasheet GPU;
    lora_rank > 0: LoRA lanes against `finetune --lora_rank`, with the shared base's matmuls summed up."""
    device, lora_kw, matmuls = GPUS[gpu], dict(lora_rank=lora_rank, lora_targets=lora_targets), []
    row_ops = row_step_times(config, lanes, batch, seq, levers, device, groups, **lora_kw, matmuls=matmuls)
    row = [t for _, t in row_ops]
    single = [t for _, t in single_step_times(config, batch, seq, device, groups, **lora_kw)]
    by_op: dict[str, float] = {}
    for name, t in row_ops:
        by_op[name] = by_op.get(name, 0.0) + t
    launch = launch_us * 1e-6
    return Projection(
        device.name,
        lanes,
        levers.__dict__,
        launch_us,
        launch_bound(row, launch),
        sum(row),
        len(row),
        launch_bound(single, launch),
        sum(single),
        len(single),
        flops_per_token(config, seq, **lora_kw) * batch * seq * lanes,
        dict(sorted(by_op.items(), key=lambda kv: -kv[1])),
        shared_base(matmuls, lora_rank, sum(row), by_op, lanes * batch * seq) if lora_rank else None,
    )


def grid_seconds(projection: Projection, steps: int, cells: int = 64 * 64, gpus: int = GPUS_PER_NODE) -> float:
    """A grid of `cells` cells of `steps` steps on `gpus` GPUs, each running chunks of projection.lanes lanes."""
    chunks = math.ceil(math.ceil(cells / gpus) / projection.lanes)
    return chunks * steps * projection.row_s
