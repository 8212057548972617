"""Pictures for people, written next to report.md and embedded in it: per-layer sensitivity
(sensitivity.png), latency bars (latency.png), accuracy per stage (accuracy.png) and the synthesis
loss curve (synthesis_loss.png). matplotlib with the Agg backend: files only, never a display.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sardfq_export.core.io import atomic_path

# report.json's ``plots`` key → file name under --out (the job's artifact names)
PLOT_FILES = {
    "latency": "latency.png",
    "accuracy": "accuracy.png",
    "synthesis_loss": "synthesis_loss.png",
    "sensitivity": "sensitivity.png",
}
_FLOAT, _DEPLOYED, _EAGER = "#7f8c8d", "#2471a3", "#d5dbdb"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: never a display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    _pyplot().close(fig)
    return path


def sensitivity_chart(
    path: str | Path, sensitivity: dict, keep_fp: tuple[str, ...] = (), top: int = 24
) -> Path:
    """Horizontal bars: each quantized layer's added logit error alone (log scale), worst first.

    Layers left float (``keep_fp``) are drawn in grey and labelled; the whole model's error is the
    dashed line, so a person sees which few layers carry it.
    """
    plt = _pyplot()
    rows = sensitivity["layers"][:top]
    names = [r["name"] for r in rows][::-1]
    errs = [max(r["rel_error"], 1e-12) for r in rows][::-1]
    colors = ["#9e9e9e" if n in keep_fp else "#c0392b" for n in names]
    fig, ax = plt.subplots(figsize=(8, 0.28 * len(rows) + 1.6), dpi=110)
    ax.barh(names, errs, color=colors)
    ax.set_xscale("log")
    whole = sensitivity["all"]["rel_error"]
    ax.axvline(whole, color="#34495e", linestyle="--", linewidth=1)
    ax.text(whole, len(rows) - 0.4, " all quantized", color="#34495e", fontsize=8, va="bottom", ha="right")
    ax.set_xlabel("relative logit error ‖z_q − z‖² / ‖z‖² with only this layer quantized")
    shown = (
        f"the {len(rows)} most sensitive of {len(sensitivity['layers'])}"
        if len(sensitivity["layers"]) > top
        else "all"
    )
    ax.set_title(
        f"Per-layer sensitivity ({shown} layers, {sensitivity['images']} held-out images)"
        + ("\ngrey: left float" if keep_fp else ""),
        fontsize=10,
    )
    ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    return _save(fig, path)


def latency_chart(path: str | Path, latency: dict, scheme: str | None = None) -> Path:
    """One panel per batch size: p50 latency of the float runtime (the speed-up's baseline), the
    deployed model and PyTorch eager (when measured), error bars from min to p95; the speed-up
    (median round ratio) with its round spread in the panel's title, red when noisy."""
    plt = _pyplot()
    rows = latency.get("by_batch") or {str(latency.get("batch")): latency}
    fig, axes = plt.subplots(1, len(rows), figsize=(4.4 * len(rows), 3.9), dpi=110, squeeze=False)
    for ax, (batch, row) in zip(axes[0], rows.items(), strict=True):
        ref, dep = row["reference"], row["deployed"]
        bars = [(f"{ref.get('runtime', 'float')}\n(float baseline)", ref, _FLOAT),
                (f"{dep.get('runtime', 'deployed')}\n(deployed{' ' + scheme if scheme else ''})", dep, _DEPLOYED)]  # fmt: skip
        if row.get("torch_fp32"):
            bars.append(("PyTorch eager\nFP32", row["torch_fp32"], _EAGER))
        p50 = [r["p50_ms"] for _, r, _ in bars]
        lo = [max(0.0, r["p50_ms"] - r.get("min_ms", r["p50_ms"])) for _, r, _ in bars]
        hi = [max(0.0, r.get("p95_ms", r["p50_ms"]) - r["p50_ms"]) for _, r, _ in bars]
        x = list(range(len(bars)))
        ax.bar(x, p50, color=[c for _, _, c in bars], edgecolor="#34495e", linewidth=0.6, width=0.65,
               yerr=[lo, hi], capsize=5, error_kw={"elinewidth": 1, "ecolor": "#2c3e50"})  # fmt: skip
        ax.set_xticks(x, [n for n, _, _ in bars], fontsize=8)
        # the axis is the headline pair's (float vs deployed): a PyTorch eager bar far above it is cut
        # at the top and says so, rather than squashing the two bars the speed-up compares
        top = (max(p + h for p, h in zip(p50[:2], hi[:2], strict=True)) or 1.0) * 1.15
        if len(bars) > 2 and p50[2] + hi[2] <= 2 * top:
            top = max(top, (p50[2] + hi[2]) * 1.05)
        ax.set_ylim(0, top)
        for i, v in enumerate(p50):
            if v > 0.9 * top:
                ax.text(i, 0.97 * top, f"{v:.2f} ms\n(off scale ↑)", ha="center", va="top", fontsize=8)
            else:
                ax.text(i, min(v + hi[i], 0.9 * top) + top * 0.015, f"{v:.2f} ms", ha="center", va="bottom",
                        fontsize=8)  # fmt: skip
        spread = row.get("speedup_spread")
        title = f"batch {batch}: {row['speedup']:.2f}× faster than float"
        if spread:
            title += f"\n(rounds {spread[0]:.2f}–{spread[1]:.2f}×{', NOISY' if row.get('noisy') else ''})"
        ax.set_title(title, fontsize=9.5, color="#c0392b" if row.get("noisy") else "black")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("latency p50 (ms); bars: min – p95")
    fig.suptitle(f"Latency on {latency.get('device')}", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def accuracy_chart(path: str | Path, accuracy: dict) -> Path:
    """Top-1 of the FP32 model, the fake-quant model and the deployed one on the real data, with
    values on the bars; the axis is zoomed on them (said in the label) so a drop of tenths shows."""
    plt = _pyplot()
    stages = [("PyTorch FP32", accuracy.get("fp32_top1"), _FLOAT),
              ("PyTorch fake-quant", accuracy.get("fakequant_top1"), "#85c1e9"),
              ("deployed", accuracy.get("deployed_top1"), _DEPLOYED)]  # fmt: skip
    stages = [(n, v * 100.0, c) for n, v, c in stages if v is not None]
    vals = [v for _, v, _ in stages]
    fig, ax = plt.subplots(figsize=(5.6, 3.6), dpi=110)
    ax.bar(range(len(stages)), vals, color=[c for _, _, c in stages], edgecolor="#34495e", linewidth=0.6)
    span = max(vals) - min(vals)
    floor = max(0.0, min(vals) - max(2.0, 3 * span))
    ax.set_ylim(floor, min(100.0, max(vals) + max(1.0, span)))
    ax.set_xticks(range(len(stages)), [n for n, _, _ in stages], fontsize=9)
    ax.set_ylabel("top-1 (%)" + (f", axis from {floor:.1f}%" if floor > 0 else ""))
    for i, v in enumerate(vals):
        ax.text(i, v, f"{v:.2f}%", ha="center", va="bottom", fontsize=9)
    drop = accuracy.get("top1_drop")
    data = str(accuracy.get("dataset"))
    if "/" in data:  # a folder or file: its last two parts say enough
        data = "/".join(Path(data).parts[-2:])
    ax.set_title(f"Top-1 on {data} (n={accuracy.get('n')})"
                 + (f"\ndrop FP32 → deployed: {drop:.2f} points" if drop is not None else ""), fontsize=10)  # fmt: skip
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def loss_chart(path: str | Path, loss_curve: list[dict], method: str = "synthesis") -> Path:
    """The synthesis losses against the iteration: the total of every batch (left) and each loss
    term, the mean over batches (right), log scale."""
    plt = _pyplot()
    terms = [k for k in loss_curve[0] if k not in ("batch", "iteration", "total")]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.5, 3.6), dpi=110)
    for c in loss_curve:
        left.plot(c["iteration"], c["total"], linewidth=1, label=f"batch {c['batch']}")
    left.set_title(f"{method}: total loss per batch of images", fontsize=10)
    if len(loss_curve) <= 8:
        left.legend(fontsize=7)
    plotted: list[float] = []
    its = loss_curve[0]["iteration"]
    for term in terms:
        rows = [c[term] for c in loss_curve if len(c[term]) == len(its)]
        mean = [sum(v) / len(rows) for v in zip(*rows, strict=True)] if rows else []
        if mean and any(abs(v) > 0 for v in mean):
            right.plot(its, mean, linewidth=1.2, label=term)
            plotted += mean
    right.set_title("each term (mean over batches)", fontsize=10)
    if plotted:
        right.legend(fontsize=8)
        if min(plotted) > 0 and max(plotted) / min(plotted) > 100:  # terms decades apart: log scale
            right.set_yscale("log")
    for ax in (left, right):
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    left.set_ylabel("loss")
    fig.tight_layout()
    return _save(fig, path)


def draw_report_plots(
    out: str | Path,
    report: dict,
    loss_curve: list[dict] | None = None,
    say: Callable[[str], None] | None = None,
) -> dict[str, str]:
    """Draw the report's pictures that it has the numbers for into ``out``: ``{key: file name}``
    (report.json's ``plots``; report.md embeds them). A picture never fails the run: a drawing
    error is said and that plot left out. ``sensitivity`` is listed when ``sensitivity.png`` exists."""
    say = say or (lambda _m: None)
    out = Path(out)
    todo: dict[str, Callable[[Path], Path]] = {}
    lat = report.get("latency")
    if lat and (lat.get("by_batch") or lat.get("reference")):
        todo["latency"] = lambda p: latency_chart(p, lat, report.get("scheme"))
    acc = report.get("accuracy")
    if acc and acc.get("fp32_top1") is not None:
        todo["accuracy"] = lambda p: accuracy_chart(p, acc)
    # Synthesis curves are rows ({"iteration", terms...}); PSAQ-ViT V2's is columns (step, phase,
    # disc...) and has no chart yet: left out rather than failing the run.
    if (
        isinstance(loss_curve, list)
        and loss_curve
        and isinstance(loss_curve[0], dict)
        and loss_curve[0].get("iteration")
    ):
        method = (report.get("calibration") or {}).get("method") or "synthesis"
        todo["synthesis_loss"] = lambda p: loss_chart(p, loss_curve, method)
    drawn: dict[str, str] = {}
    for key, draw in todo.items():
        name = PLOT_FILES[key]
        try:
            draw(out / name)
            drawn[key] = name
        except Exception as exc:  # a picture must never fail the job
            say(f"note: {name} not drawn ({type(exc).__name__}: {exc})")
    if (out / PLOT_FILES["sensitivity"]).is_file() and report.get("sensitivity"):
        drawn["sensitivity"] = PLOT_FILES["sensitivity"]
    return drawn
