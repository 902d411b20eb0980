"""Exceptions that the command line turns into a one-line message."""

from __future__ import annotations

from pathlib import Path


class Sd4MatchError(Exception):
    """A user-facing error: bad input, a missing file, a wrong layout.

    The command line prints ``str(err)`` on one line and exits non-zero, without a
    traceback (unless ``--debug``). The message names the file or pair and the problem.
    """


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


class Sd4MatchWarning(UserWarning):
    """Something the user should know that does not stop the run; the command line prints it
    as one line, ``sd4match: warning: ...``."""


class DataError(Sd4MatchError):
    """A dataset file is missing, unreadable or not in the expected format."""

    def __init__(self, where: str | Path, problem: str):
        self.where = str(where)
        self.problem = problem
        super().__init__(f"{where}: {problem}")


class PredictionError(Sd4MatchError):
    """A predictions file does not fit the pair list it is scored against."""

    def __init__(self, where: str | Path, problem: str):
        self.where = str(where)
        self.problem = problem
        super().__init__(f"{where}: {problem}")
