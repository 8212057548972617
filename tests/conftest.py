"""Shared fixtures: tiny random-init timm models for structure, the reference model for numbers."""

from __future__ import annotations

import os

import pytest
import torch

# Under pytest-xdist (the README's test command runs two workers) each worker owns a share of the
# cores: two workers of two threads each oversubscribe a 2-core machine, and OpenMP's spin-waits
# then cost far more than the lost parallelism (measured beside one other busy process: a w8a8
# quantize of the reference model 0.7 s with one thread, 26.8 s with two). Subprocesses (CLI runs,
# torchrun) inherit the same share.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
_THREADS = max(1, min(2, _CORES // _WORKERS))
if _WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)
torch.set_num_threads(_THREADS)

from sardfq_export.data import FASHION_MNIST_DIR  # noqa: E402
from sardfq_export.models.reference import WEIGHTS  # noqa: E402

needs_fmnist = pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)
needs_reference = pytest.mark.skipif(not WEIGHTS.exists(), reason="reference weights not trained yet")


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    try:
        import tensorrt  # noqa: F401

        has_trt = has_cuda
    except ImportError:
        has_trt = False
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "tensorrt" in item.keywords and not has_trt:
            item.add_marker(pytest.mark.skip(reason="needs TensorRT and a GPU"))


def tiny_vit(**kw):
    """A tiny random-init DeiT-style ViT (img 32, patch 8, depth 2, width 64)."""
    import timm

    args = dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2, num_classes=10)
    args.update(kw)
    return timm.create_model("deit_tiny_patch16_224", pretrained=False, **args).eval()


@pytest.fixture
def reference():
    """The embedded reference model (skips until its weights exist)."""
    if not WEIGHTS.exists():
        pytest.skip("reference weights not trained yet")
    from sardfq_export.models import load_model

    return load_model()


@pytest.fixture(autouse=True)
def _short_job_latency(request, monkeypatch):
    """Jobs run in-process by tests time their runners with a few calls, not the product's schedule.

    The job measures each batch size for up to 15 s and re-measures a noisy one (validation.deploy):
    right for a user, several minutes over a suite of main jobs. What the measurement computes is
    tested on compare() itself (test_validation imports it directly, so it is unaffected) and what
    it decides under real load by bench/gate_stability.py. ``@pytest.mark.real_latency`` opts out.
    (Module-scoped fixtures are set up before this one and shorten it themselves where they need to.)
    """
    if "real_latency" in request.keywords:
        return
    from sardfq_export.validation import latency

    compare = latency.compare

    def short(reference, deployed, sample, batches=(1, 32), **kw):
        kw.update(warmup=1, iters=3, max_seconds=0.0)
        return compare(reference, deployed, sample, batches, **kw)

    monkeypatch.setattr(latency, "compare", short)
