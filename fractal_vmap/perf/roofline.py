"""A GPU runtime projection made without a GPU. It is a projection, not a measurement: every figure it prints says so.

One training step is traced under FakeTensorMode with torch's roofline estimator (RuntimeEstimator, its
"operator-level-cost-model": each op takes max(FLOPs / peak, bytes moved / bandwidth) at the pinned datasheet device),
for a vmapped row of L lanes (`lanes.lanes_step`, the grid's step) and for one model's `finetune` step (torch.optim
AdamW + Muon), the sequential loop being L of those. To the ops' times a host cost per kernel launch is added by
replaying the op sequence through a launch queue: the host issues an op every LAUNCH_US, the GPU runs them in order,
so a step of many small ops is launch-bound and one of large ops is not.

What the estimator is told, and why:
- the device is registered from NVIDIA's datasheet numbers (GPUS) at half its dense FLOP/s: torch's flops_to_ns
  halves the FLOPs (into multiply-adds) and then divides by 75% of the FLOP/s it is given, which would run every matmul
  at 150% of the datasheet's peak; with half the FLOP/s, matmuls run at the 75% of peak that its docstring intends;
- its accelerator check is patched out (it only guards the benchmarking mode; the roofline reads the pinned device);
- attention returns a bfloat16 output and a float32 logsumexp, which its compute model refuses (one output dtype):
  those ops are estimated here with torch's own get_compute_time and get_transfer_time on the output's dtype;
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

from fractal_vmap.lanes import lanes_step
from fractal_vmap.model import GPTConfig, param_shapes
from fractal_vmap.options import FinetuneConfig
from fractal_vmap.reference import ReferenceModel
from fractal_vmap.tasks.nanochat.levers import Levers
from fractal_vmap.tasks.nanochat.row import nanochat_row


@dataclass(frozen=True)
class Gpu:
    """A datasheet GPU: dense (no sparsity) tensor-core bf16 and plain fp32 TFLOP/s, HBM bandwidth and size."""

    name: str
    bf16_tflops: float
    fp32_tflops: float
    hbm_gbs: float
    memory_gb: float


# NVIDIA datasheets, SXM parts. The H100's are torch's own (torch/_inductor/analysis/device_info.py: 1979 sparse =
# 989.5 dense bf16 TFLOP/s, 67 fp32, 3350 GB/s, 80 GB); the H200 has the H100's tensor cores and 4.8 TB/s of 141 GB.
GPUS = {
    "h100": Gpu("NVIDIA H100 SXM", 989.5, 67.0, 3350.0, 80.0),
    "h200": Gpu("NVIDIA H200 SXM", 989.5, 67.0, 4800.0, 141.0),
}
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


def op_times(step: Callable[[], None], gpu: Gpu) -> list[tuple[str, float]]:
    """(op, seconds at the roofline) of each kernel-launching op of step(), traced under the caller's FakeTensorMode."""
    from torch.distributed._tools.runtime_estimator import RuntimeEstimator
    from torch.utils._runtime_estimation import _VIEW_OPS, get_compute_time, get_transfer_time

    name, times = register(gpu), []

    class OpTimes(RuntimeEstimator):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func.namespace == "prim":  # tensor metadata (.device): no data moved, no kernel
                return func(*args, **kwargs)
            if func._overloadpacket in MIXED_OUTPUT_OPS:
                out = func(*args, **kwargs)
                moved = get_transfer_time(pytree.tree_leaves((args, kwargs)), pytree.tree_leaves(out), gpu_type=name)
                ms = (
                    max(
                        moved, get_compute_time(func._overloadpacket, args, kwargs, out, {args[0].dtype}, gpu_type=name)
                    )
                    / 1e6
                )
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


def launch_bound(times: list[float], launch_s: float) -> float:
    """A step's wall time: the host issues op k at k x launch_s, the GPU runs each op when issued and the previous
    done."""
    end = 0.0
    for k, t in enumerate(times):
        end = max(k * launch_s, end) + t
    return end


def row_step_times(
    config: GPTConfig, lanes: int, batch: int, seq: int, levers: Levers, gpu: Gpu, groups: str
) -> list[tuple[str, float]]:
    """The op times of one grid step (lanes.lanes_step) of `lanes` lanes, bf16 autocast as on CUDA."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    cfg = FinetuneConfig(device="cpu", dtype="bfloat16", trainable_param_groups=groups)
    with FakeTensorMode():
        params = {k: torch.empty(s) for k, s in param_shapes(config).items()}
        idx = torch.randint(0, config.vocab_size, (batch, seq))
        row = nanochat_row([cfg] * lanes, config, params, [1] * lanes, torch.device("cpu"), levers=levers)
        return op_times(lambda: lanes_step(row, 0, idx, idx), gpu)


def single_step_times(config: GPTConfig, batch: int, seq: int, gpu: Gpu, groups: str) -> list[tuple[str, float]]:
    """The op times of one `finetune` step (reference.ReferenceModel's loss and update): forward under bf16 autocast,
    backward, torch.optim AdamW (foreach, its CUDA default) and Muon, gradients dropped. Its loss.item() is the host
    sync each step starts from."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    cfg = FinetuneConfig(device="cpu", dtype="bfloat16", trainable_param_groups=groups)
    with FakeTensorMode():
        params = {k: torch.empty(s) for k, s in param_shapes(config).items()}
        idx = torch.randint(0, config.vocab_size, (batch, seq))
        model = ReferenceModel(cfg, config, params, torch.device("cpu"), foreach=True)
        return op_times(lambda: model.update(0, 1, model.loss(idx, idx)), gpu)


def flops_per_token(config: GPTConfig, seq: int) -> float:
    """Model FLOPs per trained token (nanochat's estimate): 6 x the non-embedding params, plus
    12 x layers x heads x head_dim x sequence for attention."""
    params = sum(math.prod(s) for k, s in param_shapes(config).items() if k != "transformer.wte.weight")
    return 6 * params + 12 * config.n_layer * config.n_head * config.head_dim * seq


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
) -> Projection:
    """Project one grid step of `lanes` lanes and the sequential loop's `lanes` finetune steps on a datasheet GPU."""
    device = GPUS[gpu]
    row_ops = row_step_times(config, lanes, batch, seq, levers, device, groups)
    row, single = [t for _, t in row_ops], [t for _, t in single_step_times(config, batch, seq, device, groups)]
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
        flops_per_token(config, seq) * batch * seq * lanes,
        dict(sorted(by_op.items(), key=lambda kv: -kv[1])),
    )


def grid_seconds(projection: Projection, steps: int, cells: int = 64 * 64, gpus: int = GPUS_PER_NODE) -> float:
    """A grid of `cells` cells of `steps` steps on `gpus` GPUs, each running chunks of projection.lanes lanes."""
    chunks = math.ceil(math.ceil(cells / gpus) / projection.lanes)
    return chunks * steps * projection.row_s
