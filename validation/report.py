"""``report.json`` (the machine-readable verdict CI reads; DESIGN.md's keys) and ``report.md``."""

from __future__ import annotations

from pathlib import Path

from validation.manifest import atomic_write_json, atomic_write_text

# The keys of DESIGN.md, in order. More may be added, these are never renamed.
REPORT_KEYS = (
    "model",
    "scheme",
    "target",
    "calibration",
    "accuracy",
    "fidelity",
    "latency",
    "lint",
    "gates",
    "artifacts",
)


def build_report(
    *,
    model: str,
    scheme: str,
    target: str,
    calibration: dict,
    accuracy: dict | None,
    fidelity: dict | None,
    latency: dict | None,
    lint: dict | None,
    gates: dict | None,
    artifacts: dict | None,
    **extra,
) -> dict:
    """The report dict with every DESIGN.md key (``None`` where a stage did not run) + extras."""
    report = {
        "model": model,
        "scheme": scheme,
        "target": target,
        "calibration": {k: calibration.get(k) for k in ("method", "num_images", "iters", "seed")}
        | calibration,
        "accuracy": accuracy,
        "fidelity": fidelity,
        "latency": latency,
        "lint": lint,
        "gates": gates,
        "artifacts": artifacts or {},
    }
    report.update(extra)
    return report


def _pct(v) -> str:
    return "n/a" if v is None else f"{v * 100:.2f}%"


def _num(v, fmt: str = ".2f") -> str:
    return "n/a" if v is None else format(v, fmt)


def render_markdown(report: dict) -> str:
    """A one-page summary for people."""
    lines = [f"# sardfq-export report: {report['model']} → {report['target']} ({report['scheme']})", ""]
    cal = report.get("calibration") or {}
    lines += [
        f"Calibration: {cal.get('method')}, {cal.get('num_images')} images, "
        f"{cal.get('iters')} iterations, seed {cal.get('seed')}.",
        "",
    ]
    acc = report.get("accuracy")
    if acc:
        lines += [
            "## Accuracy (real data)",
            "",
            f"Dataset: {acc.get('dataset')} (n={acc.get('n')})",
            "",
            "| model | top-1 |",
            "|---|---|",
            f"| PyTorch FP32 | {_pct(acc.get('fp32_top1'))} |",
            f"| PyTorch fake-quant | {_pct(acc.get('fakequant_top1'))} |",
            f"| deployed | {_pct(acc.get('deployed_top1'))} |",
            "",
            f"Top-1 drop FP32 → deployed: **{_num(acc.get('top1_drop'))} points**.",
            "",
        ]
    fid = report.get("fidelity")
    if fid:
        lines += [
            "## Fidelity (held-out synthetic images, label-free)",
            "",
            f"n={fid.get('n')}: top-1 agreement with FP32 {_pct(fid.get('agreement_vs_fp32'))}, "
            f"with fake-quant {_pct(fid.get('agreement_vs_fakequant'))}; logit cosine vs fake-quant "
            f"{_num(fid.get('cosine_vs_fakequant'), '.6f')}.",
            "",
        ]
    lat = report.get("latency")
    if lat:
        lines += [
            "## Latency",
            "",
            f"Device: {lat.get('device')}",
            "",
            "| batch | reference p50 / p95 (ms) | deployed p50 / p95 (ms) | speed-up |",
            "|---|---|---|---|",
        ]
        for b, row in (lat.get("by_batch") or {str(lat.get("batch")): lat}).items():
            r, d = row["reference"], row["deployed"]
            lines.append(
                f"| {b} | {r['p50_ms']:.2f} / {r['p95_ms']:.2f} ({r.get('runtime')}) | "
                f"{d['p50_ms']:.2f} / {d['p95_ms']:.2f} ({d.get('runtime')}) | {row['speedup']:.2f}× |"
            )
        lines.append("")
    census = report.get("op_census")
    if census:
        lines += [
            "## ONNX Runtime op census (optimized graph)",
            "",
            f"int8 GEMMs: {census.get('int8_gemm')}, INT4 GEMMs (MatMulNBits): {census.get('int4_gemm')}, "
            f"float GEMMs left: {census.get('float_gemm')}.",
            "",
        ]
    lint = report.get("lint")
    if lint:
        lines += [
            "## TensorRT-rules lint",
            "",
            f"{'passed' if lint.get('passed') else 'FAILED'}: "
            f"{len(lint.get('violations', []))} violation(s), {len(lint.get('warnings', []))} warning(s).",
        ]
        lines += [f"- {v}" for v in lint.get("violations", [])] + [""]
    gates = report.get("gates")
    if gates and gates.get("checks"):
        lines += ["## Gates", "", "| gate | value | threshold | result |", "|---|---|---|---|"]
        for c in gates["checks"]:
            lines.append(
                f"| {c['name']} | {_num(c['value'], '.4g') if isinstance(c['value'], float) else c['value']} | "
                f"{c['threshold']} | {'pass' if c['passed'] else '**FAIL**'} |"
            )
        lines.append("")
    return "\n".join(lines) + "\n"


def write_report(out_dir: str | Path, report: dict) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` atomically."""
    out_dir = Path(out_dir)
    return atomic_write_json(out_dir / "report.json", report), atomic_write_text(
        out_dir / "report.md", render_markdown(report)
    )
