"""Gates: the checks CI fails on (exit 3), computed from the report's numbers."""

from __future__ import annotations

from dataclasses import dataclass

from sardfq_export.core.errors import GateFailedError


@dataclass(frozen=True)
class GateSpec:
    """Thresholds (``None``: not gated)."""

    max_top1_drop: float | None = None  # points of top-1 (FP32 → deployed) on real data
    min_agreement: float | None = None  # deployed vs fake-quant top-1 agreement, 0..1
    min_speedup: float | None = None  # median round ratio: float-runtime p50 / deployed p50
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
        checks.append(speedup_check((report.get("latency") or {}), spec.min_speedup))
    lint = report.get("lint")
    if spec.require_lint and lint:
        n = len(lint.get("violations", []))
        checks.append(
            _check("lint", n, 0, bool(lint.get("passed")), "TensorRT-rules violations in model.onnx")
        )
    return {"passed": all(c["passed"] for c in checks), "checks": checks}


def speedup_check(lat: dict, threshold: float) -> dict:
    """The ``min_speedup`` check from the latency section's round ratios (validation.latency).

    Not noisy: the median ratio (``speedup``) decides. Noisy (the rounds disagree by more than
    25% of the median): it passes only when every round ratio is ≥ the threshold (robustly
    above), fails when every one is below it (robustly below), and otherwise fails as "too noisy
    to decide" — a CI gate never passes on a measurement that cannot tell.
    """
    sp = lat.get("speedup")
    if sp is None:
        return _check("min_speedup", sp, threshold, False, "latency not measured")
    lo, hi = lat.get("speedup_spread") or (sp, sp)
    noisy = bool(lat.get("noisy"))
    spread = f"round ratios {lo:.3g}–{hi:.3g}"
    if not noisy:
        ok, note = sp >= threshold, ""
    elif lo >= threshold:
        ok, note = True, f"noisy, but every round is above the threshold ({spread})"
    elif hi < threshold:
        ok, note = False, f"noisy, but every round is below the threshold ({spread})"
    else:
        ok, note = (
            False,
            (f"too noisy to decide ({spread} straddle the threshold): re-run on a quieter machine"),
        )
    out = _check("min_speedup", sp, threshold, ok, note)
    out.update(spread=[lo, hi], noisy=noisy, decided=not noisy or lo >= threshold or hi < threshold)
    return out


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
