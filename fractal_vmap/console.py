"""The one console every command prints to. Off a terminal (a log file, a pipe) nothing is hard-wrapped: a long line
(a run dir, a resume command) stays one line, so it can be copied and grepped; tables get PIPE_WIDTH columns, wide
enough for every table the commands print. On a terminal rich uses the terminal's width."""

import sys

from rich.console import Console

PIPE_WIDTH = 200  # columns of a table printed to a file or a pipe (rich's default there is 80)


def make_console() -> Console:
    """A console on stdout that soft-wraps (never inserts line breaks) and is wide off a terminal."""
    return Console(soft_wrap=True, width=None if sys.stdout.isatty() else PIPE_WIDTH)


console = make_console()
