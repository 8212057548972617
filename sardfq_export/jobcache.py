"""The main job's stage cache: one folder, one state file, one ``stage()`` mechanism.

Each stage is keyed by a hash of everything it depends on (the upstream stage's key, its own
settings, the model's fingerprint). ``stage(name, key, compute, load, outputs)`` returns the
stage's value: from ``compute()`` when the stage must run, else from ``load(record)`` when it
finished earlier with the same key and its outputs still exist. That is the only place where
"in memory" vs "from disk" is decided. An ``--out`` written with different settings is refused
unless ``overwrite`` (which then redoes only the stages whose keys changed).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sardfq_export.core.errors import UserInputError
from sardfq_export.core.io import atomic_write_json

STATE_FILE = ".sardfq-state.json"


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
        if self.state_path.exists():
            try:
                state = json.loads(self.state_path.read_text())
            except (OSError, json.JSONDecodeError):
                state = None
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
        elif self.out.exists() and any(self.out.iterdir()) and not overwrite:
            raise UserInputError(
                f"{self.out} exists and is not a sardfq-export output folder: pass --overwrite or another --out"
            )
        self.out.mkdir(parents=True, exist_ok=True)
        return {"format": "sardfq-state-1", "settings": self.settings, "stages": {}}

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
            return load(rec["result"]), rec["result"]
        self.say(f"{name}: running")
        start = time.perf_counter()
        self.state["stages"][name] = {"key": key, "done": False}
        self.save()
        value, result = compute()
        seconds = round(time.perf_counter() - start, 2)
        self.state["stages"][name] = {"key": key, "done": True, "seconds": seconds, "result": result}
        self.save()
        self.say(f"{name}: done in {seconds:.1f}s")
        return value, result

    def stage_seconds(self) -> dict:
        return {
            k: {"key": v.get("key"), "seconds": v.get("seconds")} for k, v in self.state["stages"].items()
        }
