"""Gates: the checks CI fails on (exit 3), computed from the report's numbers."""

from __future__ import annotations

from dataclasses import dataclass

from sardfq_export.core.errors import GateFailedError


@dataclass(frozen=True)
class GateSpec:
    """Thresholds (``None``: not gated)."""

    max_top1_drop: float | None = None  # points of top-1 (FP32 → deployed) on real data
    min_agreement: float | None = None  # deployed vs fake-quant top-1 agreement, 0..1
    min_speedup: float | None = None  # reference p50 / deployed p50
    require_lint: bool = True  # the exported ONNX passes the TensorRT-rules lint


def _check(name: str, value, threshold, ok: bool, note: str = "") -> dict:
    out = {"name": name, "value": value, "threshold": threshold, "passed": bool(ok)}
    if note:
        out["note"] = note
    return out


def evaluate_gates(report: dict, spec: GateSpec) -> dict:
    """``{"passed", "checks": [{name, value, threshold, passed}]}`` for the report's numbers.

    A gate whose number was not measured fails (and says so): a CI gate never passes silently.
    """
    checks = []
    if spec.max_top1_drop is not None:
        drop = (report.get("accuracy") or {}).get("top1_drop")
        checks.append(
            _check(
                "max_top1_drop",
                drop,
                spec.max_top1_drop,
                drop is not None and drop <= spec.max_top1_drop,
                "" if drop is not None else "no real-data accuracy (pass --data)",
            )
        )
    if spec.min_agreement is not None:
        agr = (report.get("fidelity") or {}).get("agreement_vs_fakequant")
        checks.append(
            _check(
                "min_agreement",
                agr,
                spec.min_agreement,
                agr is not None and agr >= spec.min_agreement,
                "" if agr is not None else "fidelity not measured",
            )
        )
    if spec.min_speedup is not None:
        sp = (report.get("latency") or {}).get("speedup")
        checks.append(
            _check(
                "min_speedup",
                sp,
                spec.min_speedup,
                sp is not None and sp >= spec.min_speedup,
                "" if sp is not None else "latency not measured",
            )
        )
    lint = report.get("lint")
    if spec.require_lint and lint:
        n = len(lint.get("violations", []))
        checks.append(
            _check("lint", n, 0, bool(lint.get("passed")), "TensorRT-rules violations in model.onnx")
        )
    return {"passed": all(c["passed"] for c in checks), "checks": checks}


def enforce(gates: dict) -> None:
    """Raise GateFailedError (exit 3) naming every failed check."""
    failed = [c for c in gates["checks"] if not c["passed"]]
    if failed:
        parts = [
            f"{c['name']}: {_fmt(c['value'])} vs {_fmt(c['threshold'])}"
            + (f" ({c['note']})" if c.get("note") else "")
            for c in failed
        ]
        raise GateFailedError("gate failed — " + "; ".join(parts))


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
