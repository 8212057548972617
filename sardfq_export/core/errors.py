"""Error types shared by every stage (dependency-free, safe to import from any package).

The CLI maps them to exit codes (DESIGN.md): a ``UserInputError`` is the user's to fix (exit 2,
one line), ``MissingComponentError`` names an optional component that is absent (exit 4),
``GateFailedError`` is a failed accuracy/speed gate (exit 3). Anything else is a bug (exit 1,
traceback).
"""

from __future__ import annotations


class SardfqError(Exception):
    """Base class of the errors the CLI turns into one line and an exit code."""

    exit_code = 1


class UserInputError(SardfqError, ValueError):
    """Bad usage or input: the message says what to do instead."""

    exit_code = 2


class GateFailedError(SardfqError):
    """An accuracy, fidelity or latency gate failed."""

    exit_code = 3


class MissingComponentError(SardfqError, RuntimeError):
    """A required optional component (TensorRT, a GPU, a dataset package) is missing."""

    exit_code = 4
