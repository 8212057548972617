"""The main job's stage cache: one folder, one state file, one ``stage()`` mechanism.

Each stage is keyed by a hash of everything it depends on (the upstream stage's key, its own
settings, the model's fingerprint). ``stage(name, key, compute, load, outputs)`` returns the
stage's value: from ``compute()`` when the stage must run, else from ``load(record)`` when it
finished earlier with the same key and its outputs still exist. That is the only place where
"in memory" vs "from disk" is decided. An ``--out`` written with different settings is refused
unless ``overwrite`` (which then redoes only the stages whose keys changed).

The state file is written when a stage starts and when it finishes; a stage refused on bad input
as it starts (``UserInputError``) in a folder without state leaves none behind, so the corrected
run is not refused. An unreadable state file is refused (one line naming it; ``--overwrite``
starts over), and so is a finished stage whose files changed since it wrote them (their size
and sha256 are recorded) or no longer load: the line names the file. The caller holds the
folder's lock (:func:`sardfq_export.core.io.claim_output`).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sardfq_export.core.errors import UserInputError
from sardfq_export.core.io import LOCK_NAME, DiskFullError, atomic_write_json, is_temp_name, sha256_file

STATE_FILE = ".sardfq-state.json"
STATE_FORMAT = "sardfq-state-1"


def content_key(obj: Any) -> str:
    """A short stable hash of a JSON-able description."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class StageCache:
    """The state of one job folder: its settings, the finished stages and their records."""

    def __init__(self, out: Path, settings: dict, *, overwrite: bool, say: Callable[[str], None]):
        self.out = out
        self.settings = settings
        self.say = say
        self.state_path = out / STATE_FILE
        self.state = self._open(overwrite)

    def _open(self, overwrite: bool) -> dict:
        """The folder's state (or a new one); nothing is written here (see :meth:`stage`)."""
        if self.state_path.exists():
            state, problem = _read_state(self.state_path)
            if problem and not overwrite:
                raise UserInputError(
                    f"{self.state_path} is unreadable ({problem}): pass --overwrite to start this folder "
                    "over (finished stages are redone), or another --out"
                )
            if state is not None:
                old = state.get("settings", {})
                diff = sorted(k for k in self.settings if old.get(k) != self.settings.get(k))
                if diff and not overwrite:
                    shown = ", ".join(f"{k}: {old.get(k)!r} → {self.settings.get(k)!r}" for k in diff)
                    raise UserInputError(
                        f"{self.out} holds a run with different settings ({shown}): pass --overwrite to "
                        "replace it (finished stages whose inputs did not change are kept), or another --out"
                    )
                state["settings"] = self.settings
                return state
        elif _foreign_entries(self.out) and not overwrite:
            raise UserInputError(
                f"{self.out} exists and is not a sardfq-export output folder: pass --overwrite or another --out"
            )
        return {"format": STATE_FORMAT, "settings": self.settings, "stages": {}}

    def save(self) -> None:
        atomic_write_json(self.state_path, self.state)

    def record(self, name: str) -> dict:
        return (self.state["stages"].get(name) or {}).get("result") or {}

    def stage(
        self,
        name: str,
        key: str,
        compute: Callable[[], tuple[Any, dict]],
        load: Callable[[dict], Any],
        outputs: list[Path] = (),
    ) -> tuple[Any, dict]:
        """``(value, record)`` of stage ``name``: reused when finished with ``key``, else computed.

        ``compute()`` returns ``(value, record)`` (record: JSON for the state file and report);
        ``load(record)`` rebuilds the value from the stage's files.
        """
        rec = self.state["stages"].get(name)
        if rec and rec.get("key") == key and rec.get("done") and all(Path(p).exists() for p in outputs):
            self.say(f"{name}: up to date (reusing {', '.join(Path(p).name for p in outputs) or 'result'})")
            self._check_outputs(name, rec.get("outputs") or {})
            try:
                return load(rec["result"]), rec["result"]
            except DiskFullError:
                raise
            except UserInputError as exc:  # a finished stage's file is damaged: name it, say what to do
                raise UserInputError(
                    f"{exc} (a finished {name} stage's file: delete it to redo that stage)"
                ) from None
        self.say(f"{name}: running")
        start = time.perf_counter()
        first = not self.state_path.exists()
        self.state["stages"][name] = {"key": key, "done": False}
        self.save()
        try:
            value, result = compute()
        except UserInputError as exc:
            # Bad input found as the stage started: leave no state behind that would refuse the
            # corrected run (a full disk is no such case: its --resume needs the state).
            if first and not isinstance(exc, DiskFullError):
                self.state["stages"].pop(name, None)
                self.state_path.unlink(missing_ok=True)
            raise
        seconds = round(time.perf_counter() - start, 2)
        self.state["stages"][name] = {"key": key, "done": True, "seconds": seconds, "result": result,
                                      "outputs": self._fingerprint(outputs)}  # fmt: skip
        self.save()
        self.say(f"{name}: done in {seconds:.1f}s")
        return value, result

    def _fingerprint(self, outputs) -> dict:
        """name → {bytes, sha256} of a stage's output files, as it finished."""
        out = {}
        for p in map(Path, outputs):
            if p.is_file():
                out[_rel(p, self.out)] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        return out

    def _check_outputs(self, name: str, recorded: dict) -> None:
        """Refuse (one line) a finished stage's file that is no longer what the stage wrote."""
        for rel, want in recorded.items():
            p = self.out / rel
            if not p.is_file():
                continue  # a missing file makes the stage run again (checked by the caller)
            if p.stat().st_size != want.get("bytes") or sha256_file(p) != want.get("sha256"):
                raise UserInputError(
                    f"{p} is not the file the finished {name} stage wrote (truncated or changed since): "
                    "delete it to redo that stage"
                )

    def stage_seconds(self) -> dict:
        return {
            k: {"key": v.get("key"), "seconds": v.get("seconds")} for k, v in self.state["stages"].items()
        }


def _rel(p: Path, root: Path) -> str:
    try:
        return str(p.relative_to(root))
    except ValueError:
        return str(p)


def _read_state(path: Path) -> tuple[dict | None, str | None]:
    """(state, None) or (None, what is wrong with the file)."""
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"{type(exc).__name__}: {exc}"
    if not (
        isinstance(state, dict)
        and state.get("format") == STATE_FORMAT
        and isinstance(state.get("settings"), dict)
        and isinstance(state.get("stages"), dict)
    ):
        return None, f"not a {STATE_FORMAT} state file"
    return state, None


def _foreign_entries(folder: Path) -> list[Path]:
    """What ``folder`` holds besides our lock and temporaries (nothing when it does not exist)."""
    if not folder.is_dir():
        return [folder] if folder.exists() else []
    return [p for p in folder.iterdir() if p.name != LOCK_NAME and not is_temp_name(p.name)]
