"""sardfq-export: data-free quantization of Vision Transformers for TensorRT / ONNX Runtime.

The public API (``import sardfq_export as sx``) is the verbs the CLI and the main job call. They
are resolved lazily (PEP 562) so that ``import sardfq_export`` stays light and the stage packages,
which import the small ``sardfq_export.core`` modules, never pull in the API or the CLI.
"""

from sardfq_export._version import __version__

# public name → the module that defines it
_API = {
    "load_model": "api", "synthesize": "api", "quantize": "api", "export": "api", "validate": "api",
    "load_quantized": "api", "calibration_set": "api", "psaq2": "api", "Adapted": "api",
    "AdaptiveConfig": "api",
    "QuantizeConfig": "api", "Quantized": "api", "SynthConfig": "api", "ExportConfig": "api",
    "GateSpec": "api", "Report": "api", "LoadedModel": "api", "CalibSet": "api",
    "run": "job", "JobConfig": "job",
    "SardfqError": "core.errors", "UserInputError": "core.errors", "GateFailedError": "core.errors",
    "MissingComponentError": "core.errors",
}  # fmt: skip


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(f"sardfq_export.{_API[name]}"), name)
    raise AttributeError(f"module 'sardfq_export' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])


__all__ = ["__version__", *_API]
