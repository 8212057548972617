"""Synthesis core: calibration images from the model alone (noise, PSAQ-ViT, SARDFQ).

Public API (what the pipeline calls)::

    from sardfq_export.synthesis import SynthConfig, synthesize, METHODS
    calib = synthesize(loaded_model, SynthConfig(method="sardfq", num_images=32, seed=0), out="calib.safetensors",
                       resume=False, checkpoint_every=100, progress=True)

``calib`` is a :class:`sardfq_export.core.calibset.CalibSet`; ``save_samples`` draws samples.png.
Modules: ``config`` (settings and per-family defaults), ``attention`` (our explicit attention forward
that records CLS attention and softmax·V), ``priors`` (GMM attention priors), ``losses`` (PSE, APA,
soft CE, TV), ``plan`` (every random draw, per image), ``methods`` (registry + objective),
``runner`` (the loop, checkpoint/resume), ``samples`` (samples.png).
"""

from sardfq_export.synthesis.config import FAMILY_APA_WEIGHT, FAMILY_LR, SynthConfig
from sardfq_export.synthesis.methods import METHODS
from sardfq_export.synthesis.runner import SynthesisDivergedError, checkpoint_path, synthesize

__all__ = [
    "FAMILY_APA_WEIGHT",
    "FAMILY_LR",
    "METHODS",
    "SynthConfig",
    "SynthesisDivergedError",
    "checkpoint_path",
    "synthesize",
]
