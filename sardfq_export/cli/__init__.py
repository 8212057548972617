"""The ``sardfq-export`` command line: the main job and one subcommand per stage.

``main(argv) -> int`` runs in-process (tests call it). User errors print one line and map to the
exit codes of DESIGN.md; anything unexpected is a bug and keeps its traceback (exit 1). A full
disk is one line (exit 2); Ctrl-C exits 130 and SIGTERM 143, both after the running stage saved
what it can (synthesis: its checkpoint), with the hint to re-run with ``--resume``.
This package holds only click commands and printing: each command parses its options into the
API's configs and calls one verb of :mod:`sardfq_export.api` (the main job: ``sardfq_export.job.run``).
Subcommands are imported lazily, so ``--help`` and one stage never pay for the others' imports.
"""

from __future__ import annotations

import importlib
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import click

from sardfq_export import __version__
from sardfq_export.core.errors import SardfqError
from sardfq_export.core.io import DiskFullError, is_disk_full

# name → (module, attribute, one-line help). Adding a stage adds a line here, nothing else.
SUBCOMMANDS = {
    "synthesize": ("sardfq_export.cli.synthesize", "synthesize", "Synthesize a calibration set."),
    "quantize": ("sardfq_export.cli.quantize", "quantize", "Build and calibrate a fake-quant model."),
    "export": ("sardfq_export.cli.export", "export", "Export a quantized model to QDQ ONNX / engines."),
    "validate": ("sardfq_export.cli.validate", "validate", "Validate a deployed model against PyTorch."),
    "lint": ("sardfq_export.cli.export", "lint", "Check an ONNX file against TensorRT's Q/DQ rules."),
    "eval": ("sardfq_export.cli.eval", "eval_cmd", "Top-1/top-5 of a model on real labelled data."),
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported only when used (or listed)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in SUBCOMMANDS:
            return None
        module, attr, _help = SUBCOMMANDS[name]
        _invoked.append(name)
        return getattr(importlib.import_module(module), attr)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt (so the same cleanup runs); exit 143."""


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """While the block runs, SIGTERM raises :class:`Terminated` (unless SIGTERM is ignored)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.getsignal(signal.SIGTERM)
    if old is signal.SIG_IGN:
        yield
        return

    def handler(signum, frame):
        raise Terminated

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old if old is not None else signal.SIG_DFL)


_invoked: list[str] = []  # the subcommand click resolved for this main() call, if any


def _rerun_hint() -> str:
    """How to continue: the main job and synthesize resume; the other stages simply re-run."""
    return "re-run with --resume" if not _invoked or _invoked[-1] == "synthesize" else "re-run the command"


def _stopped(exc: BaseException) -> int:
    if isinstance(exc, Terminated):
        click.echo(f"terminated: finished artifacts are kept; {_rerun_hint()}", err=True)
        return 143
    click.echo(f"interrupted: finished artifacts are kept; {_rerun_hint()}", err=True)
    return 130


def _one_line(exc: click.ClickException) -> str:
    """click's message (for a range error it names the valid range) and where the help is, one line."""
    msg = " ".join(exc.format_message().split())
    ctx = getattr(exc, "ctx", None)
    if isinstance(exc, click.UsageError) and ctx is not None:
        msg += f" (see '{ctx.command_path} --help')"
    return msg


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code instead of exiting (so tests can call it)."""
    from sardfq_export.cli.app import cli

    _invoked.clear()
    try:
        with sigterm_raises():
            cli.main(
                args=list(argv) if argv is not None else None,
                prog_name="sardfq-export",
                standalone_mode=False,
            )
    except DiskFullError as exc:
        click.echo(f"error: {exc.describe(_rerun_hint())}", err=True)
        return exc.exit_code
    except SardfqError as exc:
        click.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:  # bad usage (a value out of range...): one line, exit 2
        click.echo(f"error: {_one_line(exc)}", err=True)
        return 2
    except click.exceptions.Abort as exc:  # click turns KeyboardInterrupt (and Terminated) into Abort
        if isinstance(exc.__cause__, KeyboardInterrupt):
            return _stopped(exc.__cause__)
        click.echo("interrupted", err=True)
        return 130
    except KeyboardInterrupt as exc:
        return _stopped(exc)
    except Exception as exc:
        if not is_disk_full(exc):  # anything else is a bug: keep its traceback
            raise
        where = getattr(exc, "filename", None) or "an output file"
        click.echo(f"error: {DiskFullError(where).describe(_rerun_hint())}", err=True)
        return 2
    return 0


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())


__all__ = ["LazyGroup", "SUBCOMMANDS", "Terminated", "main", "entry", "sigterm_raises", "__version__"]
