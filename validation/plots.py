"""Pictures for people: the per-layer sensitivity chart (sensitivity.png)."""

from __future__ import annotations

from pathlib import Path

from sardfq_export.core.io import atomic_path


def sensitivity_chart(
    path: str | Path, sensitivity: dict, keep_fp: tuple[str, ...] = (), top: int = 24
) -> Path:
    """Horizontal bars: each quantized layer's added logit error alone (log scale), worst first.

    Layers left float (``keep_fp``) are drawn in grey and labelled; the whole model's error is the
    dashed line, so a person sees which few layers carry it.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: never a display
    import matplotlib.pyplot as plt

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
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
