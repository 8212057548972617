"""The main job: synthesize → quantize (→ fine-tune) → export → validate, into one ``--out`` folder.

Each stage is keyed by a hash of everything it depends on (the upstream stage's key, its own
settings, the model's fingerprint). A re-run reuses every finished stage whose key did not
change, so an interrupted or repeated run only redoes what is missing or different; ``--resume``
additionally continues a half-finished synthesis from its checkpoint. An ``--out`` written with
different settings is refused unless ``--overwrite`` (which then redoes only the stages whose
inputs changed). Gates are evaluated on every run, from the measured numbers.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import click
import torch

from sardfq_export import __version__
from sardfq_export.calibset import CalibSet
from sardfq_export.errors import MissingComponentError, UserInputError

STATE_FILE = ".sardfq-state.json"
QUANT_RANGE = "mse"  # activation and weight range method (the 'quantize' command's default)
ORT_MODEL = "model.ort.onnx"  # the onnxruntime target's deployed graph (ORT contrib ops)
QUANT_FINETUNE = "none"  # 'recon' / 'kd' cost minutes; the main job stays fast by default
LATENCY_BATCHES = (1, 32)
# Settings whose change means "a different run" (gates, verbosity and --resume do not).
RUN_SETTINGS = (
    "model",
    "checkpoint",
    "random_init",
    "scheme",
    "target",
    "calib",
    "num_images",
    "holdout",
    "iters",
    "seed",
    "data",
)


@dataclass(frozen=True)
class TargetSpec:
    """A deployment target: how its ONNX is written and which runtime validates it."""

    fp16: bool  # unquantized ops in FP16 (TensorRT 11 gets FP16 only from the ONNX)
    engine: bool  # builds a TensorRT engine


# Adding a target adds a line here (and its test and README line).
TARGETS: dict[str, TargetSpec] = {
    "onnx": TargetSpec(fp16=False, engine=False),
    "onnxruntime": TargetSpec(fp16=False, engine=False),
    "tensorrt": TargetSpec(fp16=True, engine=True),
}


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_sha(path: Path) -> str:
    from validation.manifest import sha256_file

    return sha256_file(path)


class _Run:
    """State of one pipeline run: the folder, the recorded stages, progress output."""

    def __init__(self, out: Path, settings: dict, quiet: bool, overwrite: bool):
        self.out = out
        self.quiet = quiet
        self.settings = settings
        self.state_path = out / STATE_FILE
        self.state = self._open(overwrite)
        self.t0 = time.perf_counter()

    def _open(self, overwrite: bool) -> dict:
        if self.state_path.exists():
            try:
                state = json.loads(self.state_path.read_text())
            except (OSError, json.JSONDecodeError):
                state = None
            if state is not None:
                old = state.get("settings", {})
                diff = sorted(k for k in RUN_SETTINGS if old.get(k) != self.settings.get(k))
                if diff and not overwrite:
                    shown = ", ".join(f"{k}: {old.get(k)!r} → {self.settings.get(k)!r}" for k in diff)
                    raise UserInputError(
                        f"{self.out} holds a run with different settings ({shown}): pass --overwrite to "
                        "replace it (finished stages whose inputs did not change are kept), or another --out"
                    )
                state["settings"] = self.settings
                return state
        elif self.out.exists() and any(self.out.iterdir()) and not overwrite:
            raise UserInputError(
                f"{self.out} exists and is not a sardfq-export output folder: pass --overwrite or another --out"
            )
        self.out.mkdir(parents=True, exist_ok=True)
        return {"format": "sardfq-state-1", "settings": self.settings, "stages": {}}

    def say(self, msg: str) -> None:
        if not self.quiet:
            click.echo(f"[{time.perf_counter() - self.t0:6.1f}s] {msg}", err=True)

    def save(self) -> None:
        from validation.manifest import atomic_write_json

        atomic_write_json(self.state_path, self.state)

    def stage(self, name: str, key: str, outputs: list[Path], fn: Callable[[], dict]) -> tuple[dict, bool]:
        """Run ``fn`` unless the stage finished with the same key and its outputs exist."""
        rec = self.state["stages"].get(name)
        if rec and rec.get("key") == key and rec.get("done") and all(p.exists() for p in outputs):
            self.say(f"{name}: up to date (reusing {', '.join(p.name for p in outputs) or 'result'})")
            return rec["result"], True
        self.say(f"{name}: running")
        start = time.perf_counter()
        self.state["stages"][name] = {"key": key, "done": False}
        self.save()
        result = fn()
        self.state["stages"][name] = {
            "key": key,
            "done": True,
            "seconds": round(time.perf_counter() - start, 2),
            "result": result,
        }
        self.save()
        self.say(f"{name}: done in {time.perf_counter() - start:.1f}s")
        return result, False


# --- stages -------------------------------------------------------------------------------------


def _synthesize(
    run: _Run, loaded, calib: str, n: int, holdout: int, iters: int | None, seed: int, resume: bool
) -> tuple[CalibSet, CalibSet]:
    """(calibration set, held-out set) written as calib.safetensors / holdout.safetensors."""
    if calib.startswith("real:"):
        sets = _real_calib(calib[5:], loaded, n, holdout, seed)
    elif Path(calib).suffix == ".safetensors" or Path(calib).is_file():
        full = CalibSet.load(calib)
        if len(full) > n:
            sets = full.split(n)
        else:
            run.say(f"note: {calib} has no images beyond the {n} for calibration; fidelity reuses them")
            sets = (full, full)
    else:
        sets = _synthetic_calib(run, loaded, calib, n, holdout, iters, seed, resume)
    cal, held = sets
    cal.save(run.out / "calib.safetensors")
    held.save(run.out / "holdout.safetensors")
    try:
        from sardfq_export.synthesis.samples import save_samples

        save_samples(run.out / "samples.png", cal, loaded)
    except ImportError:
        pass
    except Exception as exc:  # a picture must never fail the job
        run.say(f"note: samples.png not drawn ({type(exc).__name__}: {exc})")
    return cal, held


def _synthetic_calib(run: _Run, loaded, method: str, n: int, holdout: int, iters, seed, resume):
    try:
        from sardfq_export.synthesis import METHODS, SynthConfig, synthesize
    except ImportError as exc:
        raise MissingComponentError(
            f"synthesis ('{method}') is not available in this installation ({exc}); pass --calib real:DIR "
            "or a calib.safetensors file"
        ) from None
    if method not in METHODS:
        raise UserInputError(
            f"unknown --calib {method!r}: use {', '.join(METHODS)}, real:DIR or a .safetensors file"
        )
    cfg = SynthConfig(method=method, num_images=n + holdout, seed=seed, iters=iters)
    full = synthesize(loaded, cfg, out=run.out / "synth.safetensors", resume=resume, progress=not run.quiet)
    return full.split(n)


def _real_calib(spec: str, loaded, n: int, holdout: int, seed: int) -> tuple[CalibSet, CalibSet]:
    from validation.data import load_dataset

    ds = load_dataset(spec, loaded.data_config, split="train")
    if len(ds) < n + 1:
        raise UserInputError(f"--calib real:{spec} has {len(ds)} images; need at least {n + 1}")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds), generator=gen)[: min(len(ds), n + holdout)].numpy()
    images, labels = ds.take(idx)
    meta = {"method": "real", "source": ds.name, "num_images": n, "seed": seed}
    full = CalibSet(images=images, labels=labels, meta=meta)
    return full.split(n)


def _quantize(
    run: _Run, loaded, scheme_name: str, cal: CalibSet, base_ref: dict, random_init: bool, seed: int
):
    """The ``quantize`` command's recipe (MSE ranges for activations and weights), saved to quantized/."""
    import calibrators
    from sardfq_export.cmd_quantize import run_quantize

    qmodel, summary = run_quantize(
        loaded,
        cal,
        scheme_name,
        QUANT_RANGE,
        QUANT_RANGE,
        QUANT_FINETUNE,
        None,
        None,
        seed,
        progress=not run.quiet,
    )
    calibrators.save_quantized(qmodel, run.out, base_ref, include_weights=random_init)
    return qmodel, {"range": QUANT_RANGE, "finetune": QUANT_FINETUNE, **summary}


# --- the job ----------------------------------------------------------------------------------


def run_pipeline(ctx: click.Context | None = None, **opts) -> dict:
    """The main job (``sardfq-export [options]``); returns the report. Raises on gate failure (exit 3)."""
    from sardfq_export.options import load_from_options

    from sardfq_export.distributed import env_world_size

    if env_world_size() > 1:
        raise UserInputError(
            "the main job runs as one process; under torchrun run the stages: 'torchrun --nproc-per-node K "
            "-m sardfq_export synthesize --out DIR/calib.safetensors ...' (and 'quantize'), then "
            "'sardfq-export --calib DIR/calib.safetensors ...'"
        )
    quiet = bool(opts.get("quiet") or opts.get("as_json"))
    scheme_name = opts.get("scheme") or ("w4a16" if str(opts.get("bits")) == "4" else "w8a8")
    target = opts.get("target") or "onnxruntime"
    if target not in TARGETS:
        raise UserInputError(f"unknown --target {target!r}: choose one of {', '.join(TARGETS)}")
    n = int(opts.get("num_images") or 32)
    holdout = int(opts.get("holdout") or n)
    seed = int(opts.get("seed") or 0)
    calib = str(opts.get("calib") or "sardfq")
    data = opts.get("data")
    if opts.get("max_top1_drop") is not None and not data:
        raise UserInputError(
            "--max-top1-drop needs real labelled data: pass --data fashion-mnist or --data DIR"
        )
    import calibrators

    scheme = calibrators.get_scheme(scheme_name)
    scheme.assert_exportable()
    out = Path(opts.get("out") or "sardfq-out").expanduser()
    settings = {
        "model": opts.get("model"),
        "checkpoint": str(opts["checkpoint"]) if opts.get("checkpoint") else None,
        "random_init": bool(opts.get("random_init")),
        "scheme": scheme_name,
        "target": target,
        "calib": calib,
        "num_images": n,
        "holdout": holdout,
        "iters": opts.get("iters"),
        "seed": seed,
        "data": data,
    }
    run = _Run(out, settings, quiet, bool(opts.get("overwrite")))
    torch.manual_seed(seed)  # random-init models are then the same on every run (resumable)
    loaded = load_from_options(opts.get("model"), opts.get("checkpoint"), bool(opts.get("random_init")))
    iters = opts.get("iters")
    if iters is None:  # a model may bring its own default (the reference model: 200)
        iters = loaded.extra.get("synthesis_iters")
    dataset = None
    if data:
        from validation.data import load_dataset

        dataset = load_dataset(data, loaded.data_config, split="test")
    model_key = calibrators.model_fingerprint(loaded.model)
    spec = TARGETS[target]
    base_ref = {
        "name": loaded.name,
        "checkpoint": settings["checkpoint"],
        "random_init": settings["random_init"],
        "source": loaded.source,
        "seed": seed,
    }

    # 1. calibration images (+ held-out images for label-free fidelity)
    calib_src = calib
    if Path(calib).is_file():
        calib_src = {"file": str(Path(calib).resolve()), "sha256": _file_sha(Path(calib))}
    synth_key = _hash(
        {
            "model": model_key,
            "calib": calib_src,
            "n": n,
            "holdout": holdout,
            "iters": iters,
            "seed": seed,
            "v": __version__,
        }
    )
    calib_files = [out / "calib.safetensors", out / "holdout.safetensors"]
    sets: dict = {}

    def do_synth() -> dict:
        cal, held = _synthesize(
            run, loaded, calib, n, holdout, iters, seed, bool(opts.get("resume"))
        )
        sets["cal"], sets["held"] = cal, held
        return {
            "method": cal.meta.get("method", calib),
            "num_images": len(cal),
            "holdout": len(held),
            "iters": cal.meta.get("iters", iters),
            "wall_time_s": cal.meta.get("wall_time_s"),
        }

    synth_res, _ = run.stage("synthesize", synth_key, calib_files, do_synth)
    cal = sets.get("cal") or CalibSet.load(out / "calib.safetensors")
    held = sets.get("held") or CalibSet.load(out / "holdout.safetensors")

    # 2. quantize (+ fine-tune)
    quant_key = _hash(
        {
            "synth": synth_key,
            "calib_sha": _file_sha(out / "calib.safetensors"),
            "scheme": scheme.to_dict(),
            "recipe": [QUANT_RANGE, QUANT_FINETUNE],
            "v": __version__,
        }
    )
    qdir = out / "quantized"
    qholder: dict = {}

    def do_quant() -> dict:
        qmodel, res = _quantize(run, loaded, scheme_name, cal, base_ref, settings["random_init"], seed)
        qholder["q"] = qmodel
        return res

    quant_res, _ = run.stage("quantize", quant_key, [qdir / "quantized.json"], do_quant)
    qmodel = qholder.get("q") or calibrators.load_quantized(qdir, loaded.model)
    qmodel.eval()

    # 3. export
    from exporters.onnx_export import ExportConfig, export_onnx

    onnx_path = out / "model.onnx"
    export_cfg = ExportConfig(fp16=spec.fp16)
    export_key = _hash({"quant": quant_key, "config": export_cfg.__dict__, "v": __version__})

    def do_export() -> dict:
        calib_meta = {
            "method": synth_res.get("method"),
            "num_images": n,
            "iters": synth_res.get("iters"),
            "seed": seed,
        }
        res = export_onnx(
            qmodel,
            onnx_path,
            tuple(loaded.input_size),
            export_cfg,
            metadata={
                "model": loaded.name,
                "sardfq_export_version": __version__,
                "calibration": calib_meta,
                "preprocessing": _preprocessing(loaded),
            },
        )
        return res.to_dict()

    export_res, _ = run.stage("export", export_key, [onnx_path], do_export)
    lint = export_res.get("lint")
    if lint and not lint["passed"]:
        run.say(f"lint: {len(lint['violations'])} TensorRT-rule violation(s): {lint['violations'][0]}")

    # 4. deploy + validate
    from validation.gates import GateSpec, enforce

    gate_spec = GateSpec(opts.get("max_top1_drop"), opts.get("min_agreement"), opts.get("min_speedup"))
    onnx_sha = _file_sha(onnx_path)
    engine_note = None
    if spec.engine:
        engine_note = _build_engine(run, onnx_path, loaded)
    calibration = {
        "method": synth_res.get("method"),
        "num_images": n,
        "iters": synth_res.get("iters"),
        "seed": seed,
        "holdout": synth_res.get("holdout"),
    }
    if engine_note is not None and engine_note.get("missing"):
        # No TensorRT here: report the lint, hand over the ONNX + build command, then exit 4.
        report = _finish(
            run,
            loaded,
            scheme_name,
            target,
            calibration,
            None,
            lint,
            gate_spec,
            export_res,
            extra={"engine": engine_note},
        )
        if opts.get("as_json"):
            click.echo(json.dumps(report, default=str))
        raise MissingComponentError(engine_note["message"])
    val_key = _hash(
        {
            "onnx": onnx_sha,
            "data": data,
            "target": target,
            "held": _file_sha(out / "holdout.safetensors"),
            "engine": (engine_note or {}).get("sha256"),
            "v": __version__,
        }
    )
    engine_path = run.out / engine_note["path"] if engine_note else None
    fp32_key = _hash({"model": model_key, "data": data, "dataset": getattr(dataset, "name", None)})
    val_res, _ = run.stage(
        "validate",
        val_key,
        [],
        lambda: validate_deployment(
            run.say,
            loaded,
            qmodel,
            onnx_path,
            held.images,
            dataset,
            engine_path,
            progress=not run.quiet,
            fp32_accuracy=run.state.get("fp32_accuracy", {}).get(fp32_key),
        ),
    )
    if val_res.get("accuracy"):  # the float model's accuracy depends only on the model and the data
        acc = val_res["accuracy"]
        run.state.setdefault("fp32_accuracy", {})[fp32_key] = {
            "top1": acc["fp32_top1"],
            "top5": acc.get("fp32_top5"),
        }
        run.save()
    report = _finish(
        run,
        loaded,
        scheme_name,
        target,
        calibration,
        val_res,
        lint,
        gate_spec,
        export_res,
        extra={"engine": engine_note} if engine_note else None,
    )
    if opts.get("as_json"):
        click.echo(json.dumps(report, default=str))
    else:
        print_summary(report, out)
    enforce(report["gates"])
    return report


def _preprocessing(loaded) -> dict:
    dc = loaded.data_config
    return {
        k: (list(v) if isinstance(v, tuple) else v)
        for k, v in dc.items()
        if k in ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")
    }


def _build_engine(run: _Run, onnx_path: Path, loaded) -> dict:
    from exporters.tensorrt import EngineConfig, build_engine

    try:
        res = build_engine(
            onnx_path, run.out / "model.engine", "input", tuple(loaded.input_size), EngineConfig()
        )
    except MissingComponentError as exc:
        cmd = (run.out / "build_engine.sh").read_text().strip().splitlines()[-1]  # relative to --out
        return {"missing": True, "message": str(exc), "command": cmd, "script": "build_engine.sh"}
    return {
        "missing": False,
        "path": res.engine.name,
        "log": res.log.name,
        "versions": res.versions,
        "build_s": res.build_s,
        "sha256": _file_sha(res.engine),
    }


def validate_deployment(
    say: Callable[[str], None],
    loaded,
    qmodel,
    onnx_path: Path,
    held_images: torch.Tensor,
    dataset=None,
    engine_path: Path | None = None,
    progress: bool = True,
    batches: tuple[int, ...] = LATENCY_BATCHES,
    fp32_accuracy: dict | None = None,
) -> dict:
    """Fidelity, accuracy (when ``dataset``), latency and (ORT) op census of the deployed model.

    ``fp32_accuracy`` ({"top1", "top5"} of the float model on ``dataset``) skips re-evaluating it.
    """
    from exporters.ort import OrtConfig, create_session, deployment_graph, describe, op_census
    from validation.manifest import atomic_write_bytes
    from validation import fidelity as fid
    from validation import latency
    from validation.evaluate import evaluate
    from validation.runners import OrtRunner, TensorRTRunner, TorchRunner

    threads = torch.get_num_threads()
    device = "cuda" if engine_path and torch.cuda.is_available() else "cpu"
    fp32 = TorchRunner(loaded.model, "torch-fp32", device=device)
    fq = TorchRunner(qmodel, "torch-fakequant", device=device)
    result: dict = {}
    if engine_path:
        deployed = TensorRTRunner(str(engine_path))
    else:
        ort_cfg = OrtConfig(threads=threads)
        # The graph ORT runs (float attention folded into MultiHeadAttention) is an artifact of its
        # own, so what was measured here is what the team deploys.
        graph, fused = deployment_graph(onnx_path, ort_cfg)
        ort_path, run_cfg = onnx_path, ort_cfg
        if fused:  # already rewritten: the session and the census need not load and scan it again
            ort_path = atomic_write_bytes(onnx_path.with_name(ORT_MODEL), graph)
            run_cfg = replace(ort_cfg, fuse_attention=False)
        result["deployed_model"] = ort_path.name
        deployed = OrtRunner(create_session(ort_path, run_cfg), name="onnxruntime")
        result["op_census"] = op_census(ort_path, run_cfg)
        result["runtime_settings"] = describe(ort_cfg)
        say(
            f"op census of {ort_path.name}: {result['op_census']['int8_gemm']} int8 GEMMs, "
            f"{result['op_census']['int4_gemm']} INT4 GEMMs, {result['op_census']['float_gemm']} float GEMMs, "
            f"{result['op_census'].get('attention', 0)} fused attentions"
        )
    say(f"fidelity on {len(held_images)} held-out images")
    result["fidelity"] = fid.fidelity(fp32, fq, deployed, held_images)
    if dataset is not None:
        accs = {}
        if fp32_accuracy is not None:
            accs["fp32"] = dict(fp32_accuracy)
            say(f"accuracy: {fp32.name} reused from an earlier run on the same model and data")
        for key, runner in (("fp32", fp32), ("fakequant", fq), ("deployed", deployed)):
            if key in accs:
                continue
            say(f"accuracy: {runner.name} on {len(dataset)} images")
            accs[key] = evaluate(runner, dataset, 256, progress=progress, desc=runner.name)
        result["accuracy"] = {
            "dataset": dataset.name,
            "n": len(dataset),
            "fp32_top1": accs["fp32"]["top1"],
            "fp32_top5": accs["fp32"]["top5"],
            "fakequant_top1": accs["fakequant"]["top1"],
            "deployed_top1": accs["deployed"]["top1"],
            "top1_drop": (accs["fp32"]["top1"] - accs["deployed"]["top1"]) * 100.0,
            "deployed_agreement_vs_fakequant": float(
                (accs["deployed"]["predictions"] == accs["fakequant"]["predictions"]).double().mean()
            ),
        }
    say(f"latency: {fp32.name} vs {deployed.name}, batches {batches}")
    result["latency"] = latency.compare(
        fp32, deployed, held_images, batches, warmup=3, iters=25, max_seconds=15.0
    )
    return result


def _finish(
    run: _Run,
    loaded,
    scheme: str,
    target: str,
    calibration: dict,
    val: dict | None,
    lint: dict | None,
    gate_spec,
    export_res: dict,
    extra: dict | None = None,
) -> dict:
    from validation.gates import evaluate_gates
    from validation.manifest import collect_artifacts, write_manifest
    from validation.report import build_report, render_readme, write_report

    val = val or {}
    names = {
        "model.onnx": "model.onnx",
        ORT_MODEL: ORT_MODEL,
        "calib.safetensors": "calib.safetensors",
        "calib.json": "calib.json",
        "holdout.safetensors": "holdout.safetensors",
        "samples.png": "samples.png",
        "quantized": "quantized",
        "model.engine": "model.engine",
        "model.build.log": "model.build.log",
        "build_engine.sh": "build_engine.sh",
        "README.md": "README.md",
    }
    report = build_report(
        model=loaded.name,
        scheme=scheme,
        target=target,
        calibration=calibration,
        accuracy=val.get("accuracy"),
        fidelity=val.get("fidelity"),
        latency=val.get("latency"),
        lint=lint,
        gates=None,
        artifacts=None,
        op_census=val.get("op_census"),
        deployed_model=val.get("deployed_model"),
        runtime_settings=val.get("runtime_settings"),
        export={k: export_res.get(k) for k in ("opset", "weights", "scheme")},
        model_source=loaded.source,
        num_classes=loaded.num_classes,
        **(extra or {}),
    )
    report["gates"] = evaluate_gates(report, gate_spec)
    readme = render_readme(report, _preprocessing(loaded), loaded.input_size)
    from validation.manifest import atomic_write_text

    atomic_write_text(run.out / "README.md", readme)
    report["artifacts"] = collect_artifacts(run.out, names)
    write_report(run.out, report)
    artifacts = collect_artifacts(run.out, {**names, "report.json": "report.json", "report.md": "report.md"})
    command = (
        ["sardfq-export", *sys.argv[1:]]
        if Path(sys.argv[0]).name in ("sardfq-export", "__main__.py")
        else None
    )
    write_manifest(
        run.out,
        artifacts,
        command=command or [shlex.join(sys.argv)],
        settings=run.settings,
        extra={
            "stages": {
                k: {"key": v.get("key"), "seconds": v.get("seconds")} for k, v in run.state["stages"].items()
            }
        },
    )
    return report


def print_summary(report: dict, out: Path) -> None:
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
        )
    if lat:
        for b, row in lat["by_batch"].items():
            lines.append(
                f"  latency batch {b}: {row['reference']['runtime']} {row['reference']['p50_ms']:.2f} ms, "
                f"{row['deployed']['runtime']} {row['deployed']['p50_ms']:.2f} ms → {row['speedup']:.2f}×"
            )
    census = report.get("op_census")
    if census:
        lines.append(f"  ORT kernels: {census['int8_gemm']} int8 GEMMs, {census['int4_gemm']} INT4 GEMMs")
    lint = report.get("lint") or {}
    lines.append(
        f"  lint: {'passed' if lint.get('passed') else 'FAILED'}; gates: "
        f"{'passed' if gates['passed'] else 'FAILED'} ({len(gates['checks'])} checks)"
    )
    click.echo("\n".join(lines))
