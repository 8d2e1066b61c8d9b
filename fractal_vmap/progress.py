"""What a grid reports while it trains: rows done, the current row's steps and its token rate."""

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class GridProgress:
    """A live view of a grid's rows (a context manager). The grid calls row_started, then steps() from the engine's
    progress callback (every few steps of each lane chunk), then row_finished; rows found done call row_skipped."""

    def __init__(self, console: Console, rows: int):
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                   TimeElapsedColumn(), TimeRemainingColumn()]
        self.bar = Progress(*columns, console=console)
        self.rows_task = self.bar.add_task("rows", total=rows, info="")
        self.steps_task = self.bar.add_task("steps", total=1, info="")
        self.t0 = time.perf_counter()

    def __enter__(self) -> "GridProgress":
        self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def row_started(self, i: int, description: str, lanes: int) -> None:
        self.t0 = time.perf_counter()
        self.bar.reset(self.steps_task, total=None, description=f"row {i} ({description}) steps", info="")

    def steps(self, step: int, max_steps: int, processed: int) -> None:
        rate = processed / max(time.perf_counter() - self.t0, 1e-9)
        self.bar.update(self.steps_task, completed=step, total=max_steps, info=f"{rate:,.0f} tok/s")

    def row_finished(self, i: int) -> None:
        self.bar.update(self.rows_task, advance=1)

    def row_skipped(self, i: int) -> None:
        self.bar.update(self.rows_task, advance=1)
