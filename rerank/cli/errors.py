"""The one error type the command line turns into a message."""


class CommandError(Exception):
    """A user-facing error: printed as one line on stderr, exit code 2."""
