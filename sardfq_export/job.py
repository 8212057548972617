"""The whole job (``sardfq-export [options]`` and ``sx.run``): synthesize → quantize → export → validate.

Every stage is one API verb (:mod:`sardfq_export.api`) run through the folder's stage cache
(:mod:`sardfq_export.jobcache`), so a re-run reuses what finished and ``--resume`` continues a
half-finished synthesis from its checkpoint. Gates are evaluated on every run from the measured
numbers; :func:`run` returns the :class:`Report` and the caller decides what a failed gate means
(the CLI exits 3).
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from sardfq_export import __version__, api
from sardfq_export.core.calibset import CalibSet
from sardfq_export.core.device import (
    check_precision,
    on_device,
    precision_note,
    resolve_device,
    resolve_precision,
)
from sardfq_export.core.errors import MissingComponentError, UserInputError
from sardfq_export.core.io import MIN_FREE_MB, atomic_write_text, check_min_free_mb, claim_output, sha256_file
from sardfq_export.jobcache import StageCache, content_key
from sardfq_export.validation.deploy import FP16_ENGINE, FP16_MODEL, FP32_MODEL, LATENCY_FORMAT, ORT_MODEL
from sardfq_export.validation.gates import Baseline, GateSpec, check_baseline, load_baseline
from sardfq_export.validation.plots import PLOT_FILES
from sardfq_export.validation.report import Report

# Every artifact a job folder may hold (name in the manifest → path under --out).
ARTIFACTS = ("model.onnx", ORT_MODEL, FP32_MODEL, "calib.safetensors", "calib.json", "holdout.safetensors",
             "holdout.json", "samples.png", "quantized", "model.engine", "model.build.log", "build_engine.sh",
             FP16_MODEL, FP16_ENGINE, "README.md", *PLOT_FILES.values())  # fmt: skip
# Always this run's own (rewritten or checked by a stage every run); any other name in ARTIFACTS
# belongs to this run only when its result names it, and is removed as stale otherwise (_stale).
OWN_ARTIFACTS = ("model.onnx", "calib.safetensors", "calib.json", "holdout.safetensors", "holdout.json",
                 "samples.png", "quantized", "README.md")  # fmt: skip


@dataclass(frozen=True)
class JobConfig:
    """Everything the main job needs; ``None`` means the default (noted per field)."""

    model: str | None = None  # timm name / alias; None: the embedded reference model
    checkpoint: str | None = None
    random_init: bool = False
    model_settings: tuple = ()  # more loader keywords as sorted (key, value) pairs: num_classes, img_size...
    scheme: str | None = None  # None: from bits (8 → w8a8, 4 → w4a16)
    bits: int = 8
    target: str = "onnxruntime"
    calib: str = "sardfq"  # a synthesis method, real:DIR, or a calib.safetensors file
    num_images: int = 32
    # Held-out images for fidelity, the label-free gates and the sensitivity chart; None: the
    # job's rule (:func:`holdout_plan`): real test images with --data, else a quarter share.
    holdout: int | None = None
    iters: int | None = None  # synthesis iterations; None: the model's own default, else the method's
    adaptive: tuple = ()  # --calib psaq2: AdaptiveConfig fields as sorted (key, value) pairs (iters = rounds)
    seed: int = 0
    data: str | None = None  # real labelled data for accuracy
    limit: int | None = None  # evaluate only the first N images of ``data``
    device: str = "auto"  # where torch runs: auto (CUDA when present) | cpu | cuda[:N]
    # synthesis and fine-tuning autocast: auto | fp32 | bf16 (core.device.resolve_precision)
    precision: str = "auto"
    out: str = "sardfq-out"
    gates: GateSpec = GateSpec()
    quantize: api.QuantizeConfig = api.QuantizeConfig()  # its scheme and seed are set from the fields above
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    min_free_mb: float = MIN_FREE_MB  # refuse (exit 2) before any work when --out's disk has less free

    @property
    def scheme_name(self) -> str:
        return self.scheme or ("w4a16" if int(self.bits) == 4 else "w8a8")

    def run_settings(self) -> dict:
        """The settings whose change makes a different run (gates, verbosity and resume do not)."""
        return {
            "model": self.model,
            "checkpoint": str(self.checkpoint) if self.checkpoint else None,
            "random_init": bool(self.random_init),
            "model_settings": [list(kv) for kv in self.model_settings],
            "scheme": self.scheme_name,
            "target": self.target,
            "calib": self.calib,
            "num_images": self.num_images,
            "holdout": holdout_plan(self)[0],
            "precision": self.precision,
            "iters": self.iters,
            "seed": self.seed,
            "data": self.data,
            "limit": self.limit,
            "quantize": {k: v for k, v in self.quantize.to_dict().items() if k not in ("scheme", "seed")},
            # only where used, so that folders of runs without psaq2 keep their settings
            **({"psaq2": [list(kv) for kv in self.adaptive]} if self.adaptive else {}),
        }


# Fidelity images taken from --data's test set when it is given (the first of the --limit'ed set).
REAL_FIDELITY_IMAGES = 32


def holdout_plan(cfg: JobConfig) -> tuple[int, str]:
    """(held-out images drawn from the calibration source, where fidelity's images come from).

    Why not twice the calibration set (as before): synthesis is the job's dominant cost (hours for
    a real ViT on a CPU), and doubling it only fed fidelity. So:

    - ``--data`` given: fidelity runs on real test images (the first ``REAL_FIDELITY_IMAGES`` of
      the set), which no synthetic image can beat for "how does it behave on real inputs"; nothing
      is *chosen* on them (fidelity and the sensitivity chart are measurements, and with labelled
      data the default gates are the top-1 drop), so the test set is not tuned on. No extra synthesis.
      ``--auto-keep-fp`` does choose layers from its held-out images, so it keeps a synthetic share.
    - a synthesis method otherwise: a quarter share, ``max(8, ceil(n / 4))`` more images from the
      same run (32 → 8, synthesis 1.25× instead of 2×), never seen by calibration; enough for the
      label-free default gates (their floors sit well below what a healthy model scores; the
      reference model at w8a8: agreement 1.0, cosine 0.9999).
    - ``real:DIR`` / a file: ``n`` more images of the same source cost nothing to hold out.
    """
    from sardfq_export.synthesis.sources import calib_kind

    if cfg.holdout is not None:
        return cfg.holdout, "calib"
    kind = calib_kind(cfg.calib)
    if kind != "method":
        return cfg.num_images, "calib"
    if cfg.data and cfg.quantize.auto_keep_fp is None:
        return 0, "data"
    return max(8, -(-cfg.num_images // 4)), "calib"


def run(config: JobConfig | None = None, *, say: Callable[[str], None] | None = None, **overrides) -> Report:
    """Run the whole job into ``config.out``; returns the report (``report.passed``: every gate held).

    Raises :class:`MissingComponentError` (with ``.report``) when the target's runtime is missing
    here (TensorRT without a GPU): the ONNX, the build command and the report are written first.
    """
    from dataclasses import replace

    from sardfq_export import calibrators
    from sardfq_export.core.distributed import env_world_size

    cfg = replace(config or JobConfig(), **overrides) if overrides else (config or JobConfig())
    say = say or (lambda _msg: None)
    if env_world_size() > 1:
        raise UserInputError(
            "the main job runs as one process; under torchrun run the stages: 'torchrun --nproc-per-node K "
            "-m sardfq_export synthesize --out DIR/calib.safetensors ...' (and 'quantize'), then "
            "'sardfq-export --calib DIR/calib.safetensors ...'"
        )
    if cfg.target not in api.TARGETS:
        raise UserInputError(f"unknown --target {cfg.target!r}: choose one of {', '.join(api.TARGETS)}")
    if cfg.gates.max_top1_drop is not None and not cfg.data:
        raise UserInputError(
            "--max-top1-drop needs real labelled data: pass --data fashion-mnist or --data DIR"
        )
    check_min_free_mb(cfg.min_free_mb)
    scheme = calibrators.get_scheme(cfg.scheme_name)
    scheme.assert_exportable()
    device = resolve_device(cfg.device)  # CUDA asked for and absent: one line, before any work
    check_precision(cfg.precision, device)
    if note := precision_note(cfg.precision, device):
        say(note)
    baseline = (
        load_baseline(cfg.gates.baseline) if cfg.gates.baseline else None
    )  # read before --out is touched
    out = Path(cfg.out).expanduser()
    # issue 14: pre-flight (writable, free space) and the exclusive lock on --out, before any work
    with claim_output(out, folder=True, say=say, min_free_mb=cfg.min_free_mb):
        return _run_locked(cfg, scheme, out, say, device, baseline)


def _run_locked(
    cfg: JobConfig, scheme, out: Path, say: Callable[[str], None], device, baseline: Baseline | None = None
) -> Report:
    from dataclasses import replace

    from sardfq_export import calibrators

    settings = cfg.run_settings()
    n = cfg.num_images
    holdout, fidelity_from = holdout_plan(cfg)
    cache = StageCache(out, settings, overwrite=cfg.overwrite, say=say)
    loaded = api.load_model(
        cfg.model, cfg.checkpoint, pretrained=not cfg.random_init, **dict(cfg.model_settings)
    )
    if loaded.describe_inferred():
        say(f"model: {loaded.describe_inferred()}")
    # auto → the model's measured default, else bf16 where the device runs it natively (stage keys
    # and the report hold the resolved precision; the state's settings keep what was asked).
    own = loaded.extra.get("precision")
    cfg = replace(
        cfg,
        precision=resolve_precision(cfg.precision, device, own),
        quantize=replace(cfg.quantize, precision=resolve_precision(cfg.quantize.precision, device, own)),
    )
    dataset = None
    if cfg.data and cfg.calib.startswith("real:") and cfg.calib[len("real:") :]:  # never on test images
        from sardfq_export.data import check_disjoint

        calib_src, data_src = check_disjoint(cfg.calib[len("real:") :], cfg.data)
        say(f"calibration: real images of {calib_src} (train split); accuracy: {data_src} (disjoint)")
    if cfg.data:
        from sardfq_export.data import load_dataset

        dataset = load_dataset(cfg.data, loaded.data_config, split="test", limit=cfg.limit)
    if baseline is not None:  # another model, or other data: refused before any work (exit 2)
        check_baseline(baseline, model=loaded.name, labelled=dataset is not None,
                       n_images=len(dataset) if dataset is not None else None)  # fmt: skip
    model_key = calibrators.model_fingerprint(loaded.model)

    # 1. calibration images (+ held-out images for label-free fidelity)
    calib_src: object = cfg.calib
    if Path(cfg.calib).is_file():
        calib_src = {"file": str(Path(cfg.calib).resolve()), "sha256": sha256_file(Path(cfg.calib))}
    # PSAQ-ViT V2 (--calib psaq2) trains the quantized student together with its images: its
    # "synthesize" stage depends on the scheme and recipe too, and it writes quantized/ as well.
    adaptive = cfg.calib in api.ADAPTIVE_CALIBS
    qcfg = api.model_recipe(
        replace(cfg.quantize, scheme=scheme.name, seed=cfg.seed), loaded
    )  # its own defaults
    api.scheme_of(qcfg)  # a recipe its scheme refuses (--weight-block on w8a8...) fails before synthesis
    # --iters: synthesis iterations, or V2's rounds (another unit: the model's synthesis default is not one)
    iters = cfg.iters if cfg.iters is not None or adaptive else loaded.extra.get("synthesis_iters")
    student = {
        "scheme": scheme.to_dict(),
        "recipe": qcfg.to_dict(),
        "psaq2": [list(kv) for kv in cfg.adaptive],
    }
    student = student if adaptive else {}
    # the model's own synthesis grid, colour and frame (SynthConfig.image_scale / grey / frame), in
    # the key only where a model sets them (so no other model's cached sets change key)
    image_scale = {
        k: loaded.extra[k]
        for k in ("synthesis_image_scale", "synthesis_grey", "synthesis_frame")
        if k in loaded.extra
    }
    synth_key = content_key({"model": model_key, "calib": calib_src, "n": n, "holdout": holdout,
                             "iters": iters, "seed": cfg.seed, "precision": cfg.precision,
                             "preprocessing": api.preprocessing(loaded),
                             "v": __version__, **student, **image_scale})  # fmt: skip
    calib_file, held_file = out / "calib.safetensors", out / "holdout.safetensors"
    adapted: dict = {}  # the V2 student, handed from the synthesize stage to the quantize stage

    def synthesize() -> tuple[tuple[CalibSet, CalibSet | None], dict]:
        from sardfq_export.synthesis.config import SynthConfig
        from sardfq_export.synthesis.sources import resolve_calibration

        extra = {}
        if adaptive:
            from sardfq_export.calibrators.adaptive import AdaptiveConfig

            res = api.psaq2(loaded, qcfg, adaptive=AdaptiveConfig.from_dict(dict(cfg.adaptive)), num_images=n,
                            holdout=holdout, seed=cfg.seed, iters=iters, device=device,
                            out=out / "psaq2.safetensors", resume=cfg.resume, progress=cfg.progress)  # fmt: skip
            cal, held = res.calib, res.holdout
            res.quantized.save(out, extra={"seed": cfg.seed})
            adapted["q"] = res.quantized
            extra = {"student": {k: v for k, v in res.quantized.summary.items() if k != "calib"}}
        else:
            cal, held = resolve_calibration(
                cfg.calib, loaded, n, holdout, cfg.seed,
                synth_config=SynthConfig(iters=iters, bf16=cfg.precision == "bf16"),
                out=out / "synth.safetensors", resume=cfg.resume, progress=cfg.progress, say=say, device=device,
            )  # fmt: skip
        cal.save(calib_file)
        if held is not None:
            held.save(held_file)
        # The synthesis result (calibration + held-out images in one file, kept so an interrupted
        # synthesis resumes) is now exactly calib + holdout: removed, so the folder holds only
        # what the manifest lists.
        for name in ("synth.safetensors", "synth.json"):
            (out / name).unlink(missing_ok=True)
        (out / "samples.png").unlink(missing_ok=True)  # an earlier set's picture must not stay if this fails
        _draw_samples(out / "samples.png", cal, loaded, say)
        rec = {"method": cal.meta.get("method", cfg.calib), "num_images": len(cal),
               "holdout": len(held) if held is not None else 0,
               "iters": cal.meta.get("iters", iters), "wall_time_s": cal.meta.get("wall_time_s"), **extra}  # fmt: skip
        return (cal, held), rec

    synth_outputs = (
        [calib_file]
        + ([held_file] if holdout else [])
        + ([out / "quantized" / "quantized.json"] if adaptive else [])
    )
    (cal, held), synth_rec = cache.stage(
        "synthesize", synth_key, synthesize,
        lambda _rec: (CalibSet.load(calib_file), CalibSet.load(held_file) if holdout else None), synth_outputs,
    )  # fmt: skip
    if fidelity_from == "data":  # real test images for fidelity (holdout_plan says why); cheap, redone
        import torch

        take = min(len(dataset), REAL_FIDELITY_IMAGES)
        images, _ = dataset.take(range(take))
        held = CalibSet(
            images=images, meta={"method": "real-test", "source": dataset.name, "num_images": take}
        )
        if not (held_file.is_file() and torch.equal(CalibSet.load(held_file).images, images)):
            held.save(held_file)  # (rewritten only when different: the stages below key on its content)
        say(f"held-out: the first {take} images of {dataset.name} (real, for fidelity; no extra synthesis)")
    calibration = {"method": synth_rec.get("method"), "num_images": n, "iters": synth_rec.get("iters"),
                   "seed": cfg.seed, "holdout": len(held),
                   "holdout_source": "data (real test images)" if fidelity_from == "data" else synth_rec.get("method"),
                   "precision": cfg.precision}  # fmt: skip

    # 2. quantize (+ fine-tune); for psaq2: the student the synthesize stage trained and saved
    quant_key = content_key({"synth": synth_key, "calib_sha": sha256_file(calib_file), "scheme": scheme.to_dict(),
                             "recipe": qcfg.to_dict(), "held": _digest(held.images), "v": __version__})  # fmt: skip

    def quantize() -> tuple[api.Quantized, dict]:
        if adaptive:
            q = adapted.get("q") or load_quantized({})
            summary = dict(synth_rec.get("student") or {})
        else:
            q = api.quantize(
                loaded, cal, qcfg, num_images=n, holdout=held, progress=cfg.progress, device=device
            )
            q.save(out, extra={"seed": cfg.seed})
            summary = {k: v for k, v in q.summary.items() if k != "calib"}
        # Data-free per-layer sensitivity on the held-out synthetic images (report + chart).
        if "sensitivity" not in summary:  # (--auto-keep-fp measured it already, before its choice)
            say(f"sensitivity: each quantized layer alone on {len(held)} held-out images")
            with on_device(device, q.model):
                summary["sensitivity"] = calibrators.layer_sensitivity(
                    q.model, held.images, progress=cfg.progress
                )
        return q, {"range": qcfg.range, "finetune": qcfg.finetune, "keep_fp": list(q.scheme.keep_fp),
                   "recipe": qcfg.to_dict(), **summary}  # fmt: skip

    def load_quantized(_rec: dict) -> api.Quantized:
        qmodel = calibrators.load_quantized(out / "quantized", loaded.model).eval()
        return api.Quantized(qmodel, loaded, qcfg)

    quantized, quant_rec = cache.stage(
        "quantize", quant_key, quantize, load_quantized, [out / "quantized" / "quantized.json"]
    )
    if quant_rec.get("sensitivity"):
        _draw_sensitivity(out / "sensitivity.png", quant_rec, say)
    quantized.summary["calib"] = calibration

    # 3. export
    onnx_path = out / "model.onnx"
    export_cfg = api.ExportConfig(fp16=api.TARGETS[cfg.target]["fp16"])
    export_key = content_key({"quant": quant_key, "config": asdict(export_cfg), "v": __version__})

    def export() -> tuple[None, dict]:
        res = api.export(
            quantized, onnx_path, export_cfg, target=cfg.target, metadata={"calibration": calibration},
            device=device,
        )  # fmt: skip
        return None, res.to_dict()

    _, export_rec = cache.stage("export", export_key, export, lambda _rec: None, [onnx_path])
    lint = export_rec.get("lint")
    if lint and not lint["passed"]:
        say(f"lint: {len(lint['violations'])} TensorRT-rule violation(s): {lint['violations'][0]}")

    # 4. deploy + validate
    engine = _build_engine(out, onnx_path, loaded) if api.TARGETS[cfg.target]["engine"] else None
    if engine is not None and engine.get("missing"):
        # No TensorRT here: report the lint, hand over the ONNX + build command, then exit 4.
        report = _finish(cache, loaded, quantized, cfg, calibration, {}, export_rec,
                         {"engine": engine, **_quant_extras(quant_rec)}, baseline, cal.meta.get("loss_curve"),
                         say, device)  # fmt: skip
        exc = MissingComponentError(engine["message"])
        exc.report = report
        raise exc
    val_key = content_key({"onnx": sha256_file(onnx_path), "data": cfg.data, "target": cfg.target,
                           "held": _digest(held.images), "engine": (engine or {}).get("sha256"),
                           "v": __version__, "latency": LATENCY_FORMAT,
                           "threads": _threads(), "device": str(device)})  # fmt: skip
    engine_path = out / engine["path"] if engine else None
    fp32_key = content_key({"model": model_key, "data": cfg.data, "dataset": getattr(dataset, "name", None),
                            "preprocessing": api.preprocessing(loaded),
                           "n": len(dataset) if dataset is not None else None})  # fmt: skip

    def validate() -> tuple[dict, dict]:
        from sardfq_export.validation.deploy import validate_deployment

        with on_device(device, loaded.model, quantized.model):
            res = validate_deployment(
                say, loaded.model, quantized.model, onnx_path, held.images, dataset, engine_path,
                progress=cfg.progress, fp32_accuracy=cache.state.get("fp32_accuracy", {}).get(fp32_key),
            )  # fmt: skip
        return res, res

    # A finished validation is reused only while the files it names (model.ort.onnx, the float
    # baseline) are still there: another target's run in between removes them as stale.
    prev = cache.record("validate")
    keys = ("deployed_model", "reference_model", "reference_engine")
    named = [out / prev[k] for k in keys if isinstance(prev.get(k), str)]
    val, _ = cache.stage("validate", val_key, validate, lambda rec: rec, named)
    if val.get("accuracy"):  # the float model's accuracy depends only on the model and the data
        acc = val["accuracy"]
        cache.state.setdefault("fp32_accuracy", {})[fp32_key] = {
            "top1": acc["fp32_top1"],
            "top5": acc.get("fp32_top5"),
        }
        cache.save()
    return _finish(
        cache, loaded, quantized, cfg, calibration, val, export_rec,
        {**({"engine": engine} if engine else {}), **_quant_extras(quant_rec)}, baseline,
        cal.meta.get("loss_curve"), say, device,
    )  # fmt: skip


def _digest(t) -> str:
    """sha256 of a tensor's values (a file's bytes may differ for the same tensors: safetensors'
    header order is not fixed across processes)."""
    import hashlib

    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:32]


def _threads() -> int:
    import torch

    return torch.get_num_threads()  # --threads: a latency holds for its thread count (torch and ORT alike)


def _draw_samples(path: Path, cal: CalibSet, loaded, say: Callable[[str], None]) -> None:
    from sardfq_export.synthesis.samples import save_samples

    try:
        save_samples(path, cal, loaded)
    except Exception as exc:  # a picture must never fail the job
        say(f"note: samples.png not drawn ({type(exc).__name__}: {exc})")


def _quant_extras(quant_rec: dict) -> dict:
    """report.json's ``quantize`` (the recipe as run, mixed precision included) and ``sensitivity``."""
    keys = ("recipe", "keep_fp", "gptq", "auto_keep_fp", "recon", "kd", "psaq2", "quant", "seconds")
    return {"quantize": {k: quant_rec[k] for k in keys if k in quant_rec},
            "sensitivity": quant_rec.get("sensitivity")}  # fmt: skip


def _draw_sensitivity(path: Path, quant_rec: dict, say: Callable[[str], None]) -> None:
    from sardfq_export.validation.plots import sensitivity_chart

    try:
        sensitivity_chart(path, quant_rec["sensitivity"], tuple(quant_rec.get("keep_fp") or ()))
    except Exception as exc:  # a picture must never fail the job
        say(f"note: sensitivity.png not drawn ({type(exc).__name__}: {exc})")


def _build_engine(out: Path, onnx_path: Path, loaded) -> dict:
    from sardfq_export.exporters.tensorrt import EngineConfig, build_engine

    try:
        res = build_engine(onnx_path, out / "model.engine", "input", tuple(loaded.input_size), EngineConfig())
    except MissingComponentError as exc:
        cmd = (out / "build_engine.sh").read_text().strip().splitlines()[-1]  # relative to --out
        return {"missing": True, "message": str(exc), "command": cmd, "script": "build_engine.sh"}
    return {"missing": False, "path": res.engine.name, "log": res.log.name, "versions": res.versions,
            "build_s": res.build_s, "sha256": sha256_file(res.engine)}  # fmt: skip


def _stale(report: dict) -> list[str]:
    """The names in ARTIFACTS this run did not make: left by an earlier run with other settings
    (another --target, a TensorRT host, a run with --data...) and removed before the manifest."""
    mine = set(OWN_ARTIFACTS)
    keys = ("deployed_model", "reference_model", "reference_engine")
    mine.update(v for k, v in report.items() if k in keys and isinstance(v, str))
    engine = report.get("engine") or {}
    if engine.get("missing"):
        mine.add(engine.get("script") or "build_engine.sh")
    elif engine:
        mine.update(v for v in (engine.get("path"), engine.get("log")) if v)
    mine.update((report.get("plots") or {}).values())
    return [name for name in ARTIFACTS if name not in mine]


def _remove_stale(out: Path, report: dict, say: Callable[[str], None]) -> list[str]:
    import shutil

    removed = []
    for name in _stale(report):
        p = out / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
        else:
            continue
        removed.append(name)
    if removed:
        say(f"removed {', '.join(removed)}: left by an earlier run with other settings")
    return removed


def _finish(cache: StageCache, loaded, quantized, cfg: JobConfig, calibration: dict, val: dict,
            export_rec: dict, extra: dict | None, baseline: Baseline | None = None,
            loss_curve: list | None = None, say: Callable[[str], None] | None = None,
            device=None) -> Report:  # fmt: skip
    """Gates, plots, report.json/md, the receiver README and the manifest: the job's last step.

    Artifacts an earlier run left that this one did not make are removed from the folder first, so
    that the report and manifest list exactly this run's files."""
    from sardfq_export.validation.gates import evaluate_gates
    from sardfq_export.validation.manifest import collect_artifacts, write_manifest
    from sardfq_export.validation.plots import draw_report_plots
    from sardfq_export.validation.report import build_report, render_readme, write_report

    out = cache.out
    report = build_report(
        model=loaded.name,
        scheme=quantized.scheme.name,
        target=cfg.target,
        calibration=calibration,
        accuracy=val.get("accuracy"),
        fidelity=val.get("fidelity"),
        latency=val.get("latency"),
        lint=export_rec.get("lint"),
        gates=None,
        artifacts=None,
        op_census=val.get("op_census"),
        deployed_model=val.get("deployed_model"),
        reference_model=val.get("reference_model"),
        **({"reference_engine": val["reference_engine"]} if val.get("reference_engine") else {}),
        runtime_settings=val.get("runtime_settings"),
        export={k: export_rec.get(k) for k in ("opset", "weights", "scheme")},
        model_source=loaded.source,
        num_classes=loaded.num_classes,
        runtime=api.runtime_record(
            device if device is not None else resolve_device(cfg.device), cfg.precision
        ),
        preprocessing=api.preprocessing(loaded),
        **(extra or {}),
    )
    report["gates"] = evaluate_gates(report, cfg.gates, labelled=bool(cfg.data), baseline=baseline)
    report["plots"] = draw_report_plots(out, report, loss_curve, say)
    _remove_stale(out, report, say or (lambda _m: None))
    atomic_write_text(out / "README.md", render_readme(report, api.preprocessing(loaded), loaded.input_size))
    names = {name: name for name in ARTIFACTS}
    report["artifacts"] = collect_artifacts(out, names)
    write_report(out, report)
    artifacts = collect_artifacts(out, {**names, "report.json": "report.json", "report.md": "report.md"})
    command = (
        ["sardfq-export", *sys.argv[1:]]
        if Path(sys.argv[0]).name in ("sardfq-export", "__main__.py")
        else None
    )
    write_manifest(out, artifacts, command=command or [shlex.join(sys.argv)], settings=cache.settings,
                   extra={"stages": cache.stage_seconds()})  # fmt: skip
    return Report.from_dict(report)
