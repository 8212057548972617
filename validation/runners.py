"""One small interface to run anything (torch, ONNX Runtime, TensorRT): images in, logits out."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn as nn


@runtime_checkable
class Runner(Protocol):
    """Maps a float (B, C, H, W) batch in the model's normalized space to (B, classes) logits."""

    name: str  # e.g. "torch-fp32", "onnxruntime"
    device: str  # e.g. "cpu", "cuda:0"

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


class TorchRunner:
    """A torch module (float or fake-quant) behind the runner interface."""

    def __init__(self, model: nn.Module, name: str = "torch-fp32", device: str | None = None):
        self.device = device or str(next(model.parameters(), torch.empty(0)).device)
        self.model = model.eval().to(self.device)
        self.name = name

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images.to(self.device)).float().cpu()


class OrtRunner:
    """An ONNX Runtime ``InferenceSession`` behind the runner interface.

    The session is built by whoever knows the deployment settings (``exporters.ort``) and handed
    in; this class only feeds it. FP32 graph I/O (also for FP16 exports).
    """

    def __init__(self, session, name: str = "onnxruntime"):
        self.session = session
        self.name = name
        self.input_name = session.get_inputs()[0].name
        self.output_name = session.get_outputs()[0].name
        providers = session.get_providers()
        self.device = "cuda" if providers and providers[0].startswith(("CUDA", "Tensorrt")) else "cpu"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        feed = {self.input_name: images.detach().float().cpu().contiguous().numpy()}
        return torch.from_numpy(self.session.run([self.output_name], feed)[0]).float()


class TensorRTRunner:
    """A serialized TensorRT engine behind the runner interface (TensorRT + torch CUDA tensors).

    ``tensorrt`` is imported here, lazily: constructing one without TensorRT raises ImportError.
    """

    def __init__(self, engine_path: str, name: str = "tensorrt", device: str = "cuda:0"):
        import tensorrt as trt

        self.name = name
        self.device = device
        self._logger = trt.Logger(trt.Logger.WARNING)
        with open(engine_path, "rb") as fh:
            self.engine = trt.Runtime(self._logger).deserialize_cuda_engine(fh.read())
        if self.engine is None:
            raise RuntimeError(
                f"cannot deserialize TensorRT engine {engine_path} (built for another GPU/TensorRT?)"
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_name = next(n for n in names if is_input[n])
        self.output_name = next(n for n in names if not is_input[n])
        self._torch_dtype = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32}
        self.stream = torch.cuda.Stream(device=device)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        in_dtype = self._torch_dtype[self.engine.get_tensor_dtype(self.input_name)]
        x = images.to(self.device, dtype=in_dtype).contiguous()
        self.context.set_input_shape(self.input_name, tuple(x.shape))
        out_shape = tuple(self.context.get_tensor_shape(self.output_name))
        out_dtype = self._torch_dtype[self.engine.get_tensor_dtype(self.output_name)]
        out = torch.empty(out_shape, dtype=out_dtype, device=self.device)
        self.context.set_tensor_address(self.input_name, x.data_ptr())
        self.context.set_tensor_address(self.output_name, out.data_ptr())
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        self.stream.synchronize()
        return out.float().cpu()
