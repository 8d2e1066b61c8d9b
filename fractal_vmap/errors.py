"""The one exception type for bad user input: the CLI prints its message as a single line, no traceback."""


class UserError(Exception):
    """Bad input from the user. The message says what is wrong and what to do about it."""
