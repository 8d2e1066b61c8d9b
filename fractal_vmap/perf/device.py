"""The datasheet GPUs the runtime projection (roofline.py) runs on, and a stated model of how fast a matmul runs on one.

A matmul's time is not its FLOPs over the peak. cuBLAS splits the [m, n] output of each of `batch` matmuls into tiles
(Hopper's bf16 kernels use 128 x 256, 256 x 128, 128 x 128 or 64 x 128 output tiles, stepping over k 64 at a time),
hands one tile at a time to each of the SMs, and a wave of tiles takes as long whether it fills all the SMs or one.
So a matmul of T tiles runs at

    efficiency = SUSTAINED x tile_speed x (batch m n) / (waves x SMs x tile_m x tile_n) x k / (k + K_OVERHEAD)

with waves = ceil(T / SMs): the padding of the last row and column of tiles and of the last wave is paid as if it
were work (wave and tile quantization); a smaller tile wastes less padding but runs its tensor cores less fully
(tile_speed); every tile pays a pipeline fill and an epilogue (K_OVERHEAD, in k); the best tile is taken, as cuBLAS's
heuristics aim to. SUSTAINED is the fraction of the datasheet peak that a large, perfectly tiled bf16 matmul holds.

Numbers, and where they come from:
- NVIDIA H100 SXM5 datasheet: 989.5 dense bf16 TFLOP/s (1979 with sparsity), 67 fp32 TFLOP/s, 3.35 TB/s of HBM3,
  80 GB; 132 SMs (the H100 whitepaper: 132 of the GH100's 144 SMs on the SXM5 part). H200 SXM: the same GH100 tensor
  cores and 132 SMs, 4.8 TB/s of HBM3e, 141 GB.
- SUSTAINED = 0.80, assumed: large bf16 GEMMs on an H100 SXM measure roughly 700-800 TFLOP/s with cuBLAS (power and
  clock limits keep them from the datasheet's 989); 0.80 is the top of that range.
- tile_speed 1.0 / 1.0 / 0.9 / 0.75 for the four tiles, K_OVERHEAD = 128 (two k-steps): assumed, not measured.
- attention (the flash kernels SDPA runs) at ATTENTION_EFFICIENCY = 0.35 of peak, assumed: FlashAttention-2, which
  SDPA's flash backend is, reaches ~35% of an H100's bf16 peak (the FlashAttention-3 paper, Shah et al. 2024).
scripts/gpu_check.sh measures the matmuls these stand for when a GPU is lent; until then they are assumptions.
"""

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Gpu:
    """A datasheet GPU: dense (no sparsity) tensor-core bf16 and plain fp32 TFLOP/s, HBM bandwidth and size, SMs."""

    name: str
    bf16_tflops: float
    fp32_tflops: float
    hbm_gbs: float
    memory_gb: float
    sms: int = 132


GPUS = {
    "h100": Gpu("NVIDIA H100 SXM", 989.5, 67.0, 3350.0, 80.0, 132),
    "h200": Gpu("NVIDIA H200 SXM", 989.5, 67.0, 4800.0, 141.0, 132),
}
SUSTAINED = 0.80  # of the datasheet peak, a large well-tiled bf16 GEMM (see the module docstring)
TILES = ((128, 256, 1.0), (256, 128, 1.0), (128, 128, 0.9), (64, 128, 0.75))  # (tile_m, tile_n, tile_speed)
K_OVERHEAD = 128  # pipeline fill + epilogue of a tile, in units of k
ATTENTION_EFFICIENCY = 0.35  # of the bf16 peak, the flash attention kernels


def matmul_efficiency(gpu: Gpu, batch: int, m: int, n: int, k: int) -> float:
    """The share of the datasheet peak at which `batch` matmuls [m, k] x [k, n] run (the module docstring's model)."""
    best = 0.0
    for tile_m, tile_n, speed in TILES:
        tiles = batch * math.ceil(m / tile_m) * math.ceil(n / tile_n)
        waves = math.ceil(tiles / gpu.sms)
        best = max(best, speed * batch * m * n / (waves * gpu.sms * tile_m * tile_n))
    return SUSTAINED * best * k / (k + K_OVERHEAD)


def matmul_seconds(
    gpu: Gpu, batch: int, m: int, n: int, k: int, moved_bytes: float, tensor_cores: bool = True
) -> float:
    """A matmul's time: its FLOPs at matmul_efficiency (tensor cores; fp32 at the fp32 peak x SUSTAINED), or its bytes
    over the bandwidth if that is longer."""
    flops = 2 * batch * m * n * k
    if tensor_cores:
        compute = flops / (matmul_efficiency(gpu, batch, m, n, k) * gpu.bf16_tflops * 1e12)
    else:
        compute = flops / (SUSTAINED * gpu.fp32_tflops * 1e12)
    return max(compute, moved_bytes / (gpu.hbm_gbs * 1e9))
