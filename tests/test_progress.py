"""What a grid and a finetune run report while they train: true rates and ETAs across lane chunks and resumes, plain
lines off a terminal, a live view on one. Driven through the callbacks the grid and the engine make, with a fake clock
(each step takes one fake second), so every number is exact."""

import io

import pytest
from rich.console import Console

from fractal_vmap import progress as progress_module
from fractal_vmap.progress import GridProgress, StepProgress, clock


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def fake_clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(progress_module.time, "perf_counter", fake)
    return fake


def console(terminal: bool) -> Console:
    return Console(file=io.StringIO(), force_terminal=terminal, width=200, color_system=None)


def output(c: Console) -> str:
    return c.file.getvalue()


TOKENS = 100  # tokens a lane pushes through the model per step


def train_row(p: GridProgress, clock_: FakeClock, i: int, steps: list[int], chunk: int) -> None:
    """What the nanochat task's train_row and lanes.run do for row i: chunks of `chunk` lanes, each step one fake
    second."""
    p.row_started(i, f"num_tokens={i}", len(steps))
    for start in range(0, len(steps), chunk):
        lanes = list(range(start, min(start + chunk, len(steps))))
        callback = p.chunk(lanes, [steps[k] for k in lanes])
        for step in range(max(steps[k] for k in lanes)):
            clock_.now += 1.0
            callback(step + 1, max(steps[k] for k in lanes), (step + 1) * TOKENS * len(lanes))
    p.row_finished(i)


def test_rates_and_eta_are_true_across_chunks(fake_clock):
    """Rows of 4 lanes trained 2 at a time: the rate is every token over all the time (not one chunk's), and the
    ETA is the work left at the measured rate, at every step of every chunk."""
    steps = [[4, 4, 4, 4], [8, 8, 8, 8], [8, 8, 8, 8]]  # lane-steps: 16 + 32 + 32 = 80
    c = console(terminal=False)
    with GridProgress(c, steps) as p:
        p.row_started(0, "num_tokens=0", 4)
        callback = p.chunk([0, 1], [4, 4])
        fake_clock.now += 1.0
        callback(1, 4, 2 * TOKENS)
        assert p._rate() == 2 * TOKENS  # 2 lanes x 100 tokens in 1 s
        assert p._eta() == pytest.approx(78 / 2)  # 2 lane-steps a second, 78 left
        for step in (2, 3, 4):
            fake_clock.now += 1.0
            callback(step, 4, step * 2 * TOKENS)
        callback = p.chunk([2, 3], [4, 4])  # the second chunk restarts the engine's step and token counts
        fake_clock.now += 1.0
        callback(1, 4, 2 * TOKENS)
        assert p._rate() == 2 * TOKENS  # 1,000 tokens in 5 s: not 200 tokens in 1 s of this chunk alone
        assert p._work() == 10 and p._eta() == pytest.approx(70 / 2)
        for step in (2, 3, 4):
            fake_clock.now += 1.0
            callback(step, 4, step * 2 * TOKENS)
        p.row_finished(0)
        train_row(p, fake_clock, 1, steps[1], chunk=2)
        assert p._rate() == 2 * TOKENS and p._eta() == pytest.approx(32 / 2)
    lines = output(c).splitlines()
    assert len(lines) == 2 and all("\n" not in line for line in lines)  # one plain line a row, none wrapped
    assert (
        lines[0]
        == "row 1/3 num_tokens=0: 4 cells in 0:08 (200 tok/s) · grid 4/12 cells, 200 tok/s, 0:08 elapsed, ETA 0:32"
    )
    assert (
        lines[1]
        == "row 2/3 num_tokens=1: 4 cells in 0:16 (200 tok/s) · grid 8/12 cells, 200 tok/s, 0:24 elapsed, ETA 0:16"
    )


def test_resumed_grid_says_what_is_done_and_measures_only_what_it_trains(fake_clock):
    steps = [[5] * 3, [5] * 3, [10] * 3, [10] * 3]
    c = console(terminal=False)
    with GridProgress(c, steps) as p:
        p.row_skipped(0)
        p.row_skipped(2)
        assert p.cells_done == 6
        train_row(p, fake_clock, 1, steps[1], chunk=3)
        assert p._eta() == pytest.approx(30 / 3)  # the skipped rows count neither as work left nor as work done
        train_row(p, fake_clock, 3, steps[3], chunk=3)
    lines = output(c).splitlines()
    assert lines[0] == "resuming: 2/4 rows already done (6/12 cells); 2 to train"
    assert lines[1].startswith(
        "row 2/4 num_tokens=1: 3 cells in 0:05 (300 tok/s) · grid 9/12 cells, 300 tok/s, 0:05 elapsed, ETA 0:10"
    )
    assert lines[2].startswith("row 4/4 num_tokens=3: 3 cells") and lines[2].endswith("ETA 0:00")

    c = console(terminal=False)
    with GridProgress(c, steps) as p:
        for i in range(4):
            p.row_skipped(i)
    assert output(c).splitlines() == ["resuming: 4/4 rows already done (12/12 cells); nothing to train"]


def test_out_of_memory_retry_drops_the_rows_done_work(fake_clock):
    c = console(terminal=False)
    with GridProgress(c, [[4] * 4]) as p:
        p.row_started(0, "x", 4)
        callback = p.chunk([0, 1, 2, 3], [4] * 4)
        fake_clock.now += 1.0
        callback(1, 4, 4 * TOKENS)  # then out of memory: the row restarts in chunks of 2
        callback = p.chunk([0, 1], [4, 4])
        assert p._work() == 0 and p.row_cells == 0
        fake_clock.now += 1.0
        callback(1, 4, 2 * TOKENS)
        assert p._rate() == 3 * TOKENS  # the failed attempt's tokens were processed: 600 tokens in 2 s
        assert p._work() == 2


def test_plain_output_has_a_heartbeat_within_a_long_row(fake_clock):
    c = console(terminal=False)
    with GridProgress(c, [[200, 200]]) as p:
        p.row_started(0, "x", 2)
        callback = p.chunk([0, 1], [200, 200])
        for step in range(130):
            fake_clock.now += 1.0
            callback(step + 1, 200, (step + 1) * 2 * TOKENS)
    lines = output(c).splitlines()
    assert lines == [
        "  row 1/1: lanes 0-1 at step 60/200 · 200 tok/s · ETA 2:20",
        "  row 1/1: lanes 0-1 at step 120/200 · 200 tok/s · ETA 1:20",
    ]


def test_terminal_view_shows_cells_lanes_rate_eta_and_the_rows_steps(fake_clock):
    c = console(terminal=True)
    with GridProgress(c, [[4] * 4, [4] * 4]) as p:
        p.row_started(0, "num_tokens=1000", 4)
        callback = p.chunk([2, 3], [4, 4])
        fake_clock.now += 2.0
        callback(2, 4, 2 * 2 * TOKENS)
        grid_line = p._info(p.grid_task)
        row_line = p._info(p.row_task)
        # 28 lane-steps left, 2 a second
        assert grid_line == "0/8 cells · 2 lanes in flight · 200 tok/s · 0:02 elapsed · ETA 0:14"
        assert row_line == "lanes 2-3 of 4 · step 2/4"
        fake_clock.now += 0.5  # between updates the elapsed time goes on and the ETA counts down
        assert p._eta() == pytest.approx(14 - 0.5) and "0:02 elapsed" in p._info(p.grid_task)
        fake_clock.now += 1.0
        assert "0:04 elapsed · ETA 0:12" in p._info(p.grid_task)  # 3.5 s rounds to 4 (to even), 12.5 to 12
        c.print("a row line above the bars")
    text = output(c)
    assert "grid" in text and "row 1/2 num_tokens=1000" in text and "a row line above the bars" in text


def test_step_progress_prints_about_ten_lines_off_a_terminal(fake_clock):
    c = console(terminal=False)
    with StepProgress(c, "finetune x", 25) as p:
        for step in range(25):
            fake_clock.now += 0.5
            p.step(step + 1, 3.0 - 0.1 * step, (step + 1) * 512)
    lines = output(c).splitlines()
    assert len(lines) == 13  # every 2 steps (25 // 10), and the last
    assert lines[-1] == "finetune x: step 25/25 · loss 0.6 · 1,024 tok/s · 0:12 elapsed · ETA 0:00"
    # 11.5 s, rounded to even
    assert lines[0] == "finetune x: step 2/25 · loss 2.9 · 1,024 tok/s · 0:01 elapsed · ETA 0:12"


def test_clock():
    assert [clock(s) for s in (None, 0, 59.4, 61, 3600 * 2 + 65)] == ["?", "0:00", "0:59", "1:01", "2:01:05"]
