"""Models: the one way to load one (timm names, aliases, hf-hub:, local-dir:, checkpoints), the zoo
(the embedded reference ViT, the DINOv2 benchmark model) and the model-family registry (ViT vs Swin,
written once).

Below the stages: imports ``core`` and ``data`` only, never a stage (the layering test checks it).
"""

from sardfq_export.models.families import FAMILIES, Family, family_of
from sardfq_export.models.loading import (
    ALIASES,
    ZOO,
    LoadedModel,
    ModelSettings,
    load_model,
    model_family,
    read_checkpoint,
    resolve_name,
    wrap_module,
)

__all__ = ["ALIASES", "FAMILIES", "Family", "LoadedModel", "ModelSettings", "ZOO", "family_of", "load_model",
           "model_family", "read_checkpoint", "resolve_name", "wrap_module"]  # fmt: skip
