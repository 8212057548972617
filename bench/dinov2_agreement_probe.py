"""Why deployed-vs-fake-quant agreement stops near 98% on DINOv2 w8a8, and how much closer the deployed
logits would have to be for 99.5% (the real-ViT issue's target):

    nice bash tools/dev.sh python bench/dinov2_agreement_probe.py [--seed 0] [--limit 10000] \
        [--log docs/dinov2-agreement-probe.json]

The product's default w8a8 recipe for the model (``sx.quantize`` with no switches stated) on the
table's SARDFQ set of ``--seed`` (bench/dinov2_table.py's cache; made there when missing). On the
test images it measures the fake-quant model (FQ), the deployed ONNX Runtime graph (ORT) and FQ with
relative 1e-6 noise at every activation quantizer (the report's noise floor), then:

- how the images on which ORT and FQ disagree sit: FQ's top-2 logit margin there and on all images;
- the counterfactual: agreement if ORT's logits moved from FQ's by ``k`` times as much, for k = 1,
  1/2, 1/4, ... (``argmax(FQ + k (ORT - FQ))``): the shrink factor the deployed arithmetic would need.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from dinov2_probe import _commit, model_cache  # noqa: E402
from dinov2_table import (  # noqa: E402
    GRIDS,
    MODEL,
    PROBE_SETS,
    calibration,
    fp32_logits,
    logits_of,
    ort_runner,
    scores,
    test_set,
)

import sardfq_export as sx  # noqa: E402

SHRINKS = (1.0, 0.5, 0.25, 0.125, 0.0625)


def agree(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.argmax(1) == b.argmax(1)).float().mean())


def margins(z: torch.Tensor) -> torch.Tensor:
    top2 = z.topk(2, dim=1).values
    return top2[:, 0] - top2[:, 1]


def quantiles(v: torch.Tensor) -> dict:
    qs = torch.tensor([0.1, 0.5, 0.9])
    return {
        f"q{int(q * 100)}": round(float(x), 5) for q, x in zip(qs, torch.quantile(v.float(), qs), strict=True)
    }


def per_quantizer(model, x: torch.Tensor, fq: torch.Tensor) -> list[dict]:
    """Each activation quantizer perturbed alone (relative 1e-6, as the noise floor): the mean of the
    largest logit change it causes (most images: none, a flip being rare in one tensor), the share
    of images it changes at all, and the agreement with the unperturbed predictions."""
    from sardfq_export.calibrators import iter_quantizers
    from sardfq_export.calibrators.quantizer import perturbed_activations

    names = [n for n, q in iter_quantizers(model) if q.role == "activation" and q.active]
    rows = []
    for i, name in enumerate(names):
        with perturbed_activations(model, names={name}):
            z = logits_of(model, x)
        change = (z - fq).abs().amax(1)
        rows.append({"quantizer": name, "mean_max_logit_change": round(float(change.mean()), 5),
                     "images_changed": float((change > 0).float().mean()),
                     "agreement": agree(z, fq)})  # fmt: skip
        print(f"  [{i + 1}/{len(names)}] {json.dumps(rows[-1])}", flush=True)
    return sorted(rows, key=lambda r: -r["mean_max_logit_change"])


@contextmanager
def runtime_arithmetic(model, how: str):
    """The fake-quant model computing some of its quantized ops as an integer runtime does, to see how
    much of the deployed graph's difference each accounts for:

    - ``div``: activations quantized as RNE(x / scale), as ONNX Runtime's QuantizeLinear (MLAS divides)
      does, instead of ATen's RNE(x · (1/scale)); the two differ in the last bit now and then;
    - ``int-gemm``: each quantized Linear as an exact integer GEMM (the int8 codes multiplied and
      summed in float64, exact up to 2^53, where INT8 kernels sum in int32), converted to float once
      and scaled by (activation scale · weight scale) then biased, as MatMulIntegerToFloat does;
      the float GEMM over dequantized values instead rounds every partial sum;
    - ``div+int-gemm``: both."""
    from sardfq_export.calibrators import quantizer as qmod
    from sardfq_export.calibrators.modules import QuantLinear

    saved_fq, saved_fwd = qmod._fq_tensor, QuantLinear.forward

    def fq_div(x, scale, bits):
        if bits < 8:
            return saved_fq(x, scale, bits)
        q = torch.clamp(torch.round(x / scale), -128, 127)  # torch.round: half to even, as MLAS
        return q * scale

    def int_gemm(self, x):
        aq, wq = self.input_quantizer, self.weight_quantizer
        if not (aq.active and wq.active and aq.kind == "int" and wq.scale.dim() == 1):
            return saved_fwd(self, x)
        xq = self.quant_input(x)
        sa, sw = aq.scale.reshape(()), wq.scale
        qi = torch.round(xq / sa).double()  # the codes: xq is code · sa, one rounding away
        wi = torch.round(wq(self.weight) / sw[:, None]).double()
        y = (qi @ wi.T).float() * (sa * sw)
        return y if self.bias is None else y + self.bias

    try:
        if "div" in how.split("+"):
            qmod._fq_tensor = fq_div
        if "int-gemm" in how.split("+"):
            QuantLinear.forward = int_gemm
        yield model
    finally:
        qmod._fq_tensor, QuantLinear.forward = saved_fq, saved_fwd


def main(argv: list[str] | None = None) -> None:
    from sardfq_export.calibrators.quantizer import perturbed_activations

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=10000)
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache/sardfq-export/bench-dinov2")
    ap.add_argument(
        "--calib-cache", type=Path, default=Path.home() / ".cache/sardfq-export/bench-dinov2-calib"
    )
    ap.add_argument("--calib", default="sardfq", choices=["sardfq", "psaq", "real", "noise", *GRIDS, *PROBE_SETS],
                    help="the table's calibration set of --seed (default: the w8a8 row's SARDFQ set)")  # fmt: skip
    ap.add_argument("--log", type=Path, help="write the result as JSON here too")
    ap.add_argument(
        "--keep-fp", nargs="*", default=[], metavar="PATTERN", help="Linears left float (as the CLI's)"
    )
    ap.add_argument(
        "--per-quantizer", type=int, default=0, metavar="N",
        help="also perturb each activation quantizer alone on the first N test images: which ones the flips come from",
    )  # fmt: skip
    ap.add_argument(
        "--emulate", nargs="*", default=[], choices=("div", "int-gemm", "div+int-gemm"),
        help="also compare the deployed graph with the fake-quant model computing as a runtime does (runtime_arithmetic)",
    )  # fmt: skip
    a = ap.parse_args(argv)
    loaded = sx.load_model(MODEL)
    cal = calibration(loaded, a.calib, a.seed, 32, 100, model_cache(a.calib_cache, loaded))
    x, y = test_set(loaded, a.limit)
    fp = fp32_logits(loaded, x, model_cache(a.cache, loaded), a.limit)
    # the model's own w8a8 recipe (plus --keep-fp)
    q = sx.quantize(loaded, cal, seed=a.seed, keep_fp=tuple(a.keep_fp), progress=False)
    print(f"recipe: {json.dumps(q.config.to_dict())}", flush=True)
    fq = logits_of(q.model, x)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        sx.export(q, onnx_path, target="onnxruntime")
        dep = logits_of(ort_runner(onnx_path, Path(tmp)), x)
    with perturbed_activations(q.model):
        noisy = logits_of(q.model, x)
    differs = dep.argmax(1) != fq.argmax(1)
    m_fq, m_fp = margins(fq), margins(fp)
    delta = (dep - fq).abs().amax(1)  # the deployed graph's largest logit change per image
    delta_noise = (noisy - fq).abs().amax(1)
    result = {
        "model": MODEL, "calib": a.calib, "seed": a.seed, "limit": len(y), "commit": _commit(),
        "recipe": q.config.to_dict(),
        "top1": {"fp32": scores(fp, y), "fakequant": scores(fq, y), "deployed": scores(dep, y)},
        "agreement_deployed_vs_fakequant": float((~differs).float().mean()),
        "agreement_noisy_vs_fakequant": agree(noisy, fq),
        "agreement_fakequant_vs_fp32": agree(fq, fp),
        "max_logit_change": {"deployed": quantiles(delta), "activation_noise": quantiles(delta_noise)},
        "fakequant_margin": {"all": quantiles(m_fq), "where_deployed_differs": quantiles(m_fq[differs])},
        "fp32_margin": {"all": quantiles(m_fp), "where_deployed_differs": quantiles(m_fp[differs])},
        # images whose FQ margin is under the median deployed change: the ones a change of that size can flip
        "share_margin_below_median_change": float((m_fq < delta.median()).float().mean()),
        "agreement_if_change_shrunk": {
            str(k): agree(fq + k * (dep - fq), fq) for k in SHRINKS
        },
    }  # fmt: skip
    for how in a.emulate:
        with runtime_arithmetic(q.model, how):
            em = logits_of(q.model, x)
        result.setdefault("emulated", {})[how] = {
            "agreement_deployed_vs_emulated": agree(dep, em),
            "agreement_emulated_vs_fakequant": agree(em, fq),
            "max_logit_change_deployed_vs_emulated": quantiles((dep - em).abs().amax(1)),
            "top1": scores(em, y),
        }
        print(f"emulated {how}: {json.dumps(result['emulated'][how])}", flush=True)
    if a.per_quantizer:
        result["per_quantizer"] = per_quantizer(q.model, x[: a.per_quantizer], fq[: a.per_quantizer])
    text = json.dumps(result, indent=1)
    print(text, flush=True)
    if a.log:
        a.log.write_text(text + "\n")


if __name__ == "__main__":
    main()
