"""The exception every user-facing failure raises: the message names the problem and the fix."""


class DistilError(Exception):
    """A problem the user can fix; the CLI prints the message without a traceback."""
