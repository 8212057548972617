"""Exporters: fake-quant model → QDQ ONNX, TensorRT-rules linter, TensorRT engines, ORT sessions."""
