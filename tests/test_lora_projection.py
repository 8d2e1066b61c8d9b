"""The runtime projection of LoRA lanes (perf/roofline.py on the LoRA step, perf/shared_base.py, `plan --project` with
--lora_rank): the shared base's matmuls are one [L*B*T, in] @ [in, out] each, their weights read once whatever the
lanes, the adapters' matmuls batched per lane; FLOPs against a count by hand; rank 0 is the full fine-tuning
projection; the plan's JSON and the planner's pick. All traced under FakeTensorMode (no GPU, nothing computed)."""

import functools
import json
from dataclasses import asdict

import pytest

from fractal_vmap.cli import main
from fractal_vmap.model import BLOCK_WEIGHTS, GPTConfig, nanochat_depth, param_shapes
from fractal_vmap.perf.roofline import flops_per_token, project_runtime
from fractal_vmap.tasks.nanochat.levers import Levers
from fractal_vmap.tasks.nanochat.memory import HEADROOM, estimate_memory

# GQA (kv width 32), 3 blocks; rank 5 and B*T = 2 x 24 = 48 differ from every width (64, 32, 256, 300)
SMALL = GPTConfig(sequence_len=128, vocab_size=300, n_layer=3, n_head=4, n_kv_head=2, n_embd=64)
BATCH, SEQ, RANK = 2, 24, 5
QKV = ("attn.c_q", "attn.c_k", "attn.c_v")


@functools.cache  # each traced once for the tests below
def lora_projection(lanes: int, rank: int = RANK):
    return project_runtime(SMALL, lanes, "h100", BATCH, SEQ, Levers(), lora_rank=rank)


def by_hand(lanes: int, rank: int) -> tuple[int, int]:
    """(the base's, the adapters') matmul FLOPs of one LoRA row step, counted from the weights' shapes: the forward
    x @ W.T of every block matrix and its input gradient, except that the first block's q, k, v read the lanes'
    shared input (the embedding of one batch: computed once, M = B*T, and no input gradient: nothing before them
    trains); each adapter's two forward matmuls and, backward, dB, dz = dy @ B, dA and (but for those three) dx."""
    bt, shapes = BATCH * SEQ, param_shapes(SMALL)
    base = adapters = 0
    for i in range(SMALL.n_layer):
        for name in BLOCK_WEIGHTS:
            out, inp = shapes[f"transformer.h.{i}.{name}.weight"]
            shared = i == 0 and name in QKV
            base += 2 * (bt if shared else lanes * bt) * inp * out + (0 if shared else 2 * lanes * bt * inp * out)
            per_lane = (
                2 * bt * rank * (inp + out) + 2 * bt * rank * (2 * out + inp) + (0 if shared else 2 * bt * rank * inp)
            )
            adapters += lanes * per_lane
    return base, adapters


def test_the_shared_base_matmul_has_m_lanes_x_tokens_and_reads_its_weights_once():
    """Every base matmul has M = L*B*T but the first block's q, k, v (M = B*T: once for all lanes), twice a matrix
    (forward, input gradient) but those three (forward only); its weights' bytes do not move with the lanes, while
    the adapters' matmuls are batched [L, ...] with the rank among their dimensions and their FLOPs scale with the
    lanes exactly. FLOPs against the count by hand (by_hand)."""
    sums = {}
    for lanes in (2, 8):
        s = lora_projection(lanes).shared_base
        base, adapters = s["base"], s["adapters"]
        ms = {}
        for g in base["shapes"]:
            assert g["shape"][0] == 1  # one mm, not one per lane
            ms[g["shape"][1]] = ms.get(g["shape"][1], 0) + g["count"]
        assert (
            ms == {lanes * BATCH * SEQ: 12 * SMALL.n_layer - 6, BATCH * SEQ: 3} and s["tokens"] == lanes * BATCH * SEQ
        )
        assert all(g["shape"][0] == lanes and RANK in g["shape"][1:] for g in adapters["shapes"])
        assert adapters["matmuls"] == 6 * 6 * SMALL.n_layer - 3  # 2 forward, dB, dz, dA, dx (not the first q, k, v)
        assert (base["flops"], adapters["flops"]) == by_hand(lanes, RANK)
        sums[lanes] = s
    assert sums[2]["base"]["weight_bytes"] == sums[8]["base"]["weight_bytes"] > 0  # read once, whatever the lanes
    assert sums[8]["adapters"]["flops"] == 4 * sums[2]["adapters"]["flops"]


# one block of d20's width, so that the base matmuls fill more than one wave of the 132 SMs (SMALL's fill one at any
# lanes, so their time does not grow at all); 8 x 256 tokens a lane, rank 16
MEDIUM = GPTConfig(sequence_len=256, vocab_size=300, n_layer=1, n_head=10, n_kv_head=10, n_embd=1280)


def test_the_base_part_grows_sublinearly_in_lanes():
    """4x the lanes: the base matmuls take more time, but less than 4x (the weights read once, M's tiles filling more
    of each wave: measured 3.14x, 2 -> 5 waves of the [M, 1280] @ [1280, 1280] ones), while the adapters' FLOPs grow
    4x; the row step is sub-linear too, and beats the sequential loop (`finetune --lora_rank`, one run at a time) by
    more at more lanes."""
    two, eight = (project_runtime(MEDIUM, n, "h100", 8, 256, Levers(), lora_rank=16) for n in (2, 8))
    b2, b8 = two.shared_base["base"]["seconds"], eight.shared_base["base"]["seconds"]
    assert 1.5 * b2 < b8 < 3.5 * b2
    assert eight.shared_base["adapters"]["flops"] == 4 * two.shared_base["adapters"]["flops"]
    assert two.row_s < eight.row_s < 4 * two.row_s
    assert eight.speedup > two.speedup > 1


def test_rank_0_is_the_full_fine_tuning_projection_exactly():
    """lora_rank=0 is the full fine-tuning projection, field for field; a rank changes the step and the model FLOPs
    (the frozen weights' 4x, the adapters' 6x)."""
    full = project_runtime(SMALL, 2, "h100", BATCH, SEQ, Levers())
    assert asdict(project_runtime(SMALL, 2, "h100", BATCH, SEQ, Levers(), lora_rank=0)) == asdict(full)
    assert full.shared_base is None
    lora = lora_projection(2)
    assert lora.single_launches != full.single_launches and lora.model_flops < full.model_flops
    assert lora.model_flops == flops_per_token(SMALL, SEQ, RANK) * 2 * BATCH * SEQ


def test_plan_projects_lora_lanes_and_its_pick_fits(tmp_path, capsys):
    """`plan --lora_rank --project`: no refusal; the JSON carries the projection's lane-steps/s, speed-up and the
    shared-base summary; the printed plan shows the base matmul's M at the lanes chosen; the chosen configuration is
    the fastest projected and fits the memory asked (one where the plain step fits 4 LoRA lanes of d2, not 16)."""
    shape = (BATCH, SEQ, "bfloat16", "matrix,unembedding")
    plain = estimate_memory(nanochat_depth(2), *shape, Levers(), "triton", RANK)
    gpu_mem = int((plain.fixed + 4 * plain.lane_bytes) / HEADROOM) + 1000
    out = tmp_path / "plan.json"
    args = ["--model", "d2", "--lanes", "16", "--batch", str(BATCH), "--seq", str(SEQ), "--lora_rank", str(RANK)]
    main(["plan", *args, "--project", "h100", "--gpu_mem", str(gpu_mem), "--json", str(out)])
    text = capsys.readouterr().out
    plan = json.loads(out.read_text())
    p = plan["projection"]
    assert "shared-base matmuls" in text and f"= {p['lanes'] * BATCH * SEQ:,}" in text
    assert p["shared_base"]["base"]["shapes"] and p["shared_base"]["adapters"]["shapes"]
    assert p["shared_base"]["tokens"] == p["lanes"] * BATCH * SEQ
    assert p["lane_steps_per_s"] == pytest.approx(p["lanes"] / p["row_s"]) and p["speedup"] > 1
    chosen = plan["weighed"][plan["chosen"]]
    assert chosen["lane_steps_per_s"] == max(c["lane_steps_per_s"] or 0 for c in plan["weighed"])
    memory = estimate_memory(nanochat_depth(2), *shape, Levers(**p["levers"]), "triton", RANK)
    assert 2 <= p["lanes"] == memory.lanes_that_fit(gpu_mem) < 16 and p["fits"]
    assert memory.peak(p["lanes"]) <= HEADROOM * gpu_mem and chosen["peak_bytes"] == memory.peak(p["lanes"])
