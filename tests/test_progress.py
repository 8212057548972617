"""Logs people can read: progress is a tqdm bar on a terminal and plain lines (no carriage return,
at most one per interval and one at the end) when stderr is redirected; --quiet keeps the stage lines."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import pytest
from conftest import needs_reference

from sardfq_export.core import progress
from sardfq_export.core.progress import PlainProgress, progress_bar, progress_write

JOB = ["--calib", "noise", "--num-images", "8", "--range", "minmax", "--weight-range", "minmax"]
STAGE_LINE = re.compile(r"^\[\s*\d+\.\ds\] \w+")


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_tqdm_and_anything_else_plain_lines():
    from tqdm.auto import tqdm

    assert isinstance(progress_bar(range(3), file=Tty(), desc="x"), tqdm)
    assert isinstance(progress_bar(range(3), file=io.StringIO(), desc="x"), PlainProgress)
    assert isinstance(progress_bar(range(3), disable=True), tqdm)  # tqdm's own no-op


def test_plain_progress_prints_one_line_at_the_end_without_carriage_returns():
    buf = io.StringIO()
    seen = list(progress_bar(range(24), desc="sensitivity", unit="layer", leave=False, file=buf))
    assert seen == list(range(24))
    (line,) = buf.getvalue().splitlines()
    assert line.startswith("sensitivity: 24/24 layer (") and "layer/s" in line
    with progress_bar(total=10, desc="eval", unit="img", file=buf) as bar:
        bar.update(4)
        bar.set_postfix(top1="0.9000")
        bar.update(6)
    assert buf.getvalue().splitlines()[-1].endswith(") top1=0.9000")
    assert "\r" not in buf.getvalue() and len(buf.getvalue().splitlines()) == 2


def test_plain_progress_prints_at_most_every_interval(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    buf = io.StringIO()
    bar = progress_bar(total=100, desc="synthesize sardfq", file=buf)
    for _ in range(100):  # one step per second: a line at 30, 60 and 90 s, and the end
        clock[0] += 1.0
        bar.update(1)
        bar.set_postfix({"total": "1.5"}, refresh=False)
    bar.close()
    bar.close()  # once
    lines = buf.getvalue().splitlines()
    assert [ln.split(" it ")[0] for ln in lines] == [f"synthesize sardfq: {n}/100" for n in (30, 60, 90, 100)]
    assert lines[0] == "synthesize sardfq: 30/100 it (1.00 it/s, 30s, eta 1m10s) total=1.5"
    assert lines[-1] == "synthesize sardfq: 100/100 it (1.00 it/s, 1m40s) total=1.5"


def test_plain_progress_resumed_counts_and_scaled_units():
    buf = io.StringIO()
    bar = PlainProgress(
        total=3_000_000, initial=1_000_000, unit="B", unit_scale=True, desc="download", file=buf
    )
    bar.update(2_000_000 - bar.n)  # (dinov2's download sets absolute positions this way)
    bar.close()
    assert buf.getvalue().startswith("download: 2M/3M B (")
    progress_write("  pip: done", file=buf)
    assert buf.getvalue().endswith("\n  pip: done\n")


def _run(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "sardfq_export", *args], capture_output=True, env=env,
                          cwd=tmp_path, timeout=900)  # fmt: skip


@pytest.mark.slow
@needs_reference
def test_a_redirected_main_job_writes_a_short_log_without_carriage_returns(tmp_path):
    res = _run([*JOB, "--out", str(tmp_path / "o")], tmp_path)
    err = res.stderr
    assert res.returncode == 0, err.decode()[-3000:]
    assert b"\r" not in err and len(err) < 3000, err.decode()
    text = err.decode()
    for stage in ("synthesize", "quantize", "export", "validate"):
        assert re.search(rf"^\[\s*\d+\.\ds\] {stage}: done", text, re.M), text
    assert re.search(r"^sensitivity: 24/24 layer \(", text, re.M)  # progress, as one plain line


@pytest.mark.slow
@needs_reference
def test_quiet_keeps_the_stage_lines_and_drops_progress(tmp_path):
    res = _run([*JOB, "--out", str(tmp_path / "o"), "--quiet"], tmp_path)
    text = res.stderr.decode()
    assert res.returncode == 0, text[-3000:]
    lines = text.strip().splitlines()
    assert lines and all(STAGE_LINE.match(ln) for ln in lines), text  # only stage lines, no progress
    for stage in ("synthesize", "quantize", "export", "validate"):
        assert any(f"] {stage}: running" in ln for ln in lines) and any(
            f"] {stage}: done" in ln for ln in lines
        )
