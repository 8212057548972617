"""sardfq-export: data-free quantization of Vision Transformers for TensorRT / ONNX Runtime.

Kept import-light on purpose: ``calibrators``, ``exporters`` and ``validation`` import the small
shared modules of this package (``errors``, ``calibset``), never the CLI or the pipeline.
"""

__version__ = "0.1.0"
