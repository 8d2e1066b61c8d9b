"""The exception types the CLI prints as a single line, no traceback: bad user input, and a disk too full to go on."""


class UserError(Exception):
    """Bad input from the user. The message says what is wrong and what to do about it."""


class DiskFull(UserError):
    """A file could not be written for want of space (files.py). The CLI adds the command that resumes the run."""
