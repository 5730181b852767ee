"""The one exception type for user mistakes: the CLI prints its message on one line, no traceback."""


class PartiError(Exception):
    """A problem the user can fix (bad path, bad argument, wrong checkpoint). The message says how."""


class EveryRankError(PartiError):
    """A PartiError raised on every process of a multi-process run at once (`parti.distributed.on_main`).
    The CLI waits, after printing it, until every rank has printed it: a launcher that stops the others
    when the first one exits then cuts no rank's message."""
