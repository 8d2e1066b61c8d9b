"""What a run reports while it trains. On a terminal: live bars, redrawn ten times a second. Otherwise (a log file, a
pipe): plain lines, one per grid row (and one a minute within a long row). Every number comes from the host: step
counts, batch shapes and the clock; nothing here reads a device tensor, so progress adds no host sync.

GridProgress: the whole grid (cells done of all cells, lanes in flight, tokens/s and ETA from the throughput measured
so far) and the current row (its steps across its lane chunks). StepProgress: one training run (finetune, or the
default model's pretraining): step, loss, tokens/s, ETA.
"""

import time

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn
from rich.text import Text

HEARTBEAT_S = 60.0  # plain output: at least one line this often within a long row
FINETUNE_LINES = 10  # plain output: a finetune run prints about this many step lines


def clock(seconds: float | None) -> str:
    """0:42, 12:03 or 1:02:03; '?' when not known yet."""
    if seconds is None:
        return "?"
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class _Info(ProgressColumn):
    """A column whose text is computed at every redraw (so elapsed time and ETA move between updates)."""

    def __init__(self, text):
        super().__init__()
        self.text = text

    def render(self, task) -> Text:
        return Text(self.text(task.id))


def _bar(console: Console, info) -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(bar_width=30), _Info(info), console=console, refresh_per_second=10
    )


class GridProgress:
    """A live view of a grid (a context manager). The grid calls row_skipped for each row found done, row_started,
    chunk(lanes, steps) before each lane chunk (its return value is the engine's progress callback, `steps`), and
    row_finished. `cell_steps[i][j]` is the step count of cell (i, j): the work the ETA is measured in (lane-steps)."""

    def __init__(self, console: Console, cell_steps: list[list[int]], unit: str = "row", rate: str = "tok/s"):
        self.console, self.cell_steps = console, cell_steps
        self.unit, self.rate = unit, rate  # what a row is called (a refinement's "level"), what the rate counts
        self.cells_total = sum(len(r) for r in cell_steps)
        self.work_total = sum(sum(r) for r in cell_steps)
        self.live = console.is_terminal
        self.cells_done = self.work_done = self.work_skipped = self.rows_skipped = self.tokens_done = 0
        self.t_start: float | None = None  # when the first row began training
        self.said_resume = False
        self.row: int | None = None
        self.bar = _bar(console, self._info) if self.live else None
        if self.bar is not None:
            self.grid_task = self.bar.add_task("grid", total=self.cells_total)
            self.row_task = self.bar.add_task("", total=1, visible=False)

    def __enter__(self) -> "GridProgress":
        if self.bar is not None:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if not self.said_resume and self.rows_skipped and exc[0] is None:
            self._resume_line()
        if self.bar is not None:
            self.bar.__exit__(*exc)

    # ------------------------------------------------------------------ what the grid calls

    def add_row(self, steps: list[int]) -> int:
        """One more row (a refinement level, known only once the levels before it are done) of cells with these step
        counts; returns its index. The ETA then counts the work known so far."""
        self.cell_steps.append(list(steps))
        self.cells_total += len(steps)
        self.work_total += sum(steps)
        if self.bar is not None:
            self.bar.update(self.grid_task, total=self.cells_total)
        return len(self.cell_steps) - 1

    def row_skipped(self, i: int) -> None:
        self.rows_skipped += 1
        self.cells_done += len(self.cell_steps[i])
        self.work_skipped += sum(self.cell_steps[i])
        if self.bar is not None:
            self.bar.update(self.grid_task, completed=self.cells_done)

    def row_started(self, i: int, description: str, lanes: int) -> None:
        if not self.said_resume and self.rows_skipped:
            self._resume_line()
        now = time.perf_counter()
        self.t_start = self.t_start or now
        self.row, self.description, self.t_row = i, description, now
        self.row_tokens = self.row_work = self.row_cells = 0  # of the row's finished chunks
        self._open_chunk(list(range(lanes)), self.cell_steps[i])
        self.t_line = now
        if self.bar is not None:
            self.bar.update(
                self.row_task,
                description=f"{self.unit} {i + 1}/{len(self.cell_steps)} {description}",
                total=sum(self.cell_steps[i]),
                completed=0,
                visible=True,
            )

    def chunk(self, lanes: list[int], steps: list[int]):
        """A lane chunk of the current row begins (`lanes`: its cells' indices in the row, `steps`: their step counts);
        returns the engine's callback. A chunk that starts the row again (an out-of-memory retry) drops the row's done
        work (its tokens were processed all the same: they stay in the rate)."""
        if self.chunk_started:
            self._close_chunk()
        if lanes[0] == 0:
            self.row_work = self.row_cells = 0
        self._open_chunk(lanes, steps)
        self.chunk_started = True
        return self.steps

    def steps(self, step: int, max_steps: int, processed: int) -> None:
        """The engine's callback (host values only): `step` steps of `max_steps` done, `processed` tokens so far."""
        if processed < self.chunk_tokens:  # a new chunk without chunk(): bank the last one's tokens
            self._close_chunk(credit=False)
            self._open_chunk(self.chunk_lanes, self.chunk_lane_steps)
        self.chunk_step, self.chunk_max, self.chunk_tokens = step, max_steps, processed
        self.t_update = time.perf_counter()
        if self.bar is not None:
            self.bar.update(self.row_task, completed=self.row_work + self._chunk_work())
        elif self.t_update - self.t_line >= HEARTBEAT_S:
            self.t_line = self.t_update
            lanes = self.chunk_lanes
            self.console.print(
                f"  {self.unit} {self.row + 1}/{len(self.cell_steps)}: lanes {lanes[0]}-{lanes[-1]} at step "
                f"{step}/{max_steps} · "
                f"{self._rate():,.0f} {self.rate} · ETA {clock(self._eta())}",
                highlight=False,
                soft_wrap=True,
            )

    def row_finished(self, i: int) -> None:
        self._close_chunk(credit=False)
        now = time.perf_counter()
        self.cells_done += len(self.cell_steps[i])
        self.work_done += sum(self.cell_steps[i])
        seconds = now - self.t_row
        row_rate = self.row_tokens / max(seconds, 1e-9)
        self.row = None
        if self.bar is not None:
            self.bar.update(self.grid_task, completed=self.cells_done)
            self.bar.update(self.row_task, visible=False)
        self.console.print(
            f"{self.unit} {i + 1}/{len(self.cell_steps)} {self.description}: {len(self.cell_steps[i])} cells in "
            f"{clock(seconds)} "
            f"({row_rate:,.0f} {self.rate}) · grid {self.cells_done}/{self.cells_total} cells, {self._rate():,.0f} "
            f"{self.rate}, "
            f"{clock(now - self.t_start)} elapsed, ETA {clock(self._eta())}",
            highlight=False,
            soft_wrap=True,
        )

    # ------------------------------------------------------------------ bookkeeping

    def _resume_line(self) -> None:
        self.said_resume = True
        rows = len(self.cell_steps)
        todo = rows - self.rows_skipped
        self.console.print(
            f"resuming: {self.rows_skipped}/{rows} rows already done ({self.cells_done}/{self.cells_total} cells); "
            + (f"{todo} to train" if todo else "nothing to train"),
            highlight=False,
            soft_wrap=True,
        )

    def _open_chunk(self, lanes: list[int], steps: list[int]) -> None:
        self.chunk_lanes, self.chunk_lane_steps = list(lanes), list(steps)
        self.chunk_step = self.chunk_max = self.chunk_tokens = 0
        self.chunk_started = False
        self.t_update = None

    def _chunk_work(self) -> int:
        return sum(min(self.chunk_step, s) for s in self.chunk_lane_steps)

    def _close_chunk(self, credit: bool = True) -> None:
        """The chunk is over: its tokens are banked; with credit, its lanes count as done work and cells."""
        self.tokens_done += self.chunk_tokens
        self.row_tokens += self.chunk_tokens
        if credit:
            self.row_work += sum(self.chunk_lane_steps)
            self.row_cells += len(self.chunk_lanes)
        self.chunk_tokens = self.chunk_step = 0

    def _work(self) -> int:
        """Lane-steps trained by this invocation so far (finished rows, finished chunks, the current chunk)."""
        return self.work_done + (self.row_work + self._chunk_work() if self.row is not None else 0)

    def _seconds(self) -> float:
        """Training time up to the last update (so work and time are measured at the same moment)."""
        end = self.t_update if self.row is not None and self.t_update is not None else time.perf_counter()
        return max(end - self.t_start, 1e-9) if self.t_start is not None else 0.0

    def _rate(self) -> float:
        """Tokens per second through the model, over everything trained so far (not just the current chunk)."""
        seconds = self._seconds()
        return (self.tokens_done + (self.chunk_tokens if self.row is not None else 0)) / seconds if seconds else 0.0

    def _eta(self) -> float | None:
        """Seconds left: the work left over the work rate measured so far, counted down since the last update."""
        work, seconds = self._work(), self._seconds()
        if not work or not seconds:
            return None
        since = time.perf_counter() - (self.t_start + seconds)
        return max((self.work_total - self.work_skipped - work) * seconds / work - since, 0.0)

    def _info(self, task_id) -> str:
        if task_id == self.grid_task:
            lanes = f"{len(self.chunk_lanes)} lanes in flight · " if self.row is not None else ""
            elapsed = time.perf_counter() - self.t_start if self.t_start is not None else 0.0
            rate = f"{self._rate():,.0f}" if self._rate() else "?"  # nothing trained yet
            return (
                f"{self.cells_done + (self.row_cells if self.row is not None else 0)}/{self.cells_total} cells · "
                f"{lanes}"
                f"{rate} {self.rate} · {clock(elapsed)} elapsed · ETA {clock(self._eta())}"
            )
        if self.row is None:
            return ""
        lanes, total = self.chunk_lanes, len(self.cell_steps[self.row])
        which = f"lanes {lanes[0]}-{lanes[-1]} of {total}" if len(lanes) < total else f"{total} lanes"
        return f"{which} · step {self.chunk_step}/{self.chunk_max or max(self.chunk_lane_steps)}"


class StepProgress:
    """A live view of one training run (a context manager): call step(done, loss, tokens) after each step."""

    def __init__(self, console: Console, description: str, total_steps: int):
        self.console, self.description, self.total = console, description, total_steps
        self.live = console.is_terminal
        self.done, self.loss, self.tokens = 0, float("nan"), 0
        self.every = max(1, total_steps // FINETUNE_LINES)
        self.bar = _bar(console, lambda task_id: self._info()) if self.live else None
        if self.bar is not None:
            self.task = self.bar.add_task(description, total=total_steps)

    def __enter__(self) -> "StepProgress":
        self.t0 = time.perf_counter()
        if self.bar is not None:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def step(self, done: int, loss: float, tokens: int) -> None:
        """`done` steps finished, the last one's loss, `tokens` pushed through the model so far."""
        self.done, self.loss, self.tokens, self.t_update = done, loss, tokens, time.perf_counter()
        if self.bar is not None:
            self.bar.update(self.task, completed=done)
        elif done % self.every == 0 or done == self.total:
            self.console.print(f"{self.description}: {self._info()}", highlight=False, soft_wrap=True)

    def _info(self) -> str:
        if not self.done:
            return f"step 0/{self.total}"
        seconds = self.t_update - self.t0
        eta = (self.total - self.done) * seconds / self.done - (time.perf_counter() - self.t_update)
        return (
            f"step {self.done}/{self.total} · loss {self.loss:.4g} · {self.tokens / seconds:,.0f} tok/s · "
            f"{clock(time.perf_counter() - self.t0)} elapsed · ETA {clock(max(eta, 0.0))}"
        )
