"""The one exception type for user mistakes: the CLI prints its message on one line, no traceback."""


class PartiError(Exception):
    """A problem the user can fix (bad path, bad argument, wrong checkpoint). The message says how."""
