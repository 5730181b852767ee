"""The one exception type for user mistakes (the CLI prints its message on one line, no traceback), and the
words messages use for their reader: flags on the command line, cells in the notebook."""


class PartiError(Exception):
    """A problem the user can fix (bad path, bad argument, wrong checkpoint). The message says how."""


class EveryRankError(PartiError):
    """A PartiError raised on every process of a multi-process run at once (`parti.distributed.on_main`).
    The CLI waits, after printing it, until every rank has printed it: a launcher that stops the others
    when the first one exits then cuts no rank's message."""


# Who reads the messages: "cli" (they name flags, `--resume`) or "notebook" (they name cells and parameters).
# `parti.notebook` switches it when a notebook sets up; every other caller gets the command line's words.
AUDIENCES = ("cli", "notebook")
_audience = ["cli"]


def set_audience(name: str) -> None:
    if name not in AUDIENCES:
        raise PartiError(f"audience must be one of {', '.join(AUDIENCES)}; got {name!r}")
    _audience[0] = name


def say(*, cli: str, notebook: str) -> str:
    """The advice of a message in its reader's words: `cli` names flags, `notebook` names cells."""
    return notebook if _audience[0] == "notebook" else cli
