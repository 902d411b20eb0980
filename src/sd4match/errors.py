"""Exceptions that the command line turns into a one-line message."""

from __future__ import annotations

import re
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


def torch_load_problem(exc: BaseException, *, known_only: bool = False) -> str | None:
    """What a failed ``torch.load(weights_only=True)`` says about the file, in a few words,
    looked for along the exception's chain (libraries such as diffusers wrap it); never
    torch's advice to load the file unsafely. Unrecognised: the first line of ``exc``, or
    None with ``known_only``."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = str(e)
        if m := re.search(r"Unsupported global: GLOBAL ([\w.]+)", text):
            return f"it holds Python objects ({m.group(1)}), not only tensors, and sd4match unpickles tensors only"
        if "central directory" in text or "PytorchStreamReader failed" in text:
            return "cut short or corrupt: its zip archive is incomplete"
        if isinstance(e, EOFError) or any(s in text for s in ("Unsupported operand", "invalid load key", "could not find MARK", "Ran out of input")):
            return "not a file torch.save wrote, or one cut short"
        e = e.__cause__ or e.__context__
    if known_only:
        return None
    line = first_line(exc)
    return "content torch's safe loader (weights_only) does not read" if line.startswith("Weights only load failed") else line


class RunStopped(Exception):
    """A long run stopped early on request (SIGTERM, a first Ctrl-C) after keeping what it did;
    the message says where it stopped and how to continue. The command line prints it on one
    line and exits with 128 + the signal's number, as a process ended by that signal does."""

    def __init__(self, message: str, signal_name: str):
        self.signal_name = signal_name
        super().__init__(message)


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
