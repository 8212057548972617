"""Atomic file output, output-folder checks and the output lock: how every stage writes.

A file is written under a unique temporary name beside its destination (``.NAME.PID.RANDOM.tmp``:
two processes never share one), made world-readable like any normal output (``mkstemp`` creates
0600), then renamed over the destination; on any error the temporary file is removed. A
half-written file therefore never looks done, and nothing is left behind. A process killed
outright (SIGKILL, power loss) cannot clean up: :func:`claim_output` removes such leftovers of
dead processes the next time the output is claimed.

A full disk (ENOSPC / EDQUOT, also as reported by safetensors' Rust writer) while writing an
artifact becomes :class:`DiskFullError`: one line naming the file, exit 2.

:func:`claim_output` is what a command does before any work: it checks that ``--out`` can be
created and written and that the disk has room (``--min-free-mb``, default 200 MB; one line, exit 2,
otherwise), then holds an
exclusive ``fcntl.flock`` lock on it (``DIR/.sardfq-lock`` for a folder, ``.NAME.sardfq-lock``
beside a file) until the command ends. The kernel drops the lock when its process dies, so a
lock left by a killed process is simply taken over; the lock file records pid, host and start
time so that a second job can say who holds it.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from sardfq_export.core.errors import UserInputError

FILE_MODE = 0o644
LOCK_NAME = ".sardfq-lock"
MIN_FREE_MB = 200.0  # the pre-flight floor (MB free on --out's disk); --min-free-mb sets another
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# safetensors (Rust) reports I/O errors as text: "... I/O error: No space left on device (os error 28)"
_DISK_FULL_TEXT = re.compile(
    rf"os error ({'|'.join(str(e) for e in DISK_FULL_ERRNOS)})\b|No space left on device|Disk quota exceeded"
)
# Our temporaries (atomic_path / atomic_dir / the pre-flight probe): .NAME.PID.RANDOM.tmp
_OUR_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[A-Za-z0-9_]+\.tmp$")
# safetensors' own temporary (Rust tempfile::NamedTempFile) beside the file it writes: .tmpXXXXXX
_RUST_TEMP = re.compile(r"^\.tmp[A-Za-z0-9]{6}$")


class DiskFullError(UserInputError):
    """The disk (or quota) filled up while writing ``path``; the temporary file was removed."""

    def __init__(self, path: str | Path, free_bytes: int | None = None):
        self.path = Path(path)
        self.free_bytes = free_bytes
        super().__init__(self.describe())

    def describe(self, rerun: str = "re-run with --resume") -> str:
        free = f" ({self.free_bytes / 1e6:.0f} MB free there)" if self.free_bytes is not None else ""
        return (
            f"no space left on the device while writing {self.path}{free}: free space, then {rerun} "
            "(finished artifacts are kept)"
        )


class OutputLockedError(UserInputError):
    """Another job holds the output's lock; the message names it (pid, host, start time)."""


def is_disk_full(exc: BaseException) -> bool:
    """True for ENOSPC / EDQUOT, raised as OSError or reported in a writer's message (safetensors)."""
    if isinstance(exc, DiskFullError):
        return True
    if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
        return True
    return isinstance(exc, Exception) and bool(_DISK_FULL_TEXT.search(str(exc)))


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


@contextmanager
def _disk_full_names(path: Path) -> Iterator[None]:
    """Turn a full disk while writing ``path`` into :class:`DiskFullError` (one line, exit 2)."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as exc:
        if is_disk_full(exc):
            raise DiskFullError(path, _free_bytes(path.parent)) from exc
        raise


def _make_temp(path: Path) -> Path:
    """A new empty temporary file beside ``path`` (tests replace this to inject faults)."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(name)


def _make_temp_dir(path: Path, tag: str = "") -> Path:
    """A new empty temporary folder beside ``path`` (tests replace this to inject faults)."""
    return Path(tempfile.mkdtemp(prefix=f".{path.name}{tag}.{os.getpid()}.", suffix=".tmp", dir=path.parent))


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a unique temporary path beside ``path``; renamed onto ``path`` when the block succeeds."""
    path = Path(path)
    with _disk_full_names(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _make_temp(path)
    try:
        with _disk_full_names(path):
            yield tmp
            os.chmod(tmp, FILE_MODE)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a unique temporary folder beside ``path``; it replaces ``path`` when the block succeeds."""
    path = Path(path)
    with _disk_full_names(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _make_temp_dir(path)
    try:
        with _disk_full_names(path):
            yield tmp
            os.chmod(tmp, 0o755)
            for f in tmp.rglob("*"):
                if f.is_file():
                    os.chmod(f, FILE_MODE)
        if path.exists():
            old = _make_temp_dir(path, ".old")
            os.replace(path, old / path.name)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old / path.name, path)  # never leave the destination missing
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


# --- pre-flight checks and the output lock --------------------------------------------------------


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_temp_name(name: str) -> bool:
    """A temporary file/folder name of ours (or safetensors'): never an artifact."""
    return bool(_OUR_TEMP.match(name) or _RUST_TEMP.match(name))


def sweep_stale_temps(folder: str | Path, names: Callable[[str], bool] | None = None) -> list[Path]:
    """Remove the temporaries that dead processes left in ``folder`` (a SIGKILL cannot clean up).

    Ours carry their writer's pid and are removed only when it no longer runs here; safetensors'
    own ``.tmpXXXXXX`` carry none and are removed only when ``names`` is None (the caller holds
    the whole folder's lock). ``names(name)`` limits the sweep to temporaries of those artifacts.
    """
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _OUR_TEMP.match(p.name)
        if m:
            stale = not pid_alive(int(m["pid"])) and (names is None or names(m["name"]))
        else:
            stale = names is None and bool(_RUST_TEMP.match(p.name))
        if not stale:
            continue
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed


def check_min_free_mb(value) -> float:
    """``--min-free-mb`` as a float ≥ 0 (0: no free-space check), or a one-line UserInputError."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not (0 <= value < float("inf")):
        raise UserInputError(
            f"--min-free-mb (MB that must be free on --out's disk) must be ≥ 0, got {value!r}"
        )
    return float(value)


def preflight_output(
    target: str | Path, *, folder: bool, option: str = "--out", min_free_mb: float = MIN_FREE_MB
) -> list[Path]:
    """Check, before any work, that ``target`` can be written and its disk has ``min_free_mb`` free.

    ``folder``: ``target`` is a folder (created here) rather than a file (whose folder is created
    here). Returns the folders this call created (innermost last), for :func:`claim_output` to
    remove again if they stay empty. One-line :class:`UserInputError` otherwise.
    """
    need = check_min_free_mb(min_free_mb) * 1e6
    target = Path(target).expanduser()
    where = target if folder else target.parent
    if folder and target.exists() and not target.is_dir():
        raise UserInputError(f"{option} {target} is a file, not a folder: choose another {option}")
    if not folder and target.is_dir():
        raise UserInputError(
            f"{option} {target} is a folder: give a file name (e.g. {target}/calib.safetensors)"
        )
    existing = where
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise UserInputError(
            f"{option} {target}: {existing} is a file, not a folder: choose another {option}"
        )
    missing = []
    p = where
    while p != existing:
        missing.append(p)
        p = p.parent
    created: list[Path] = []
    try:
        for p in reversed(missing):
            p.mkdir()
            created.append(p)
    except OSError as exc:
        _remove_empty(created)
        raise UserInputError(
            f"{option} {target}: cannot create {p} ({exc.strerror or exc}): choose a writable {option}"
        ) from None
    try:
        probe = _make_temp(where / "sardfq-probe")
        probe.unlink()
    except OSError as exc:
        _remove_empty(created)
        raise UserInputError(
            f"{option} {target}: {where} is not writable ({exc.strerror or exc}): choose another {option}"
        ) from None
    free = _free_bytes(where)
    if free is not None and free < need:
        _remove_empty(created)
        raise UserInputError(
            f"{option} {target}: only {free / 1e6:.0f} MB free on that disk, sardfq-export needs at least "
            f"{need / 1e6:.0f} MB (--min-free-mb): free space or choose another {option}"
        )
    return created


def _remove_empty(created: list[Path]) -> None:
    for p in reversed(created):
        try:
            p.rmdir()
        except OSError:
            break


def lock_path(target: str | Path, *, folder: bool) -> Path:
    target = Path(target).expanduser()
    return target / LOCK_NAME if folder else target.parent / f".{target.name}{LOCK_NAME}"


def _read_holder(path: Path, fd: int | None = None, tries: int = 10) -> dict:
    """The holder record in a lock file ({} when empty or unreadable)."""
    for _ in range(tries):
        try:
            if fd is not None:
                raw = os.pread(fd, 65536, 0)
            else:
                raw = path.read_bytes()
            if raw.strip():
                rec = json.loads(raw)
                return rec if isinstance(rec, dict) else {}
        except (OSError, ValueError):
            pass
        if fd is not None:
            break
        time.sleep(0.05)  # the holder writes its record right after taking the lock
    return {}


def _describe_holder(rec: dict) -> str:
    if not rec.get("pid"):
        return "an unknown process"
    return f"pid {rec['pid']} on {rec.get('host', '?')}, started {rec.get('started', '?')}"


_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


@contextmanager
def hold_lock(target: str | Path, *, folder: bool, option: str = "--out",
              say: Callable[[str], None] | None = None) -> Iterator[Path]:  # fmt: skip
    """Hold the exclusive lock of ``target`` for the block; :class:`OutputLockedError` if another job has it."""
    say = say or (lambda _m: None)
    target = Path(target).expanduser()
    path = lock_path(target, folder=folder)
    host = socket.gethostname()
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = _read_holder(path)
            raise OutputLockedError(
                f"{option} {target} is in use by another sardfq-export job ({_describe_holder(holder)}; "
                f"lock {path}): wait for it to finish or choose another {option}"
            ) from None
        except OSError as exc:
            if exc.errno not in _NO_FLOCK:
                os.close(fd)
                raise
            # No flock on this file system: fall back to the recorded pid (same host only).
            holder = _read_holder(path, fd)
            pid = holder.get("pid")
            if pid and pid != os.getpid() and (holder.get("host") != host or pid_alive(int(pid))):
                os.close(fd)
                raise OutputLockedError(
                    f"{option} {target} is in use by another sardfq-export job ({_describe_holder(holder)}; "
                    f"lock {path}, no flock here: delete it if that job is gone)"
                ) from None
        try:  # the file we locked must still be the one at ``path`` (a releaser unlinks it)
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        previous = _read_holder(path, fd)
        if previous.get("pid") and previous.get("pid") != os.getpid():
            alive = previous.get("host") == host and pid_alive(int(previous["pid"]))
            say(
                f"note: taking over the lock of {_describe_holder(previous)}"
                + (", which no longer holds it" if alive else ", which is no longer running")
            )
        record = {"pid": os.getpid(), "host": host, "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                  "command": " ".join(sys.argv)}  # fmt: skip
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        yield path
    finally:
        try:
            os.unlink(path)  # while still held: a waiting process re-checks the inode
        except OSError:
            pass
        os.close(fd)


@contextmanager
def claim_output(target: str | Path, *, folder: bool, option: str = "--out",
                 say: Callable[[str], None] | None = None, min_free_mb: float = MIN_FREE_MB) -> Iterator[Path]:  # fmt: skip
    """Pre-flight checks, then the exclusive lock of ``target`` for the block (see the module doc).

    Temporaries left by killed runs are removed once the lock is held; folders created here are
    removed again if the block leaves them empty (a run refused on bad input leaves nothing).
    """
    say = say or (lambda _m: None)
    target = Path(target).expanduser()
    created = preflight_output(target, folder=folder, option=option, min_free_mb=min_free_mb)
    try:
        with hold_lock(target, folder=folder, option=option, say=say):
            if folder:
                removed = sweep_stale_temps(target)
            else:
                stem = target.with_suffix("").name
                removed = sweep_stale_temps(
                    target.parent, lambda n: n.startswith(target.name) or n.startswith(stem + ".")
                )
            if removed:
                say(f"note: removed {len(removed)} temporary file(s) an interrupted run left: "
                    + ", ".join(p.name for p in removed[:3]) + (" ..." if len(removed) > 3 else ""))  # fmt: skip
            yield target
    finally:
        _remove_empty(created)
