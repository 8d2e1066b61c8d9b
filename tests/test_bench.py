"""`fractal-vmap bench`: its JSON and markdown carry every field, and the launch counts say what grows with L.
(Nothing here times anything: the numbers' meaning is benchmarks/README.md's business.)"""

import json
from collections import Counter
from dataclasses import replace

import pytest
import torch

from fractal_vmap.cli import main
from fractal_vmap.model import init_params, nanochat_depth
from fractal_vmap.options import FinetuneConfig
from fractal_vmap.perf import bench
from fractal_vmap.perf.timing import profile_mode

CPU = torch.device("cpu")
FIELDS = {
    "oom",
    "window_s",
    "foreign_cpu",
    "contended",
    "first_steps_s",
    "models",
    "launches_per_step",
    "lane_steps_per_s",
    "tokens_per_s",
    "mfu",
    "peak_mib_per_lane",
    "speedup",
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread for this file: its tiny shapes gain nothing from two, and on a shared machine a second OpenMP
    thread waiting for a busy core stalls every op (measured: a tiny row step 0.66 s with 2 threads vs 6 ms with 1,
    load average 3.3 on 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY = [
    "--model",
    "depth",
    "--depths",
    "1",
    "--vocab_size",
    "256",
    "--seq_len",
    "32",
    "--batch_size",
    "2",
    "--context",
    "64",
]  # = `tiny` below


def test_bench_writes_every_field(tmp_path):
    """The one-layer model of `tiny` at L 1 and 2 (both run 2 lanes: a shape the launch tests compile too): every mode
    of every L has every metric, finite; the markdown table has a row each."""
    out = tmp_path / "bench.json"
    main(
        [
            "bench",
            *TINY,
            "--lanes",
            "1",
            "2",
            "--warmup",
            "1",
            "--steps",
            "2",
            "--repeats",
            "1",
            "--max_load",
            "0",
            "--out",
            str(out),
        ]
    )
    report = json.loads(out.read_text())
    assert report["model"] == "depth" and report["device_type"] == "cpu" and report["matmul_ceiling"]["tflops"] > 0
    assert [(e["model"], e["lanes"]) for e in report["results"]] == [("d1", 1), ("d1", 2)]
    for e in report["results"]:
        assert set(e["modes"]) == set(bench.MODES) and e["flops_per_token"] > 0
        for mode, r in e["modes"].items():
            assert FIELDS <= set(r), (mode, FIELDS - set(r))
            for key in FIELDS - {"oom", "window_s", "contended"}:
                assert isinstance(r[key], (int, float)) and r[key] >= 0, (mode, key, r[key])
            assert r["lane_steps_per_s"] > 0 and r["launches_per_step"] > 0 and r["peak_mib_per_lane"] > 0
        assert e["modes"]["sequential"]["speedup"] == 1.0
        assert e["modes"]["fast"]["compiled_shapes"] >= 1
    table = out.with_suffix(".md").read_text().splitlines()
    assert table[0].startswith("| model | L | mode |") and len(table) == 2 + 2 * len(bench.MODES)


def test_quick_is_the_default_model_at_1_and_8_lanes_one_short_window():
    """--quick (run for benchmarks/README.md, not here: compiling the default model takes a minute on 2 cores)."""
    model, lanes, plan = bench.resolve(bench.BenchConfig(quick=True), CPU)
    assert (model, lanes, plan) == ("default", [1, 8], bench.Plan(0, 1, 3, 1))


def launches(mode: str, lanes: int, setup) -> Counter:
    """The launches of one steady step, by name."""
    config, params, batch = setup
    cfg = FinetuneConfig(device="cpu")
    return profile_mode(lambda: bench.build(mode, cfg, config, params, lanes, CPU, 10), batch, CPU)["launches_by_name"]


HEAD_OPS = (
    "aten::tanh",
    "aten::tanh_backward",
    "aten::_log_softmax",
    "aten::_log_softmax_backward_data",
    "aten::nll_loss_forward",
)


@pytest.fixture(scope="module")
def tiny():
    """A one-layer nanochat (64 wide, vocab 256) and one random batch of 2 x 32 tokens (as TINY)."""
    cfg = bench.BenchConfig(batch_size=2, seq_len=32, vocab_size=256, context=64)
    config = nanochat_depth(1, cfg.vocab_size, cfg.context)
    return config, init_params(config, seed=0), bench.random_batches(config, 1, cfg)[0]


def test_the_compiled_rows_launches_do_not_grow_with_lanes(tiny):
    """The fast row: one launch count at L = 1 (run with an idle second lane) and L = 16: every op covers all lanes."""
    one, sixteen = launches("fast", 1, tiny), launches("fast", 16, tiny)
    assert sum(one.values()) == sum(sixteen.values()) > 0


def test_what_grows_with_lanes_in_the_eager_row_and_in_sequential(tiny):
    """The eager row: the head runs lane by lane (head.py: bit-equal to finetune, no all-lane logits), so its softcap
    and cross-entropy ops run once per lane (an idle lane included); the rest of the step is shared by all lanes.
    Sequential: L times one model's step."""
    row = {L: launches("row", L, tiny) for L in (1, 3, 16)}
    for L, counts in row.items():
        assert [counts[op] for op in HEAD_OPS] == [max(L, 2)] * len(HEAD_OPS), (L, counts)
    total = {L: sum(c.values()) for L, c in row.items()}
    assert total[1] < total[3] < total[16]
    one = sum(launches("sequential", 1, tiny).values())
    assert sum(launches("sequential", 3, tiny).values()) == 3 * one


def test_bad_bench_options_are_one_line(capsys):
    for argv in (["--modes", "turbo"], ["--model", "huge"], ["--lanes", "0"]):
        with pytest.raises(SystemExit) as e:
            main(["bench", *argv])
        assert e.value.code == 2
        assert "error:" in capsys.readouterr().out


def test_with_primers_puts_one_batch_of_each_padded_shape_first():
    plan = bench.Plan(0, 1, 2, 1)
    batches = [
        (torch.zeros(2, t, dtype=torch.long), torch.zeros(2, t, dtype=torch.long)) for t in (50, 60, 70, 130, 64)
    ]
    steps, plan = bench.with_primers(batches, plan, 2560)
    assert plan.primers == 3 and [x.shape[-1] for x, _ in steps[:3]] == [50, 70, 130] and steps[3:] == batches
    assert plan.windows() == [(4, 6)]
    assert replace(plan, repeats=2).windows() == [(4, 6), (6, 8)]


def test_project_prints_a_labelled_projection_without_a_gpu(capsys):
    """`bench --project h100`: a d4 row of 2 lanes traced under FakeTensorMode (no d4 memory is touched) and printed as
    a projection, with the targets beside it; a GPU it does not know is one line."""
    main(["bench", "--project", "h100", "--depths", "4", "--lanes", "2"])
    out = capsys.readouterr().out
    assert "PROJECTION (not measured)" in out and "NVIDIA H100 SXM" in out
    [row] = [line for line in out.splitlines() if line.startswith("│") and "d4" in line]  # the table's one body row
    assert ">= 2x" in row and "%" in row  # the speed-up target of d4-d8 and an MFU
    assert "configurations weighed (projected)" in out and "the ops that dominate" in out and "assumptions:" in out
    with pytest.raises(SystemExit) as e:
        main(["bench", "--project", "a100"])
    assert e.value.code == 2 and "--project 'a100' is not one of none, h100, h200" in capsys.readouterr().out
