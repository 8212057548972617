"""Gates: the checks CI fails on (exit 3), computed from the report's numbers.

Every check in ``report.json``'s ``gates.checks`` says where its threshold came from (``source``):

- ``user``: set on the command line (``--max-top1-drop``...) or in :class:`GateSpec`;
- ``default``: the scheme's row of :data:`DEFAULT_GATES`, for every threshold the user left unset
  (``--no-default-gates`` / ``GateSpec(defaults=False)`` turns them off), so that a broken model
  fails without any flag: with labelled data a maximum top-1 drop, without it a label-free floor on
  agreement and logit cosine with the FP32 model on the held-out synthetic images (the default
  agreement floor is tested on its 95% upper confidence bound: :func:`agreement_upper_bound`);
- ``baseline``: regression against the ``report.json`` of an earlier run of the same model
  (``--baseline``): deployed top-1, agreement with FP32, latency speed-up.

A gate whose number was not measured fails (and says so): a CI gate never passes silently.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

from sardfq_export.core.errors import GateFailedError, UserInputError
from sardfq_export.core.io import sha256_file

# Default thresholds per exportable scheme (README "Gates"). Research schemes have none.
# max_top1_drop: points of top-1 (FP32 → deployed) on real labelled data, applied with --data.
# min_fp32_agreement / min_fp32_cosine: label-free floors on the held-out synthetic images, applied
# without --data: the fake-quant model's top-1 agreement with FP32 (fidelity.fakequant_agreement_vs_fp32)
# and the deployed model's logit cosine with FP32 (fidelity.cosine_vs_fp32).
# Measured: the embedded reference model at w8a8: agreement 1.0, cosine 0.9999; a DINOv2 ViT-S/14
# at w4a8 that lost 26 points of top-1: fake-quant agreement with FP32 ≈ 0.70 (2000 test images).
DEFAULT_GATES: dict[str, dict[str, float]] = {
    "w8a8": {"max_top1_drop": 1.0, "min_fp32_agreement": 0.90, "min_fp32_cosine": 0.98},
    "w4a16": {"max_top1_drop": 2.0, "min_fp32_agreement": 0.80, "min_fp32_cosine": 0.90},
    "w4a16_b64": {"max_top1_drop": 2.0, "min_fp32_agreement": 0.80, "min_fp32_cosine": 0.90},
    "w4a8": {"max_top1_drop": 2.0, "min_fp32_agreement": 0.80, "min_fp32_cosine": 0.90},
    "w4a4": {"max_top1_drop": 4.0, "min_fp32_agreement": 0.80, "min_fp32_cosine": 0.90},
}
LABELLED_DEFAULTS = ("max_top1_drop",)  # applied when the run has real labelled data
LABEL_FREE_DEFAULTS = ("min_fp32_agreement", "min_fp32_cosine")  # applied when it has none
# --baseline thresholds when not set: top-1 points, agreement (0-1), speed-up ratio to the baseline's
BASELINE_DEFAULTS = {"max_regression": 0.5, "max_agreement_regression": 0.005, "min_speedup_ratio": 0.8}
# The default agreement floor is applied to a one-sided upper confidence bound of the agreement (a
# count of k agreeing images out of n), not to k/n itself: on 8 held-out images one flip is 87.5%,
# below a 0.90 floor by chance alone. The default check fails only when the hold-out shows, at this
# confidence, that the agreement is below the floor (Clopper-Pearson, exact for a binomial count).
AGREEMENT_CONFIDENCE = 0.95


@dataclass(frozen=True)
class Range:
    """The valid values of a threshold (the CLI's click.FloatRange is built from it)."""

    lo: float
    hi: float | None = None  # None: unbounded
    lo_open: bool = False

    def __contains__(self, v: float) -> bool:
        return (
            math.isfinite(v)
            and (v > self.lo if self.lo_open else v >= self.lo)
            and (self.hi is None or v <= self.hi)
        )

    def __str__(self) -> str:
        left = f"> {self.lo:g}" if self.lo_open else f"≥ {self.lo:g}"
        return left if self.hi is None else f"in [{self.lo:g}, {self.hi:g}]"


# threshold → (valid range, command-line flag, what it is)
THRESHOLDS: dict[str, tuple[Range, str, str]] = {
    "max_top1_drop": (Range(0, 100), "--max-top1-drop", "points of top-1, FP32 → deployed, on --data"),
    "min_agreement": (Range(0, 1), "--min-agreement", "deployed vs fake-quant top-1 agreement"),
    "min_speedup": (Range(0, lo_open=True), "--min-speedup", "deployed speed-up over the float runtime"),
    "min_fp32_agreement": (Range(0, 1), "--min-fp32-agreement", "fake-quant vs FP32 top-1 agreement"),
    "min_fp32_cosine": (Range(-1, 1), "--min-fp32-cosine", "deployed vs FP32 logit cosine"),
    "max_regression": (Range(0, 100), "--max-regression", "points of deployed top-1 lost vs --baseline"),
    "max_agreement_regression": (
        Range(0, 1),
        "--max-agreement-regression",
        "deployed-vs-FP32 agreement lost vs --baseline",
    ),
    "min_speedup_ratio": (
        Range(0, lo_open=True),
        "--min-speedup-ratio",
        "speed-up as a fraction of --baseline's",
    ),
}


@dataclass(frozen=True)
class GateSpec:
    """Thresholds (``None``: not set by the user; a default may apply, see the module docstring)."""

    max_top1_drop: float | None = None  # points of top-1 (FP32 → deployed) on real data
    min_agreement: float | None = None  # deployed vs fake-quant top-1 agreement, 0..1
    min_speedup: float | None = None  # median round ratio: float-runtime p50 / deployed p50
    min_fp32_agreement: float | None = None  # fake-quant vs FP32 top-1 agreement, held-out images
    min_fp32_cosine: float | None = None  # deployed vs FP32 logit cosine, held-out images
    require_lint: bool | None = None  # the ONNX passes the TensorRT-rules lint; None: a default gate
    defaults: bool = True  # apply DEFAULT_GATES[scheme] to the thresholds left None
    baseline: str | None = None  # report.json (or its folder) of an earlier run of the same model
    max_regression: float | None = None  # the --baseline thresholds (None: BASELINE_DEFAULTS)
    max_agreement_regression: float | None = None
    min_speedup_ratio: float | None = None

    def __post_init__(self) -> None:
        for name, (valid, flag, what) in THRESHOLDS.items():
            v = getattr(self, name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int | float) or v not in valid:
                raise UserInputError(f"{flag} ({what}) must be {valid}, got {v!r}")
            object.__setattr__(self, name, float(v))
        if self.baseline is None:
            for name in BASELINE_DEFAULTS:
                if getattr(self, name) is not None:
                    raise UserInputError(f"{THRESHOLDS[name][1]} needs --baseline PATH/report.json")

    @property
    def user_thresholds(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name in THRESHOLDS and getattr(self, f.name) is not None}  # fmt: skip


# --- the baseline report --------------------------------------------------------------------------


@dataclass(frozen=True)
class Baseline:
    """An earlier run's ``report.json``, as read (its path and digest go into ``gates.baseline``)."""

    path: str
    sha256: str
    report: dict

    def describe(self) -> dict:
        r = self.report
        return {"path": self.path, "sha256": self.sha256, "model": r.get("model"), "scheme": r.get("scheme"),
                "target": r.get("target")}  # fmt: skip


def load_baseline(path: str | Path) -> Baseline:
    """Read ``--baseline``: a ``report.json`` (or the folder holding one) of an earlier run."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "report.json"
    if not p.is_file():
        raise UserInputError(f"--baseline {path}: no such file (pass the report.json of an earlier run)")
    try:
        report = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserInputError(f"--baseline {p}: not readable JSON ({exc})") from None
    if not isinstance(report, dict) or not isinstance(report.get("model"), str):
        raise UserInputError(f"--baseline {p}: not a sardfq-export report.json (no 'model')")
    return Baseline(str(p.resolve()), sha256_file(p), report)


def check_baseline(
    baseline: Baseline, *, model: str, labelled: bool | None = None, n_images: int | None = None
) -> None:
    """Refuse (exit 2), before any work, a baseline that cannot be compared with this run: another
    model; real-data accuracy in the baseline but no ``--data`` here; another number of images."""
    b = baseline.report
    if b["model"] != model:
        raise UserInputError(
            f"--baseline {baseline.path} is a report of model {b['model']!r}, this run is {model!r}: "
            "compare runs of the same model"
        )
    acc = b.get("accuracy") or {}
    if labelled is False and acc:
        raise UserInputError(
            f"--baseline {baseline.path} measured top-1 on {acc.get('dataset')} ({acc.get('n')} images): "
            "pass the same --data to compare with it"
        )
    if labelled and n_images is not None and acc and acc.get("n") != n_images:
        raise UserInputError(
            f"--baseline {baseline.path} measured top-1 on {acc.get('n')} images, this run on {n_images}: "
            "use the same --data and --limit"
        )


# --- evaluation -----------------------------------------------------------------------------------


def _check(name: str, value, threshold, ok: bool, source: str, metric: str, note: str = "") -> dict:
    out = {"name": name, "value": value, "threshold": threshold, "passed": bool(ok), "source": source,
           "metric": metric}  # fmt: skip
    if note:
        out["note"] = note
    return out


def _binomial_pmf(n: int, p: float) -> list[float]:
    """P(X = i) for i = 0..n, X ~ Binomial(n, p) (log-space recurrence: no overflow at large n)."""
    if p <= 0.0 or p >= 1.0:
        return [float(i == (n if p >= 1.0 else 0)) for i in range(n + 1)]
    step = math.log(p) - math.log1p(-p)
    logs = [n * math.log1p(-p)]
    for i in range(n):
        logs.append(logs[-1] + math.log((n - i) / (i + 1)) + step)
    return [math.exp(v) for v in logs]


def _binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p)."""
    return min(1.0, sum(_binomial_pmf(n, p)[: k + 1]))


def agreement_upper_bound(k: int, n: int, confidence: float = AGREEMENT_CONFIDENCE) -> float:
    """The one-sided ``confidence`` upper bound (Clopper-Pearson) of an agreement seen on k of n images:
    the largest p with P(X <= k | n, p) >= 1 - confidence (1.0 when k == n)."""
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n > 0, got k={k}, n={n}")
    if k == n:
        return 1.0
    lo, hi = k / n, 1.0
    for _ in range(50):  # bisection: P(X <= k | p) falls as p grows
        mid = (lo + hi) / 2
        if _binomial_cdf(k, n, mid) > 1.0 - confidence:
            lo = mid
        else:
            hi = mid
    return lo


def largest_failing_count(n: int, floor: float, confidence: float = AGREEMENT_CONFIDENCE) -> int:
    """The largest agreeing count k of n whose upper bound is below ``floor`` (-1: none can be).

    The bound of k is below the floor exactly when P(X <= k | n, floor) < 1 - confidence (the
    one-sided exact binomial test of "agreement >= floor"), so one pass over the pmf finds it.
    """
    total, last = 0.0, -1
    for k, mass in enumerate(_binomial_pmf(n, floor)):
        total += mass
        if total >= 1.0 - confidence:
            break
        last = k
    return last


def _agreement_floor_check(fid: dict, threshold: float, source: str) -> dict:
    """``min_fp32_agreement``: a user threshold applies to the agreement as measured; the scheme's
    default applies to its upper confidence bound on ``fidelity.n`` images (see AGREEMENT_CONFIDENCE),
    so a handful of held-out images cannot fail a healthy model on one flip, while an agreement far
    below the floor still fails."""
    key = "fakequant_agreement_vs_fp32"
    v, n = fid.get(key), fid.get("n")
    if v is None or source != "default" or not n:
        return _min_check("min_fp32_agreement", fid, key, threshold, source, "fidelity")
    n = int(n)
    k = int(round(v * n))
    upper = agreement_upper_bound(k, n)
    fails_at = largest_failing_count(n, threshold)  # what the gate can detect on this many images
    level = f"{AGREEMENT_CONFIDENCE:.0%}"
    rule = (f"default floor on the {level} upper confidence bound of {k}/{n} agreeing images "
            f"(fails at {fails_at}/{n} or fewer)" if fails_at >= 0
            else f"default floor on the {level} upper confidence bound: {n} images cannot show an agreement "
                 "below it, use more held-out images (--num-images)")  # fmt: skip
    ok = k > fails_at  # (the same as upper >= threshold, without the bisection's rounding)
    if ok and v < threshold:
        note = f"{v:.4g} < {threshold:g} on {n} images is within chance ({level} upper bound {upper:.4g}); {rule}"
    elif not ok:
        note = f"{level} upper bound {upper:.4g} < {threshold:g}: {rule}"
    else:
        note = rule
    out = _check("min_fp32_agreement", v, threshold, ok, source, f"fidelity.{key}", note)
    out.update(
        n=n, agreeing=k, upper_bound=upper, confidence=AGREEMENT_CONFIDENCE, fails_at_or_below=fails_at
    )
    return out


def _min_check(name: str, section: dict, key: str, threshold: float, source: str, section_name: str):
    v = section.get(key)
    return _check(name, v, threshold, v is not None and v >= threshold, source, f"{section_name}.{key}",
                  "" if v is not None else f"{section_name} not measured")  # fmt: skip


def evaluate_gates(
    report: dict, spec: GateSpec, *, labelled: bool | None = None, baseline: Baseline | None = None
) -> dict:
    """``{"passed", "checks": [{name, value, threshold, passed, source, metric[, note]}], "skipped",
    "defaults"[, "baseline"]}`` for the report's numbers.

    ``labelled``: the run had real labelled data (default: the report has an ``accuracy``
    section); it picks the scheme's labelled default (top-1 drop) or label-free ones (agreement and
    cosine with FP32). ``baseline``: default ``load_baseline(spec.baseline)`` when that is set.
    """
    if labelled is None:
        labelled = report.get("accuracy") is not None
    if baseline is None and spec.baseline is not None:
        baseline = load_baseline(spec.baseline)
    scheme = report.get("scheme")
    table = DEFAULT_GATES.get(scheme, {}) if spec.defaults else {}
    applies = LABELLED_DEFAULTS if labelled else LABEL_FREE_DEFAULTS

    def threshold(name: str) -> tuple[float | None, str]:
        if getattr(spec, name) is not None:
            return getattr(spec, name), "user"
        if name in applies and name in table:
            return table[name], "default"
        return None, ""

    acc, fid = report.get("accuracy") or {}, report.get("fidelity") or {}
    checks = []
    thr, src = threshold("max_top1_drop")
    if thr is not None:
        drop = acc.get("top1_drop")
        checks.append(_check("max_top1_drop", drop, thr, drop is not None and drop <= thr, src,
                             "accuracy.top1_drop",
                             "" if drop is not None else "accuracy not measured" if labelled else "no real-data accuracy (pass --data)"))  # fmt: skip
    thr, src = threshold("min_agreement")
    if thr is not None:
        checks.append(_min_check("min_agreement", fid, "agreement_vs_fakequant", thr, src, "fidelity"))
    thr, src = threshold("min_fp32_agreement")
    if thr is not None:
        checks.append(_agreement_floor_check(fid, thr, src))
    thr, src = threshold("min_fp32_cosine")
    if thr is not None:
        checks.append(_min_check("min_fp32_cosine", fid, "cosine_vs_fp32", thr, src, "fidelity"))
    thr, src = threshold("min_speedup")
    if thr is not None:
        checks.append(
            speedup_check(report.get("latency") or {}, thr) | {"source": src, "metric": "latency.speedup"}
        )
    lint = report.get("lint")
    require_lint = spec.require_lint if spec.require_lint is not None else spec.defaults
    if require_lint and lint:
        n = len(lint.get("violations", []))
        checks.append(_check("lint", n, 0, bool(lint.get("passed")),
                             "user" if spec.require_lint else "default", "lint.violations",
                             "TensorRT-rules violations in model.onnx"))  # fmt: skip
    skipped: list[dict] = []
    out = {"passed": True, "checks": checks, "skipped": skipped,
           "defaults": {"enabled": spec.defaults, "scheme": scheme, "labelled": labelled,
                        "thresholds": DEFAULT_GATES.get(scheme)}}  # fmt: skip
    if baseline is not None:
        more, skip = baseline_checks(report, baseline, spec)
        checks += more
        skipped += skip
        out["baseline"] = baseline.describe()
    out["passed"] = all(c["passed"] for c in checks)
    return out


def baseline_checks(report: dict, baseline: Baseline, spec: GateSpec) -> tuple[list[dict], list[dict]]:
    """(checks, skipped): deployed top-1, deployed-vs-FP32 agreement and speed-up against the baseline.

    A number the baseline has and this run lacks fails; one the baseline lacks is skipped (with why),
    as is the speed-up when either side is noisy or measured on another device.
    """
    b = baseline.report

    def thr(name: str) -> float:
        v = getattr(spec, name)
        return BASELINE_DEFAULTS[name] if v is None else v

    checks, skipped = [], []
    # 1. deployed top-1 on real data (points lost vs the baseline)
    b_acc, acc = b.get("accuracy") or {}, report.get("accuracy") or {}
    t = thr("max_regression")
    if b_acc.get("deployed_top1") is None:
        skipped.append({"name": "baseline_top1", "note": "the baseline has no real-data accuracy"})
    elif acc.get("deployed_top1") is None:
        checks.append(_check("baseline_top1", None, t, False, "baseline", "accuracy.deployed_top1",
                             f"the baseline measured top-1 on {b_acc.get('dataset')}: pass --data"))  # fmt: skip
    elif b_acc.get("n") != acc.get("n"):
        checks.append(_check("baseline_top1", None, t, False, "baseline", "accuracy.deployed_top1",
                             f"different data: {acc.get('n')} images here, {b_acc.get('n')} in the baseline"))  # fmt: skip
    else:
        lost = (b_acc["deployed_top1"] - acc["deployed_top1"]) * 100.0
        c = _check("baseline_top1", lost, t, lost <= t, "baseline", "accuracy.deployed_top1",
                   "points of deployed top-1 lost vs the baseline")  # fmt: skip
        checks.append(c | {"baseline_value": b_acc["deployed_top1"], "current_value": acc["deployed_top1"]})
    # 2. deployed vs FP32 top-1 agreement on the held-out images
    key = "agreement_vs_fp32"
    b_agr, agr = (b.get("fidelity") or {}).get(key), (report.get("fidelity") or {}).get(key)
    t = thr("max_agreement_regression")
    if b_agr is None:
        skipped.append({"name": "baseline_agreement", "note": "the baseline has no fidelity"})
    elif agr is None:
        checks.append(_check("baseline_agreement", None, t, False, "baseline", f"fidelity.{key}",
                             "fidelity not measured"))  # fmt: skip
    else:
        lost = b_agr - agr
        same = all((report.get("calibration") or {}).get(k) == (b.get("calibration") or {}).get(k)
                   for k in ("method", "seed", "holdout", "iters"))  # fmt: skip
        note = "agreement lost vs the baseline" + (
            "" if same else " (held-out images made with other calibration settings than the baseline's)"
        )
        c = _check("baseline_agreement", lost, t, lost <= t, "baseline", f"fidelity.{key}", note)
        checks.append(c | {"baseline_value": b_agr, "current_value": agr})
    # 3. latency speed-up, as a fraction of the baseline's
    b_lat, lat = b.get("latency") or {}, report.get("latency") or {}
    t = thr("min_speedup_ratio")
    why = ""
    if b_lat.get("speedup") is None or lat.get("speedup") is None:
        why = f"latency not measured {'in the baseline' if b_lat.get('speedup') is None else 'in this run'}"
    elif b_lat.get("noisy") or lat.get("noisy"):
        why = f"latency noisy {'in the baseline' if b_lat.get('noisy') else 'in this run'}: not compared"
    elif b_lat.get("device") != lat.get("device"):
        why = f"latency measured on another device ({b_lat.get('device')} vs {lat.get('device')})"
    if why:
        skipped.append({"name": "baseline_speedup", "note": why})
    else:
        ratio = lat["speedup"] / b_lat["speedup"]
        c = _check("baseline_speedup", ratio, t, ratio >= t, "baseline", "latency.speedup",
                   "speed-up as a fraction of the baseline's")  # fmt: skip
        checks.append(c | {"baseline_value": b_lat["speedup"], "current_value": lat["speedup"]})
    return checks, skipped


def speedup_check(lat: dict, threshold: float) -> dict:
    """The ``min_speedup`` check from the latency section's round ratios (validation.latency).

    Not noisy: the median ratio (``speedup``) decides. Noisy (the rounds disagree by more than
    25% of the median): the median's confidence interval (``speedup_ci``, ≥ 95% where there are
    enough rounds, from the round ratios' order statistics) decides. It passes only when the
    interval is at or above the threshold (robustly above), fails when it is below (robustly
    below), and otherwise fails as "too noisy to decide": a CI gate never passes on a measurement
    that cannot tell. (Reports without ``speedup_ci`` fall back to the rounds' [min, max].)
    """
    sp = lat.get("speedup")
    if sp is None:
        return _check("min_speedup", sp, threshold, False, "user", "latency.speedup", "latency not measured")
    lo, hi = lat.get("speedup_ci") or lat.get("speedup_spread") or (sp, sp)
    noisy = bool(lat.get("noisy"))
    level = lat.get("confidence")
    spread = (
        f"median's {level:.1%} interval {lo:.3g}–{hi:.3g}" if level else f"round ratios {lo:.3g}–{hi:.3g}"
    )
    if not noisy:
        ok, note = sp >= threshold, ""
    elif lo >= threshold:
        ok, note = True, f"noisy, but robustly above the threshold ({spread})"
    elif hi < threshold:
        ok, note = False, f"noisy, but robustly below the threshold ({spread})"
    else:
        ok, note = (
            False,
            (f"too noisy to decide ({spread} straddles the threshold): re-run on a quieter machine"),
        )
    out = _check("min_speedup", sp, threshold, ok, "user", "latency.speedup", note)
    out.update(interval=[lo, hi], spread=lat.get("speedup_spread") or [sp, sp], noisy=noisy,
               decided=not noisy or lo >= threshold or hi < threshold)  # fmt: skip
    return out


def enforce(gates: dict) -> None:
    """Raise GateFailedError (exit 3) naming every failed check (and where its threshold came from)."""
    failed = [c for c in gates["checks"] if not c["passed"]]
    if failed:
        scheme = (gates.get("defaults") or {}).get("scheme")
        parts = [
            f"{c['name']}: {_fmt(c['value'])} vs {_fmt(c['threshold'])}"
            + (f" [default for {scheme}]" if c.get("source") == "default" else "")
            + (" [vs --baseline]" if c.get("source") == "baseline" else "")
            + (f" ({c['note']})" if c.get("note") else "")
            for c in failed
        ]
        hint = (
            "; the defaults are in the README's gate table: set a threshold, or --no-default-gates"
            if any(c.get("source") == "default" for c in failed)
            else ""
        )
        raise GateFailedError("gate failed — " + "; ".join(parts) + hint)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
