"""Fault injection (issue 14): no lost or mixed work.

SIGKILL or SIGTERM inside each stage then ``--resume`` (bit-identical artifacts, consistent manifest), a
second job into the same ``--out`` (exit 2 naming the holder), SIGTERM (exit 143, checkpoint
kept, resume bit-exact), a full disk (one line, nothing partial, ``--resume`` completes), bad or
unwritable ``--out`` and corrupt files of our own (one line, exit 2, nothing left behind).

Jobs run on the embedded reference model with ``--calib noise`` and min-max ranges. Killed jobs
are real processes (``python -m sardfq_export``); those that must reach the validate stage start
through a two-line shim that only shortens the latency measurement (warm-up and repeats), so the
module stays within a few minutes on two cores. Everything runs on one torch thread.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import needs_reference, tiny_vit

from sardfq_export.cli import Terminated, main, sigterm_raises
from sardfq_export.core.calibset import CalibSet
from sardfq_export.core.errors import UserInputError
from sardfq_export.core.io import (
    LOCK_NAME,
    OutputLockedError,
    claim_output,
    hold_lock,
    is_temp_name,
    preflight_output,
    sha256_file,
)
from sardfq_export.jobcache import STATE_FILE

pytestmark = needs_reference

JOB = ["--calib", "noise", "--num-images", "8", "--range", "minmax", "--weight-range", "minmax"]
# Artifacts that depend only on the inputs, compared byte for byte (report.json's latencies do not;
# the calibration sets' metadata holds their wall time, so their tensors are compared instead).
DETERMINISTIC = ("quantized/state.safetensors", "model.onnx")
CALIB_SETS = ("calib.safetensors", "holdout.safetensors")
FAST_LATENCY = (
    "import sys\n"
    "from sardfq_export.validation import latency\n"
    "_compare = latency.compare\n"
    "latency.compare = lambda r, d, s, b, **k: _compare(r, d, s, (1,), warmup=0, iters=2, max_seconds=0.0)\n"
    "import os, time\n"
    "from sardfq_export import jobcache\n"
    "_stage, _hold = jobcache.StageCache.stage, os.environ.get('HOLD_STAGE')\n"
    "def _held(compute, self, name):\n"
    "    value = compute()\n"
    "    self.say(f'{name}: held')\n"
    "    time.sleep(600)\n"
    "    return value\n"
    "def stage(self, name, key, compute, *a, **k):\n"
    "    return _stage(self, name, key, (lambda: _held(compute, self, name)) if name == _hold else compute, *a, **k)\n"
    "jobcache.StageCache.stage = stage\n"
    "from sardfq_export.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


# stderr is a pipe here, so progress is plain lines every 30 s (core.progress): this prints one per
# step, for the tests that wait for a loop to move.
STEP_PROGRESS = (
    "import sys\n"
    "from sardfq_export.core import progress\n"
    "progress.PLAIN_INTERVAL_S = 0.0\n"
    "from sardfq_export.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


class Proc:
    """A ``sardfq-export`` process whose stderr is collected as it comes (for timing kills)."""

    def __init__(
        self, args: list[str], *, shim: bool = False, hold: str | None = None, step_progress: bool = False
    ):
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        if hold:  # the shim holds that stage once its work is done, before it is marked done
            env["HOLD_STAGE"] = hold
        head = [sys.executable, "-m", "sardfq_export"]
        if shim or step_progress:
            head = [sys.executable, "-c", FAST_LATENCY if shim else STEP_PROGRESS]
        self.p = subprocess.Popen(
            [*head, *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
        )
        self.pid = self.p.pid
        self._chunks: list[bytes] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while chunk := os.read(self.p.stderr.fileno(), 65536):
            self._chunks.append(chunk)

    @property
    def err(self) -> str:
        return b"".join(self._chunks).decode(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.err):
            if self.p.poll() is not None or time.monotonic() > deadline:
                self.p.kill()
                raise AssertionError(f"never saw {pattern!r} (exit {self.p.poll()}):\n{self.err[-3000:]}")
            time.sleep(0.02)

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def finish(self, timeout: float = 300.0) -> int:
        try:
            code = self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            raise
        self._reader.join(10)
        return code


def _error_lines(text: str) -> list[str]:
    assert "Traceback" not in text, text
    return [ln for ln in text.splitlines() if ln.startswith("error:")]


def _not_stage_lines(text: str) -> list[str]:
    """stderr without the main job's stage lines (``[  1.7s] quantize: running``; --quiet keeps them)."""
    return [ln for ln in text.strip().splitlines() if not re.match(r"\[\s*\d+\.\ds\] ", ln)]


def _leftovers(root: Path) -> list[str]:
    """Temporaries and locks: what an interrupted or failed run must not leave."""
    return sorted(str(p) for p in root.rglob(".*") if is_temp_name(p.name) or p.name.endswith(LOCK_NAME))


def _digests(out: Path) -> dict[str, str]:
    """sha256 of the deterministic artifacts, and of the calibration sets' tensors."""
    from safetensors.torch import load_file

    digests = {name: sha256_file(out / name) for name in DETERMINISTIC}
    for name in CALIB_SETS:
        tensors = load_file(out / name)
        h = hashlib.sha256()
        for key in sorted(tensors):
            h.update(key.encode() + tensors[key].contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        digests[name] = h.hexdigest()
    return digests


def _assert_manifest_consistent(out: Path) -> None:
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["artifacts"], manifest
    for name, entry in manifest["artifacts"].items():
        path = out / entry["path"]
        assert path.is_file(), name
        assert sha256_file(path) == entry["sha256"] and path.stat().st_size == entry["bytes"], name
    for name in ("model.onnx", "calib.safetensors", "quantized/state.safetensors"):
        assert name in manifest["artifacts"], name


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread here and in every process started: on a shared, busy machine two spinning
    OpenMP threads per process are many times slower, and in-process and spawned runs must match."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    """One uninterrupted job (the reference for every resumed one)."""
    out = tmp_path_factory.mktemp("base") / "B"
    job = Proc([*JOB, "--out", out], shim=True)
    assert job.finish() == 0, job.err[-3000:]
    return out


@pytest.fixture
def fast_latency(monkeypatch):
    """In-process jobs: the same shortened latency measurement as the shimmed processes."""
    from sardfq_export.validation import latency

    compare = latency.compare
    monkeypatch.setattr(
        latency, "compare", lambda r, d, s, b, **k: compare(r, d, s, (1,), warmup=0, iters=2, max_seconds=0.0)
    )


# --- pre-flight checks and the lock ----------------------------------------------------------------


@pytest.mark.parametrize("case", ["proc", "parent_is_file", "no_space", "synthesize_proc", "unwritable"])
def test_unusable_out_is_refused_before_any_work(case, tmp_path, capsys, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("x")
    out = {"proc": "/proc/sardfq-test/out", "parent_is_file": str(afile / "sub"),
           "no_space": str(tmp_path / "new" / "deep"), "unwritable": str(tmp_path / "ro")}.get(case)  # fmt: skip
    more = ["--min-free-mb", str(10**12)] if case == "no_space" else []  # more than any disk has free
    if case == "unwritable":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        (tmp_path / "ro").mkdir(mode=0o500)
    args = (
        ["synthesize", "--out", "/proc/sardfq-test/c.safetensors"]
        if case == "synthesize_proc"
        else [*JOB, "--out", out]
    )
    assert main([*args, *more, "--quiet"]) == 2
    err = capsys.readouterr().err
    (line,) = _error_lines(err)
    assert _not_stage_lines(err) == [line] and line.startswith("error: --out ")
    assert {"proc": "cannot create", "parent_is_file": "is a file, not a folder", "no_space": "MB free",
            "synthesize_proc": "cannot create", "unwritable": "not writable"}[case] in line  # fmt: skip
    assert not (tmp_path / "new").exists()  # nothing created


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "lots"])
@pytest.mark.parametrize("command", ["job", "synthesize"])
def test_min_free_mb_is_range_checked_before_any_work(command, value, tmp_path, capsys):
    out = tmp_path / "new" / ("o" if command == "job" else "c.safetensors")
    args = [*JOB, "--out", str(out)] if command == "job" else ["synthesize", "--out", str(out)]
    assert main([*args, "--min-free-mb", value, "--quiet"]) == 2
    err = capsys.readouterr().err
    (line,) = _error_lines(err)
    assert _not_stage_lines(err) == [line] and "Traceback" not in err
    # click's range/type check, or the library's (nan, inf pass click's FloatRange)
    assert "Invalid value for '--min-free-mb'" in line or "--min-free-mb (MB that must be free" in line, line
    assert not (tmp_path / "new").exists()  # refused before anything was created


def test_min_free_mb_sets_the_floor_and_the_env_switch_is_gone(tmp_path, monkeypatch):
    free_mb = shutil.disk_usage(tmp_path).free / 1e6
    with pytest.raises(UserInputError, match=r"MB free on that disk.*--min-free-mb"):
        preflight_output(tmp_path / "a", folder=True, min_free_mb=free_mb * 10)
    assert not (tmp_path / "a").exists()
    preflight_output(tmp_path / "b", folder=True, min_free_mb=0)  # 0: no free-space check
    monkeypatch.setenv("SARDFQ_MIN_FREE_MB", str(10**12))  # no process-global switch (STYLE.md)
    preflight_output(tmp_path / "c", folder=True)
    assert (tmp_path / "b").is_dir() and (tmp_path / "c").is_dir()


def test_lock_names_its_holder_and_a_dead_holder_is_taken_over(tmp_path):
    out = tmp_path / "o"
    with claim_output(out, folder=True):
        assert (out / LOCK_NAME).is_file()
        host = re.escape(socket.gethostname())
        with pytest.raises(OutputLockedError, match=rf"in use .*\(pid {os.getpid()} on {host}, started "):
            with hold_lock(out, folder=True):
                pass
    assert not out.exists()  # released, and the folder it created was left empty: removed

    out.mkdir()
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom sardfq_export.core.io import hold_lock\n"
         "with hold_lock(sys.argv[1], folder=True):\n    print('held', flush=True)\n    time.sleep(120)\n", str(out)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(OutputLockedError, match=f"pid {child.pid} "):
            with hold_lock(out, folder=True):
                pass
    finally:
        child.kill()
        child.wait()
    assert (out / LOCK_NAME).exists()  # SIGKILL: the file stays, the kernel dropped the lock
    notes: list[str] = []
    with hold_lock(out, folder=True, say=notes.append):
        pass
    assert len(notes) == 1 and f"pid {child.pid} " in notes[0] and "no longer running" in notes[0]


def test_a_second_synthesize_into_the_same_file_exits_2_naming_the_first(tmp_path, capsys):
    """Two ``synthesize`` runs to one file silently replaced each other; the second is refused before
    any work (the lock beside the file), a file next to it is not locked."""
    target = tmp_path / "c.safetensors"
    with hold_lock(target, folder=False):  # what a running synthesize holds
        assert main(["synthesize", "--out", str(target), "--num-images", "1", "--iters", "1", "--quiet"]) == 2
        (line,) = _error_lines(capsys.readouterr().err)
        assert "in use by another sardfq-export job" in line and f"pid {os.getpid()} " in line
        assert str(target) in line and not target.exists()
        other = tmp_path / "d.safetensors"
        with claim_output(other, folder=False):
            pass


def test_two_real_synthesize_processes_into_one_file_the_second_is_refused(tmp_path):
    """The issue's case with two real processes: the second one used to run (and replace the file)."""
    target = tmp_path / "c.safetensors"
    first = Proc(["synthesize", "--out", target, "--num-images", "2", "--iters", "5000"], step_progress=True)
    try:
        first.wait_for(r"synthesize sardfq: [1-9]")  # the first is optimizing
        second = subprocess.run(
            [sys.executable, "-m", "sardfq_export", "synthesize", "--out", str(target), "--num-images", "2",
             "--iters", "2", "--quiet"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert second.returncode == 2, second.stderr[-2000:]
        (line,) = _error_lines(second.stderr)
        assert f"pid {first.pid} " in line and "in use" in line and not target.exists()
        assert first.p.poll() is None
    finally:
        first.p.kill()
        first.p.wait()


def test_temporary_names_are_unique_per_process_and_artifacts_are_0644(tmp_path):
    """``<name>.tmp`` was shared by every process; mkstemp's files were 0600 (model.onnx was too)."""
    from sardfq_export.core import io

    a, b = io._make_temp(tmp_path / "model.onnx"), io._make_temp(tmp_path / "model.onnx")
    assert a != b and all(is_temp_name(p.name) and f".{os.getpid()}." in p.name for p in (a, b))
    child = subprocess.run(
        [sys.executable, "-c", "import sys; from pathlib import Path; from sardfq_export.core import io; "
         "print(io._make_temp(Path(sys.argv[1]) / 'model.onnx').name)", str(tmp_path)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert child.stdout.strip() not in (a.name, b.name) and ".model.onnx." in child.stdout
    old = os.umask(0o077)  # even under a strict umask: artifacts are for other people
    try:
        f = io.atomic_write_bytes(tmp_path / "model.onnx", b"x")
        with io.atomic_dir(tmp_path / "quantized") as d:
            (d / "state.safetensors").write_bytes(b"y")
    finally:
        os.umask(old)
    assert f.stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "quantized" / "state.safetensors").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "quantized").stat().st_mode & 0o777 == 0o755


def test_the_manifest_records_the_installed_version_not_null(monkeypatch):
    """Run from a checkout the manifest said ``"sardfq-export": null``."""
    from importlib import metadata

    from sardfq_export.validation import manifest

    from sardfq_export import __version__

    assert manifest.tool_versions()["sardfq-export"] == __version__ and __version__
    # A checkout on PYTHONPATH has no installed metadata: the version comes from the package itself.
    real = metadata.version

    def uninstalled(name):
        if name == "sardfq-export":
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(manifest.metadata, "version", uninstalled)
    assert manifest.tool_versions()["sardfq-export"] == __version__


def test_second_job_exits_2_naming_the_first_and_sigterm_saves_the_checkpoint(tmp_path):
    out = tmp_path / "J"
    first = Proc(
        ["--calib", "sardfq", "--iters", "5000", "--num-images", "2", "--out", out], step_progress=True
    )
    try:
        first.wait_for(r"synthesize sardfq: [1-9]")  # the optimization loop is running
        # The same settings as the first: before the lock, such a job was accepted and both wrote
        # into one folder (a job with other settings was already refused by the state file).
        second = subprocess.run(
            [sys.executable, "-m", "sardfq_export", "--calib", "sardfq", "--iters", "5000", "--num-images", "2",
             "--out", str(out), "--quiet"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert second.returncode == 2, second.stderr
        (line,) = _error_lines(second.stderr)
        assert f"pid {first.pid} on {socket.gethostname()}, started " in line and "in use" in line
        assert first.p.poll() is None
        first.signal(signal.SIGTERM)
        assert first.finish(120) == 143
    finally:
        if first.p.poll() is None:
            first.p.kill()
    assert "terminated: finished artifacts are kept; re-run with --resume" in first.err
    assert "Traceback" not in first.err
    assert (out / "synth.safetensors.ckpt").is_file()  # saved at the end of the iteration
    assert _leftovers(out) == []


# --- SIGKILL at stage points, then --resume ---------------------------------------------------------


def test_killed_at_each_stage_then_resume_gives_the_same_artifacts(baseline, tmp_path):
    out = tmp_path / "K"
    args = [*JOB, "--out", out]
    previous = None
    # Each kill lands inside its stage (held after its files are written, before it is marked done):
    # the stages take a fraction of a second here, so a timed kill could land after the job ended.
    for stage, sig in (
        ("quantize", signal.SIGKILL),
        ("export", signal.SIGTERM),
        ("validate", signal.SIGKILL),
    ):
        job = Proc([*args, "--resume"], shim=True, hold=stage)
        job.wait_for(rf"{stage}: held")
        job.signal(sig)
        if sig == signal.SIGKILL:
            assert job.finish() == -signal.SIGKILL
            assert (out / LOCK_NAME).is_file()  # killed outright: nothing cleaned up
        else:
            assert job.finish() == 143
            assert "terminated: finished artifacts are kept; re-run with --resume" in job.err
            assert "Traceback" not in job.err and _leftovers(out) == []
        assert (out / STATE_FILE).is_file()
        if previous is not None:
            assert "synthesize: up to date" in job.err
        if previous == signal.SIGKILL:
            assert "taking over the lock" in job.err and "no longer running" in job.err
        previous = sig
    # what a kill in the middle of a write leaves (our temporaries and safetensors' own)
    dead = _dead_pid()
    planted = [
        out / f".model.onnx.{dead}.abcd1234.tmp",
        out / ".tmpAb12Cd",
        out / f".quantized.{dead}.x1y2z3.tmp",
    ]
    planted[0].write_bytes(b"partial")
    planted[1].write_bytes(b"partial")
    planted[2].mkdir()
    (planted[2] / "state.safetensors").write_bytes(b"partial")
    job = Proc([*args, "--resume"], shim=True)
    assert job.finish() == 0, job.err[-3000:]
    assert "export: up to date" in job.err and "validate: done" in job.err
    assert "removed 3 temporary file(s)" in job.err
    assert _digests(out) == _digests(baseline)
    _assert_manifest_consistent(out)
    assert _leftovers(out) == []


# --- SIGTERM during synthesis ------------------------------------------------------------------------


def test_sigterm_in_synthesis_saves_at_the_iteration_end_and_resume_is_bit_exact(tmp_path):
    from sardfq_export.models import LoadedModel
    from sardfq_export.synthesis import SynthConfig, checkpoint_path, synthesize

    model = tiny_vit()
    data_config = {"input_size": (3, 32, 32), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    loaded = LoadedModel(model, "tiny", data_config, "vit", "random-init")
    cfg = SynthConfig(method="sardfq", num_images=4, batch_size=2, iters=6)
    full = synthesize(loaded, cfg, tmp_path / "a.safetensors", progress=False, checkpoint_every=2)

    def terminate(batch, it):
        if (batch, it) == (1, 3):
            os.kill(os.getpid(), signal.SIGTERM)

    out = tmp_path / "b.safetensors"
    before = signal.getsignal(signal.SIGTERM)
    with sigterm_raises(), pytest.raises(Terminated):
        synthesize(loaded, cfg, out, progress=False, checkpoint_every=2, callback=terminate)
    assert signal.getsignal(signal.SIGTERM) is before
    from safetensors import safe_open

    with safe_open(str(checkpoint_path(out)), "pt") as fh:
        state = json.loads(fh.metadata()["state"])
    assert (state["batch"], state["iteration"]) == (1, 3) and not out.exists()
    resumed = synthesize(loaded, cfg, out, progress=False, checkpoint_every=2, resume=True)
    assert torch.equal(resumed.images, full.images)
    assert resumed.meta["loss_curve"] == full.meta["loss_curve"]


def test_sigterm_without_a_handler_ends_the_process_after_the_checkpoint(tmp_path):
    """API use (no CLI): SIGTERM keeps its default action, once the iteration's checkpoint is saved."""
    script = (
        "import os, signal, sys, timm\n"
        "from sardfq_export.models import LoadedModel\n"
        "from sardfq_export.synthesis import SynthConfig, synthesize\n"
        "m = timm.create_model('deit_tiny_patch16_224', pretrained=False, img_size=32, patch_size=8, depth=2,\n"
        "                      embed_dim=64, num_heads=2, num_classes=10).eval()\n"
        "cfg = {'input_size': (3, 32, 32), 'mean': (0.5,) * 3, 'std': (0.5,) * 3}\n"
        "loaded = LoadedModel(m, 'tiny', cfg, 'vit', 'random-init')\n"
        "def cb(b, it):\n"
        "    if it == 2:\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "synthesize(loaded, SynthConfig(num_images=2, iters=5), sys.argv[1], progress=False, callback=cb)\n"
        "print('not reached', flush=True)\n"
    )
    out = tmp_path / "s.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, "-c", script, str(out)], capture_output=True, text=True, env=env, timeout=300
    )
    assert res.returncode == -signal.SIGTERM, res.stderr[-3000:]
    assert "not reached" not in res.stdout
    from safetensors import safe_open

    from sardfq_export.synthesis import checkpoint_path

    with safe_open(str(checkpoint_path(out)), "pt") as fh:
        assert json.loads(fh.metadata()["state"])["iteration"] == 2


def test_sigterm_synthesize_command_exits_143_then_resume_matches_an_uninterrupted_run(tmp_path, capsys):
    args = ["synthesize", "--num-images", "4", "--batch-size", "2", "--iters", "60", "--seed", "3",
            "--no-samples", "--checkpoint-every", "1000", "--device", "cpu"]  # fmt: skip
    out = tmp_path / "t.safetensors"
    job = Proc([*args, "--out", out], step_progress=True)
    job.wait_for(r": [1-9]\d*/120 it ")  # the loop has made progress
    job.signal(signal.SIGTERM)
    assert job.finish(120) == 143, job.err[-3000:]
    assert "terminated: finished artifacts are kept; re-run with --resume" in job.err
    assert "Traceback" not in job.err
    assert (tmp_path / "t.safetensors.ckpt").is_file() and not out.exists()
    assert _leftovers(tmp_path) == []
    assert main([*args, "--out", str(out), "--quiet"]) == 2  # refused without --resume / --overwrite
    assert main([*args, "--out", str(out), "--resume", "--quiet"]) == 0
    assert main([*args, "--out", str(tmp_path / "u.safetensors"), "--quiet"]) == 0
    resumed, straight = CalibSet.load(out), CalibSet.load(tmp_path / "u.safetensors")
    for key in ("images", "targets", "labels"):
        assert torch.equal(getattr(resumed, key), getattr(straight, key)), key
    assert resumed.meta["loss_curve"] == straight.meta["loss_curve"]
    assert not (tmp_path / "t.safetensors.ckpt").exists()


# --- a full disk -------------------------------------------------------------------------------------


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_disk_full_at_each_write_is_one_line_and_resume_completes(
    baseline, tmp_path, capsys, monkeypatch, fast_latency
):
    import safetensors.torch
    from safetensors import SafetensorError

    from sardfq_export.core import io

    target = {"name": None}
    real_save, real_temp = safetensors.torch.save_file, io._make_temp

    def save_file(tensors, filename, metadata=None):  # safetensors' Rust writer, as it reports ENOSPC
        if target["name"] and target["name"] in str(filename):
            Path(filename).write_bytes(b"partial")
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_save(tensors, filename, metadata=metadata)

    def make_temp(path):  # Python writers (onnx.save, JSON): a temporary that is the full device
        tmp = real_temp(path)
        if target["name"] and path.name == target["name"]:
            tmp.unlink()
            tmp.symlink_to("/dev/full")
        return tmp

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    monkeypatch.setattr(io, "_make_temp", make_temp)
    out = tmp_path / "F"
    args = [*JOB, "--out", str(out), "--resume", "--quiet"]
    for name, shown in (("calib.safetensors", "calib.safetensors"), ("state.safetensors", "quantized"),
                        ("model.onnx", "model.onnx"), ("report.json", "report.json")):  # fmt: skip
        target["name"] = name
        assert main(args) == 2, name
        err = capsys.readouterr().err
        (line,) = _error_lines(err)
        assert _not_stage_lines(err) == [line]
        assert f"no space left on the device while writing {out / shown} (" in line
        assert line.endswith("free space, then re-run with --resume (finished artifacts are kept)")
        assert _leftovers(out) == [] and (out / STATE_FILE).is_file()
    target["name"] = None
    assert main(args) == 0
    _assert_manifest_consistent(out)
    assert _digests(out) == _digests(baseline)
    assert _leftovers(out) == []


def test_disk_full_oserror_outside_an_atomic_write_is_one_line(monkeypatch, capsys, tmp_path):
    from sardfq_export import job

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(job, "_run_locked", full)
    assert main([*JOB, "--out", str(tmp_path / "o"), "--quiet"]) == 2
    (line,) = _error_lines(capsys.readouterr().err)
    assert "no space left on the device" in line and "--resume" in line


# --- bad input and corrupt files ----------------------------------------------------------------------


def test_a_run_refused_on_bad_input_leaves_no_state(tmp_path, capsys):
    from sardfq_export.jobcache import StageCache

    out = tmp_path / "o"
    assert main(["--calib", "no-such-method", "--out", str(out), "--quiet"]) == 2
    assert len(_error_lines(capsys.readouterr().err)) == 1
    assert not out.exists()
    out.mkdir()
    assert main(["--calib", "no-such-method", "--out", str(out), "--quiet"]) == 2
    assert list(out.iterdir()) == []
    StageCache(out, {"calib": "noise"}, overwrite=False, say=print)  # the corrected run is accepted


# Well-formed JSON of the wrong shape is what gave tracebacks (AttributeError, KeyError) before.
WRONG_SHAPE = {
    "state_list": (STATE_FILE, "[]"),
    "state_fields": (STATE_FILE, '{"format": "sardfq-state-1", "settings": 3, "stages": 7}'),
    "quantized_list": ("quantized/quantized.json", "[]"),
    "quantized_no_scheme": ("quantized/quantized.json", '{"format": "sardfq-quantized-1"}'),
}


@pytest.mark.parametrize(
    "damage", ["state", "quantized_json", "truncated_calib", "truncated_onnx", *WRONG_SHAPE]
)
def test_a_corrupt_file_of_ours_is_one_line_naming_it(damage, baseline, tmp_path, capsys):
    out = tmp_path / "C"
    shutil.copytree(baseline, out)
    if damage == "state":
        (out / STATE_FILE).write_text('{"format": "sardfq-state-1", "settings": ')
        name, hint = STATE_FILE, "--overwrite"
    elif damage == "quantized_json":
        (out / "quantized" / "quantized.json").write_text("{not json")
        name, hint = "quantized.json", "delete it"
    elif damage in WRONG_SHAPE:
        rel, text = WRONG_SHAPE[damage]
        (out / rel).write_text(text)
        name, hint = Path(rel).name, ""
    else:
        name, hint = ("calib.safetensors" if damage == "truncated_calib" else "model.onnx"), "delete it"
        path = out / name
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert main([*JOB, "--out", str(out), "--resume", "--quiet"]) == 2
    err = capsys.readouterr().err
    (line,) = _error_lines(err)
    assert _not_stage_lines(err) == [line] and name in line and hint in line
    assert _leftovers(out) == []


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_disk_full_through_the_public_writer_is_one_line_without_temporaries(tmp_path, capsys, monkeypatch):
    """model.onnx's temporary is /dev/full. Written against ``tempfile.mkstemp`` (what the atomic
    writer calls before and after issue 14), so it shows the old traceback: ENOSPC escaped main()."""
    import tempfile

    real = tempfile.mkstemp

    def mkstemp(*a, **k):
        fd, path = real(*a, **k)
        if Path(path).name.startswith(".model.onnx."):
            os.close(fd)
            os.unlink(path)
            os.symlink("/dev/full", path)
            fd = os.open(os.devnull, os.O_RDONLY)
        return fd, path

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    out = tmp_path / "F"
    assert main([*JOB, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    (line,) = _error_lines(err)
    assert "Traceback" not in err and "no space left" in line.lower() and "--resume" in line, line
    assert _leftovers(out) == []
