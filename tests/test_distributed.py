"""torchrun: sharded synthesis equals one process; data-parallel fine-tuning equals one process.

Both sides run under ``torch.distributed.run`` (gloo, CPU, one thread per process) so the only
difference is the number of processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import needs_reference
from safetensors.torch import load_file

from sardfq_export.core.calibset import CalibSet

ROOT = Path(__file__).resolve().parents[1]


def torchrun(nproc: int, *args: str) -> dict:
    env = dict(
        os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "sardfq_export", *args, "--json"]  # fmt: skip
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, f"one process reports, got {res.stdout!r}"
    return json.loads(lines[0])


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    out = {}
    for k in (1, 2):
        path = tmp / f"calib{k}.safetensors"
        summary = torchrun(k, "synthesize", "--method", "sardfq", "--num-images", "6", "--batch-size", "2",
                           "--iters", "4", "--seed", "3", "--out", str(path), "--no-samples")  # fmt: skip
        assert summary["processes"] == k
        out[k] = path
    return out


@needs_reference
def test_two_processes_synthesize_the_same_set_as_one(sets):
    one, two = CalibSet.load(sets[1]), CalibSet.load(sets[2])
    assert one.images.shape == (6, 1, 28, 28)
    assert torch.equal(one.images, two.images)
    assert torch.equal(one.targets, two.targets) and torch.equal(one.labels, two.labels)
    assert torch.equal(one.regions, two.regions) and torch.equal(one.region_labels, two.region_labels)
    assert [c["batch"] for c in two.meta["loss_curve"]] == [0, 1, 2]
    assert one.meta["loss_curve"] == two.meta["loss_curve"]
    assert (one.meta["processes"], two.meta["processes"]) == (1, 2)
    assert not list(sets[2].parent.glob("*.ckpt")), "per-process checkpoints are removed when done"


@needs_reference
def test_data_parallel_reconstruction_matches_one_process(sets, tmp_path):
    weights = {}
    for k in (1, 2):
        summary = torchrun(k, "quantize", "--calib", str(sets[1]), "--scheme", "w4a4", "--finetune", "recon",
                           "--iters", "5", "--out", str(tmp_path / f"q{k}"))  # fmt: skip
        assert summary["recon"]["processes"] == k
        files = sorted((tmp_path / f"q{k}").rglob("*.safetensors"))
        weights[k] = {f"{f.name}:{n}": t for f in files for n, t in load_file(str(f)).items()}
    assert weights[1].keys() == weights[2].keys()
    trained = [n for n in weights[1] if "weight" in n and "quantizer" not in n]
    assert trained, "reconstruction saved its fine-tuned weights"
    iters, lr = 5, 4e-5
    for name, t in weights[1].items():
        other = weights[2][name]
        if name.endswith("attn.qkv.bias"):
            # The key bias cannot change the softmax: its true gradient is 0 and Adam turns the
            # float noise left in it into steps of up to lr, whose signs depend on summation order.
            c = t.numel() // 3
            assert (t[c : 2 * c] - other[c : 2 * c]).abs().max() <= iters * lr, name
            t, other = torch.cat([t[:c], t[2 * c :]]), torch.cat([other[:c], other[2 * c :]])
        # Same steps; only the order of the gradient sum differs between 1 and 2 processes.
        assert torch.allclose(t, other, rtol=1e-5, atol=1e-7), name
