"""`plan` (perf/plan.py, tasks/nanochat/memory.py): the memory estimate against real CPU steps, the lanes that fit, the
d20 figures traced without d20 memory, the CLI; and the runtime projection (perf/roofline.py), traced under
FakeTensorMode.
"""

import json
import math
import resource

import pytest

from fractal_vmap.cli import main
from fractal_vmap.model import GPTConfig, nanochat_depth
from fractal_vmap.perf.roofline import GPUS, flops_per_token, launch_bound, project_runtime
from fractal_vmap.tasks.nanochat.levers import Levers
from fractal_vmap.tasks.nanochat.memory import HEADROOM, KINDS, estimate_memory, parse_bytes, trace_step

SMALL = GPTConfig(sequence_len=128, vocab_size=300, n_layer=3, n_head=4, n_kv_head=2, n_embd=64)  # GQA, 3 blocks


def max_rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


@pytest.mark.parametrize("levers", [Levers(), Levers(step_in_backward=True, remat=True)], ids=["plain", "levers"])
def test_the_estimate_matches_the_tracked_allocations_of_real_cpu_steps(levers):
    """The estimate (fake traces of 2 and 4 lanes, a line through them) against real steps of 3 and 7 lanes, every
    allocation tracked by MemTracker. Measured: they agree to a few bytes (the linear model holds exactly); 1%
    allowed."""
    plan = estimate_memory(SMALL, 4, 64, levers=levers)
    for lanes in (3, 7):
        real = trace_step(SMALL, lanes, 4, 64, levers=levers, fake=False)
        assert plan.peak(lanes) == pytest.approx(real.peak, rel=0.01), lanes
    assert all(plan.per_lane[k] > 0 for k in KINDS)


def test_levers_lower_the_estimate_where_they_should():
    """Stepping in the backward removes the full gradients from the peak; recomputing blocks, their activations."""
    plain = estimate_memory(SMALL, 8, 128)
    hooks = estimate_memory(SMALL, 8, 128, levers=Levers(step_in_backward=True))
    remat = estimate_memory(SMALL, 8, 128, levers=Levers(remat=True))
    assert hooks.per_lane["backward"] < plain.per_lane["backward"]
    assert remat.per_lane["activations"] < plain.per_lane["activations"] / 2
    for p in (hooks, remat):  # the weights and the optimizer state do not move
        assert (p.per_lane["params"], p.per_lane["optimizer"]) == (
            plain.per_lane["params"],
            plain.per_lane["optimizer"],
        )
    # a budget between two lane counts' peaks fits the smaller count
    assert plain.lanes_that_fit(int(plain.peak(5) / HEADROOM) + 1) == 5


def test_d20_is_traced_without_d20_memory():
    """Two steps of 16 lanes of d20 would take > 150 GB; the fake traces leave this process's peak RSS about where it
    was. Per lane: the fp32 weights (393M matrices + 84M lm_head) and their Muon and AdamW state, exactly."""
    before = max_rss_kib()
    plan = estimate_memory(nanochat_depth(20), 8, 1024, "bfloat16", levers=Levers(step_in_backward=True, remat=True))
    assert max_rss_kib() - before < 2**20  # KiB: under 1 GiB more
    matrices, lm_head = 20 * 12 * 1280**2, 65536 * 1280
    assert plan.per_lane["params"] == 4 * (matrices + lm_head)
    # Muon's momentum and AdamW's two moments, and ~100 bytes of per-lane scalars (lrs, schedule, step counts, losses)
    assert 0 <= plan.per_lane["optimizer"] - (4 * matrices + 2 * 4 * lm_head) < 1024
    assert plan.lane_bytes > 4e9 and plan.fixed > 2e9  # more than the weights and state; the base model alone is 2.2 GB


def test_parse_bytes():
    assert parse_bytes("80GB") == 80 * 10**9 and parse_bytes("1.5GiB") == 3 * 2**29 and parse_bytes("512") == 512


def test_plan_command_prints_and_writes_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    main(
        ["plan", "--model", "d2", "--lanes", "4", "--batch", "2", "--seq", "64", "--gpu_mem", "1GB", "--json", str(out)]
    )
    text = capsys.readouterr().out
    assert "per lane" in text and "lanes per chunk" in text
    plan = json.loads(out.read_text())
    assert set(plan["memory"]["per_lane"]) == set(KINDS) and set(plan["lanes_that_fit"]) == {"1GB", "80GB", "141GB"}
    assert plan["lanes_that_fit"]["80GB"] > plan["lanes_that_fit"]["1GB"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "d0"], "depth"),
        (["--gpu_mem", "lots"], "not a size"),
        (["--levers", "fast"], "--levers"),
        (["--project", "tpu"], "--project"),
    ],
)
def test_plan_bad_input_is_one_line(capsys, args, message):
    with pytest.raises(SystemExit) as exit:
        main(["plan", *args])
    assert exit.value.code == 2
    assert message in capsys.readouterr().out


# ----------------------------------------------------------------------------- runtime projection


def test_launch_queue():
    """Long ops hide the launches behind them; a run of short ops is launch-bound."""
    assert launch_bound([1.0, 0.1, 0.1], 0.01) == pytest.approx(1.2)
    assert launch_bound([1e-4] * 10, 1e-3) == pytest.approx(9e-3 + 1e-4)


def test_projection_runs_for_d20_without_d20_memory():
    """A d20 row of 2 lanes and one finetune step, projected on an H100: no real memory, sane figures (a step of 2 x
    8 x 1024 tokens does ~2 x 26 TFLOP of model work, so it cannot take under 2 x 26 ms at 989 TFLOP/s)."""
    before = max_rss_kib()
    p = project_runtime(nanochat_depth(20), 2, "h100", levers=Levers(step_in_backward=True, remat=True))
    assert max_rss_kib() - before < 2**20
    flops = flops_per_token(nanochat_depth(20), 1024) * 8 * 1024 * 2
    assert p.model_flops == flops and 5e13 < flops < 6e13
    assert flops / (GPUS["h100"].bf16_tflops * 1e12) < p.row_gpu_s <= p.row_s
    assert 0 < p.mfu(GPUS["h100"]) < 0.75  # the roofline runs matmuls at 75% of peak, and there is more than matmuls
    assert p.single_gpu_s < p.row_gpu_s < 3 * p.single_gpu_s  # 2 lanes (+ recomputed forwards) against one model


def test_the_projection_traces_the_triton_kernels_cuda_runs():
    """The row's traced step is the CUDA path: the fused AdamW, both Muon passes and the lanes' head enter it as
    kernels/ops.py's custom ops, charged kernels/costs.py's bytes (AdamW: 28 a float32 element of lm_head, the one
    AdamW group trained here, at the datasheet bandwidth); the single model's torch.optim step has none of them."""
    from fractal_vmap.model import param_shapes
    from fractal_vmap.perf.roofline import row_step_times, single_step_times

    gpu = GPUS["h100"]
    row = row_step_times(SMALL, 2, 4, 64, Levers(), gpu, "matrix,unembedding")
    names = [name for name, _ in row]
    for kernel in ("triton adamw", "triton muon momentum", "triton muon normalize", "triton muon update"):
        assert kernel in names, kernel
    assert "triton head cross-entropy" in names and "head dw bmm" in names
    assert names.count("triton muon update") == 6 * SMALL.n_layer  # one a stacked matrix: q, k, v, proj, fc, proj
    lm_head = 2 * math.prod(param_shapes(SMALL)["lm_head.weight"])  # 2 lanes (the vocab padded as nanochat pads it)
    assert dict(row)["triton adamw"] == pytest.approx(28 * lm_head / (gpu.hbm_gbs * 1e9))
    single = {name for name, _ in single_step_times(SMALL, 4, 64, gpu, "matrix,unembedding")}
    assert not any(name.startswith(("triton", "head ")) for name in single)


def test_the_planner_picks_the_fastest_configuration_not_the_most_lanes():
    """On a memory where the plain step fits 4 lanes and remat 7: with no launch cost the projection says remat's
    recomputed forwards cost more than its extra lanes bring (the plain 4 lanes win); with 1 ms a launch the step is
    launch-bound, so the 7 lanes' launches are shared by more lanes and remat wins. Rungs fitting no more lanes than
    a cheaper one are not projected."""
    from fractal_vmap.perf.choose import weigh
    from fractal_vmap.tasks.nanochat.memory import HEADROOM

    shape, groups = (8, 128, "bfloat16"), "matrix,unembedding"
    plain = estimate_memory(SMALL, *shape, groups, Levers(), "triton")
    remat = estimate_memory(SMALL, *shape, groups, Levers(remat=True), "triton")
    memory = int((plain.fixed + 4 * plain.lane_bytes) / HEADROOM) + 1000
    assert plain.lanes_that_fit(memory) == 4 and remat.lanes_that_fit(memory) > 4
    picks = {}
    for launch_us in (0.0, 1000.0):
        best, weighed = weigh(SMALL, 16, memory, "h100", *shape, groups, launch_us=launch_us)
        assert best.lane_steps_per_s == max(c.lane_steps_per_s for c in weighed)
        assert [c.note for c in weighed][1] == "no more lanes than fewer levers: not projected"  # step_in_backward
        picks[launch_us] = (best.levers.remat, best.lanes)
    assert picks[0.0] == (False, 4) and picks[1000.0] == (True, remat.lanes_that_fit(memory))


def test_the_matmul_model_quantizes_waves_and_tiles():
    """perf/device.py on cases worked by hand: a d20 projection [8192, 1280] x [1280, 1280] is 64 x 5 = 320 tiles of
    128 x 256 (or 640 of 128 x 128) on 132 SMs; one matmul fills 2.4 waves (the 128 x 128 tile, 5 waves of which 4.85
    are work, at its 0.9 speed, wins), 16 lanes' batch fills 38.8 of 39; a batch of exactly 132 full tiles runs at
    the sustained rate less the k overhead, and one more matmul costs a whole wave."""
    from fractal_vmap.perf.device import K_OVERHEAD, SUSTAINED, matmul_efficiency

    gpu, k_part = GPUS["h100"], 1280 / (1280 + K_OVERHEAD)
    assert matmul_efficiency(gpu, 1, 8192, 1280, 1280) == pytest.approx(SUSTAINED * 0.9 * 640 / 660 * k_part)
    assert matmul_efficiency(gpu, 16, 8192, 1280, 1280) == pytest.approx(SUSTAINED * 5120 / (39 * 132) * k_part)
    assert matmul_efficiency(gpu, 132, 128, 256, 1280) == pytest.approx(SUSTAINED * k_part)
    # one tile more: 128 x 256 takes 2 waves (0.50), 128 x 128 takes 266 tiles in 3 waves at 0.9 speed (0.60) and wins
    assert matmul_efficiency(gpu, 133, 128, 256, 1280) == pytest.approx(SUSTAINED * 0.9 * 266 / 396 * k_part)


def test_the_seed_workload_both_ways_on_a_worked_case():
    """perf/workload.py: 16 cells on 2 GPUs (8 each), 10 steps, 2 s of host costs a cell; one model's step 1 s, a row
    of 4 lanes 2 s. One process per cell: 8 x (2 + 10 x 1) = 96 s; rows: 2 + 2 chunks x 10 x 2 s = 42 s. With half
    the lanes diverging after 40% of the steps, a chunk's lane-steps are 1 - 0.5 x 0.6 = 70% of a full one's."""
    from fractal_vmap.perf.workload import workload

    host = {"import_torch_s": 1.0, "checkpoint_load_s": 0.5, "data_render_s": 0.25, "optimizer_build_s": 0.25}
    plain = workload(1.0, 2.0, 4, 10, cells=16, gpus=2, costs={"measured": host})
    assert (plain["seed_s"], plain["rows_s"]) == (96.0, 42.0) and plain["ratio"] == pytest.approx(96 / 42)
    dead = {"measured": host, "divergence": {"diverged_frac": 0.5, "steps_kept_frac": 0.4}}
    assert workload(1.0, 2.0, 4, 10, cells=16, gpus=2, costs=dead)["rows_s"] == pytest.approx(2 + 40 * 0.7)
