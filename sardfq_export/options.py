"""Option groups shared by the main job and the stage subcommands (identical flags everywhere)."""

from __future__ import annotations

from collections.abc import Callable

import click


def _stack(*decorators: Callable) -> Callable:
    def apply(fn: Callable) -> Callable:
        for dec in reversed(decorators):
            fn = dec(fn)
        return fn

    return apply


model_options = _stack(
    click.option(
        "--model",
        "model",
        default=None,
        metavar="M",
        help="timm name or alias (deit_t/s/b, vit_s/b, swin_t/s/b); omitted: the embedded reference model.",
    ),
    click.option(
        "--checkpoint",
        type=click.Path(dir_okay=False),
        default=None,
        metavar="F",
        help="Weights for --model: .safetensors, or a torch state_dict (loaded with weights_only=True).",
    ),
    click.option(
        "--random-init",
        is_flag=True,
        help="Random weights instead of timm's pretrained download (structural runs, benchmarks).",
    ),
)

output_options = _stack(
    click.option("--quiet", is_flag=True, help="No progress bars."),
    click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout (for CI)."),
)


def load_from_options(model: str | None, checkpoint: str | None, random_init: bool):
    """Load the model the shared model options name (one place, one behaviour)."""
    import torch

    from sardfq_export.models import load_model

    if random_init and checkpoint is None:
        # Seeded: the same weights in every run and in every torchrun process.
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return load_model(model, checkpoint, pretrained=False)
    return load_model(model, checkpoint, pretrained=not random_init)
