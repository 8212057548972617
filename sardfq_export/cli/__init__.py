"""The ``sardfq-export`` command line: the main job and one subcommand per stage.

``main(argv) -> int`` runs in-process (tests call it). User errors print one line and map to the
exit codes of DESIGN.md; anything unexpected is a bug and keeps its traceback (exit 1).
This package holds only click commands and printing: each command parses its options into the
API's configs and calls one verb of :mod:`sardfq_export.api` (the main job: ``sardfq_export.job.run``).
Subcommands are imported lazily, so ``--help`` and one stage never pay for the others' imports.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

import click

from sardfq_export import __version__
from sardfq_export.core.errors import SardfqError

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
        return getattr(importlib.import_module(module), attr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code instead of exiting (so tests can call it)."""
    from sardfq_export.cli.app import cli

    try:
        cli.main(
            args=list(argv) if argv is not None else None, prog_name="sardfq-export", standalone_mode=False
        )
    except SardfqError as exc:
        click.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return 2
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        return 130
    except KeyboardInterrupt:
        click.echo("interrupted: finished artifacts are kept; re-run with --resume", err=True)
        return 130
    return 0


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())


__all__ = ["LazyGroup", "SUBCOMMANDS", "main", "entry", "__version__"]
