"""``report.json`` (the machine-readable verdict CI reads; DESIGN.md's keys) and ``report.md``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sardfq_export.core.io import atomic_write_json, atomic_write_text

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


@dataclass(frozen=True)
class Report:
    """The verdict of a validation, typed: DESIGN.md's keys as fields, the rest in ``extra``.

    ``to_dict()`` is exactly what ``report.json`` holds (the keys in DESIGN.md's order, then extras).
    """

    model: str
    scheme: str
    target: str
    calibration: dict
    accuracy: dict | None
    fidelity: dict | None
    latency: dict | None
    lint: dict | None
    gates: dict | None
    artifacts: dict
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, report: dict) -> Report:
        core = {k: report.get(k) for k in REPORT_KEYS}
        core["artifacts"] = core["artifacts"] or {}
        return cls(**core, extra={k: v for k, v in report.items() if k not in REPORT_KEYS})

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in REPORT_KEYS} | self.extra

    @property
    def passed(self) -> bool:
        """Every gate held (True when no gate was evaluated)."""
        return bool((self.gates or {}).get("passed", True))

    @property
    def top1_drop(self) -> float | None:
        return (self.accuracy or {}).get("top1_drop")


def _floor_where(floor: dict) -> str:
    """Where and how the noise floor's noise was put (reports before "where" perturbed the input)."""
    if floor.get("where") == "activations":
        return (
            f"every activation quantizer's input moves by a relative {floor['sigma']:g} "
            "(as another runtime's float rounding does)"
        )
    return f"the input image moves by {floor['sigma']:g}"


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


def _spread(row: dict) -> str:
    lo, hi = row.get("speedup_spread") or (row["speedup"], row["speedup"])
    return f"{lo:.2f}–{hi:.2f}×"


def _ci(row: dict) -> str:
    lo, hi = row.get("speedup_ci") or row.get("speedup_spread") or (row["speedup"], row["speedup"])
    return f"{lo:.2f}–{hi:.2f}×"


def _flags(row: dict) -> str:
    """ " NOISY" / " NOISY (re-measured)" / " (re-measured)" / ""."""
    if row.get("noisy"):
        return " NOISY (re-measured)" if row.get("remeasured") else " NOISY"
    return " (re-measured)" if row.get("remeasured") else ""


def _latency_markdown(lat: dict) -> list[str]:
    rows = lat.get("by_batch") or {str(lat.get("batch")): lat}
    first = next(iter(rows.values()))
    ref_rt = first["reference"].get("runtime", "reference")
    extra = any("torch_fp32" in row for row in rows.values())
    lines = [
        "## Latency",
        "",
        f"Device: {lat.get('device')}"
        + (
            ""
            if "threads" in str(lat.get("device")) or not lat.get("threads")
            else f", {lat['threads']} threads"
        )
        + f". Baseline: {lat.get('baseline') or ref_rt}.",
        "",
    ]
    if lat.get("baseline_note"):
        lines += [f"Note: {lat['baseline_note']}.", ""]
    head = "| batch | reference p50 / p95 (ms) | deployed p50 / p95 (ms) | speed-up | round spread |"
    rule = "|---|---|---|---|---|"
    if extra:
        head += " PyTorch eager FP32 p50 (ms) | speed-up vs eager |"
        rule += "---|---|"
    lines += [head + " noisy |", rule + "---|"]
    for b, row in rows.items():
        r, d = row["reference"], row["deployed"]
        line = (
            f"| {b} | {r['p50_ms']:.2f} / {r['p95_ms']:.2f} ({r.get('runtime')}) | "
            f"{d['p50_ms']:.2f} / {d['p95_ms']:.2f} ({d.get('runtime')}) | **{row['speedup']:.2f}×** | "
            f"{_spread(row) if 'speedup_spread' in row else 'n/a'} |"
        )
        if extra:
            t = row.get("torch_fp32")
            line += f" {t['p50_ms']:.2f} | {t['speedup']:.2f}× |" if t else " n/a | n/a |"
        noisy = "**yes**" if row.get("noisy") else ("no" if "noisy" in row else "n/a")
        lines.append(line + f" {noisy}{' (re-measured)' if row.get('remeasured') else ''} |")
    if "speedup_spread" in first:
        method = lat.get("method") or {}
        lines += [
            "",
            f"Speed-up = median over the interleaved rounds ({first.get('rounds')} at batch {next(iter(rows))}) "
            "of (reference round p50 / deployed round p50); the median's confidence interval from the "
            f"rounds' order statistics is {_ci(first)} ({_pct(first.get('confidence'))} confidence). "
            f"A measurement is *noisy* when (max − min) / median > {method.get('noisy_above', 0.25):g}; "
            "it is then re-measured once with twice the rounds. `--min-speedup` passes on the median when "
            "not noisy; when noisy it passes only if the interval is at or above the threshold, fails if "
            "it is below, and otherwise fails as too noisy to decide (re-run on a quieter machine).",
        ]
    return lines + [""]


def render_markdown(report: dict) -> str:
    """A one-page summary for people."""
    lines = [f"# sardfq-export report: {report['model']} → {report['target']} ({report['scheme']})", ""]
    plots = report.get("plots") or {}  # key → PNG next to report.md (validation.plots)

    def image(key: str, alt: str) -> list[str]:
        return [f"![{alt}]({plots[key]})", ""] if plots.get(key) else []

    cal = report.get("calibration") or {}
    lines += [
        f"Calibration: {cal.get('method')}, {cal.get('num_images')} images, "
        f"{cal.get('iters')} iterations, seed {cal.get('seed')}.",
        "",
        *image("synthesis_loss", "synthesis loss curve"),
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
            *image("accuracy", "top-1 per stage: FP32, fake-quant, deployed"),
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
        floor = fid.get("fakequant_noise_floor")
        if floor:
            lines += [
                f"Noise floor: the fake-quant model agrees with *itself* on {_pct(floor['agreement'])} of these "
                f"images when {_floor_where(floor)} (logit cosine {_num(floor['cosine'], '.6f')}). "
                "Deployed-vs-fake-quant agreement near this floor is rounding-boundary noise, not an "
                "export fault.",
                "",
            ]
    sens = report.get("sensitivity")
    if sens and sens.get("layers"):
        quant = report.get("quantize") or {}
        kept = quant.get("keep_fp") or []
        lines += [
            "## Per-layer sensitivity (data-free, held-out synthetic images)",
            "",
            f"Each quantized layer alone (the rest float), {sens['images']} images: relative logit error "
            f"and top-1 agreement with the float model. Whole model: {_num(sens['all']['rel_error'], '.2e')}, "
            f"agreement {_pct(sens['all']['agreement'])}.",
            "",
            *image("sensitivity", "per-layer sensitivity"),
            "| layer | rel. error | agreement |",
            "|---|---|---|",
            *(f"| {r['name']} | {r['rel_error']:.2e} | {_pct(r['agreement'])} |" for r in sens["layers"][:8]),
            "",
        ]
        if kept:
            lines += [f"Left float (mixed precision): {', '.join(f'`{k}`' for k in kept)}.", ""]
    lat = report.get("latency")
    if lat:
        lines += _latency_markdown(lat) + image("latency", "latency: deployed vs float, p50 with min–p95")
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
    lines += _gates_markdown(report.get("gates"))
    return "\n".join(lines) + "\n"


def _gates_markdown(gates: dict | None) -> list[str]:
    """The gates: each check with its number (the report field it reads), threshold and source."""
    if not gates or not (gates.get("checks") or gates.get("skipped")):
        return []
    lines = ["## Gates", ""]
    defaults, base = gates.get("defaults") or {}, gates.get("baseline")
    if defaults:
        if not defaults.get("enabled"):
            state = "off (--no-default-gates)"
        elif not defaults.get("thresholds"):
            state = "none for this scheme"
        elif defaults.get("labelled"):
            state = "on (labelled data: the top-1 drop)"
        else:
            state = "on (no labelled data: agreement and logit cosine with FP32 on the held-out images)"
        lines.append(f"Default gates for `{defaults.get('scheme')}`: {state}.")
    if base:
        lines.append(f"Baseline: `{base['path']}` (model {base.get('model')}, scheme {base.get('scheme')}).")
    lines += ["", "| gate | reads | value | threshold | source | result |", "|---|---|---|---|---|---|"]
    for c in gates.get("checks", []):
        value = _num(c["value"], ".4g") if isinstance(c["value"], float) else c["value"]
        note = f" ({c['note']})" if c.get("note") else ""
        # a pass shows its note only where it carries the rule (the agreement floor's confidence bound)
        result = ("pass" + (note if "upper_bound" in c else "")) if c["passed"] else "**FAIL**" + note
        lines.append(
            f"| {c['name']} | `{c.get('metric', '')}` | {value} | {c['threshold']} | {c.get('source', 'user')} "
            f"| {result} |"
        )
    for c in gates.get("skipped", []):
        lines.append(f"| {c['name']} | | | | baseline | skipped: {c['note']} |")
    lines.append("")
    return lines


def write_report(out_dir: str | Path, report: dict) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` atomically."""
    out_dir = Path(out_dir)
    return atomic_write_json(out_dir / "report.json", report), atomic_write_text(
        out_dir / "report.md", render_markdown(report)
    )


def render_readme(report: dict, preprocessing: dict, input_size: tuple[int, ...]) -> str:
    """README.md for the team that receives the folder: what goes in, how to run it, what it measured."""
    c, h, w = input_size
    mean, std = preprocessing.get("mean"), preprocessing.get("std")
    target = report["target"]
    ort_model = report.get("deployed_model") or "model.onnx"
    lines = [
        f"# {report['model']} — {report['scheme']} for {target}",
        "",
        "Made by sardfq-export (data-free quantization). `report.json` is the full verdict, `manifest.json` the "
        "sha256 of every file.",
        "",
        "## Input and output",
        "",
        f"- input `input`: float32, shape `[batch, {c}, {h}, {w}]` (batch is dynamic), NCHW",
        f"- output `logits`: float32, shape `[batch, {report.get('num_classes', 'classes')}]`",
        f"- preprocessing: resize to {h}×{w} ({preprocessing.get('interpolation')}, crop_pct "
        f"{preprocessing.get('crop_pct')}), scale pixels to [0, 1], then `(x - mean) / std` per channel with "
        f"mean {mean} and std {std}; exactly `timm.data.create_transform(input_size=({c}, {h}, {w}), "
        f"interpolation={preprocessing.get('interpolation')!r}, crop_pct={preprocessing.get('crop_pct')}, "
        f"crop_mode={preprocessing.get('crop_mode') or 'center'!r}, mean={tuple(mean or ())}, std={tuple(std or ())})` "
        "(also in the ONNX metadata `sardfq.preprocessing`)"
        + (
            f"; set at quantization over the model's own config: {preprocessing['overrides']}"
            if preprocessing.get("overrides")
            else ""
        ),
        "",
        "## Run it",
        "",
        f"ONNX Runtime (CPU): run `{ort_model}` (the graph that was validated: `model.onnx` with its float "
        "attention folded into ORT's `MultiHeadAttention`; `model.onnx` is the portable QDQ file). Disable "
        "`MatMulAddFusion` (some ORT versions turn DQ→MatMul→Add into a float Gemm before the int8 fusion) and "
        "`SkipLayerNormFusion` (a slower kernel on CPU), stop idle worker spinning, and for INT4 models use "
        "accuracy level 1 (FP32 compute, exact W4A16):",
        "",
        "```python",
        "import onnxruntime as ort",
        "so = ort.SessionOptions()",
        'so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")  # INT4 models: exact W4A16',
        'so.add_session_config_entry("session.force_spinning_stop", "1")',
        f'sess = ort.InferenceSession("{ort_model}", so, providers=["CPUExecutionProvider"],',
        '                            disabled_optimizers=["MatMulAddFusion", "SkipLayerNormFusion"])',
        'logits = sess.run(["logits"], {"input": images})[0]',
        "```",
        "",
    ]
    engine = report.get("engine") or {}
    cmd = engine.get("command")
    lines += [
        "TensorRT: build the engine on the GPU it will run on (an engine is tied to the GPU and TensorRT "
        "version), e.g. `sh build_engine.sh` when this folder has it:",
        "",
        "```sh",
        cmd
        or (
            "trtexec --onnx=model.onnx --saveEngine=model.engine "
            f"--minShapes=input:1x{c}x{h}x{w} --optShapes=input:8x{c}x{h}x{w} --maxShapes=input:32x{c}x{h}x{w}"
        ),
        "```",
        "",
        "TensorRT 10.x: add `--stronglyTyped` for an FP16 ONNX, or `--int8 --fp16` for an FP32 one; "
        "11.x is always strongly typed.",
        "",
    ]
    if engine.get("versions"):
        lines += [f"Built engine: `model.engine` for {engine['versions']}.", ""]
    lines += ["## Measured", ""]
    acc = report.get("accuracy")
    if acc:
        lines.append(
            f"- top-1 on {acc['dataset']} (n={acc['n']}): FP32 {_pct(acc['fp32_top1'])}, deployed "
            f"{_pct(acc['deployed_top1'])} (drop {_num(acc['top1_drop'])} points)"
        )
    fid = report.get("fidelity")
    if fid:
        lines.append(
            f"- agreement with the PyTorch fake-quant model: {_pct(fid['agreement_vs_fakequant'])} "
            f"(cosine {_num(fid['cosine_vs_fakequant'], '.6f')}), with FP32: {_pct(fid['agreement_vs_fp32'])}"
        )
    lat = report.get("latency")
    if lat:
        for b, row in lat.get("by_batch", {}).items():
            ref, torch_row = row["reference"], row.get("torch_fp32")
            lines.append(
                f"- batch {b}: deployed p50 {row['deployed']['p50_ms']:.2f} ms vs {ref.get('runtime')} "
                f"{ref['p50_ms']:.2f} ms ({row['speedup']:.2f}×"
                + (f", rounds {_spread(row)}" if "speedup_spread" in row else "")
                + ")"
                + (
                    f", PyTorch eager FP32 {torch_row['p50_ms']:.2f} ms ({torch_row['speedup']:.2f}×)"
                    if torch_row
                    else ""
                )
                + f" on {lat['device']}{_flags(row)}"
            )
    lint = report.get("lint")
    if lint:
        lines.append(f"- TensorRT-rules lint: {'passed' if lint['passed'] else 'FAILED'}")
    if not (acc or fid or lat):
        lines.append("- not validated on this machine (no deployment runtime for this target here)")
    return "\n".join(lines) + "\n"


def render_summary(report: dict, out: str | Path) -> str:
    """The few lines a person reads on the terminal at the end of a job or ``validate``."""
    acc, fidl, lat, gates = (
        report.get("accuracy"),
        report.get("fidelity"),
        report.get("latency"),
        report["gates"],
    )
    lines = [f"{report['model']} → {report['target']} ({report['scheme']}): {out}/model.onnx"]
    if acc:
        lines.append(
            f"  top-1: fp32 {acc['fp32_top1'] * 100:.2f}%  fake-quant {acc['fakequant_top1'] * 100:.2f}%  "
            f"deployed {acc['deployed_top1'] * 100:.2f}%  (drop {acc['top1_drop']:.2f} points)"
        )
    if fidl:
        lines.append(
            f"  fidelity (n={fidl['n']}): agreement vs fake-quant {fidl['agreement_vs_fakequant'] * 100:.2f}%, "
            f"vs fp32 {fidl['agreement_vs_fp32'] * 100:.2f}%, cosine vs fake-quant "
            f"{fidl['cosine_vs_fakequant']:.6f}"
            + (
                f"; noise floor (fake-quant vs itself, 1e-6 noise in "
                f"{fidl['fakequant_noise_floor'].get('where', 'input')}) "
                f"{fidl['fakequant_noise_floor']['agreement'] * 100:.2f}%"
                if fidl.get("fakequant_noise_floor")
                else ""
            )
        )
    if lat:
        for b, row in lat["by_batch"].items():
            torch_row = row.get("torch_fp32")
            lines.append(
                f"  latency batch {b}: {row['reference']['runtime']} {row['reference']['p50_ms']:.2f} ms, "
                f"{row['deployed']['runtime']} {row['deployed']['p50_ms']:.2f} ms → {row['speedup']:.2f}×"
                + (f" (rounds {_spread(row)})" if "speedup_spread" in row else "")
                + (
                    f"; {torch_row['runtime']} {torch_row['p50_ms']:.2f} ms → {torch_row['speedup']:.2f}×"
                    if torch_row
                    else ""
                )
                + _flags(row)
            )
    census = report.get("op_census")
    if census:
        lines.append(f"  ORT kernels: {census['int8_gemm']} int8 GEMMs, {census['int4_gemm']} INT4 GEMMs")
    lint = report.get("lint") or {}
    by_source: dict[str, int] = {}
    for c in gates["checks"]:
        by_source[c.get("source", "user")] = by_source.get(c.get("source", "user"), 0) + 1
    sources = ", ".join(f"{n} {src}" for src, n in sorted(by_source.items()))
    lines.append(
        f"  lint: {'passed' if lint.get('passed') else 'FAILED'}; gates: "
        f"{'passed' if gates['passed'] else 'FAILED'} ({len(gates['checks'])} checks"
        + (f": {sources}" if sources else "")
        + ")"
    )
    return "\n".join(lines)
