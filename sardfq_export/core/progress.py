"""Progress for people and for logs: a tqdm bar on a terminal, plain lines everywhere else.

``progress_bar(iterable=None, **tqdm_kwargs)`` is the one way the package shows progress. On a
terminal (or in a notebook) it is ``tqdm.auto.tqdm``. When stderr is redirected (CI logs, files,
pipes) a carriage-return bar is unreadable (hundreds of frames around a few real lines), so it is a
:class:`PlainProgress` with the same small interface (``update``, ``set_postfix``, ``close``,
``write``, ``n``/``total``, iteration, context manager) that prints ``desc: n/total unit (rate,
elapsed) postfix`` as one line, at most every :data:`PLAIN_INTERVAL_S` seconds and once at the end,
without a carriage return.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

PLAIN_INTERVAL_S = 30.0  # seconds between two plain progress lines of one bar (the last one always prints)


def _stream(file) -> Any:
    return file if file is not None else sys.stderr


def _in_notebook() -> bool:
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()
    except Exception:  # an IPython without a shell
        return False
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def interactive(file=None) -> bool:
    """Whether progress on ``file`` (default stderr) is read live: a terminal or a notebook."""
    try:
        tty = bool(_stream(file).isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        tty = False
    return tty or _in_notebook()


def progress_bar(iterable: Iterable | None = None, **kwargs):
    """``tqdm.auto.tqdm(iterable, **kwargs)`` on a terminal; otherwise a :class:`PlainProgress`."""
    if kwargs.get("disable") or interactive(kwargs.get("file")):
        from tqdm.auto import tqdm

        return tqdm(iterable, **kwargs)
    return PlainProgress(iterable, **kwargs)


def progress_write(msg: str, file=None) -> None:
    """Print a line to stderr without breaking a live bar (``tqdm.write`` on a terminal)."""
    if interactive(file):
        from tqdm.auto import tqdm

        tqdm.write(msg, file=file)
    else:
        PlainProgress.write(msg, file=file)


def _scaled(v: float, scale: bool) -> str:
    if not scale:
        return f"{v:g}" if isinstance(v, float) else str(v)
    for prefix in ("", "k", "M", "G", "T"):
        if abs(v) < 1000:
            return f"{v:.3g}{prefix}"
        v /= 1000
    return f"{v:.3g}P"


def _duration(s: float) -> str:
    s = int(round(s))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class PlainProgress:
    """tqdm's interface, printed as plain lines (see the module docstring). Unknown tqdm keywords
    (``leave``, ``dynamic_ncols``, ``mininterval``...) are accepted and ignored."""

    def __init__(
        self,
        iterable: Iterable | None = None,
        desc: str | None = None,
        total: float | None = None,
        *,
        initial: float = 0,
        unit: str = "it",
        unit_scale: bool = False,
        disable: bool = False,
        file=None,
        interval: float | None = None,
        **_ignored: Any,
    ) -> None:
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except (TypeError, AttributeError):
                total = None
        self.iterable, self.desc, self.total = iterable, desc or "", total
        self.n = self.initial = initial
        self.unit, self.unit_scale, self.disable = unit, bool(unit_scale), bool(disable)
        self.file = file
        self.interval = PLAIN_INTERVAL_S if interval is None else interval
        self.postfix = ""
        self.closed = False
        self._printed_n: float | None = None
        self.start_t = self.last_print_t = time.monotonic()

    # --- tqdm's interface -------------------------------------------------------------------------

    def update(self, n: float = 1) -> None:
        self.n += n
        if not self.disable and time.monotonic() - self.last_print_t >= self.interval:
            self._print()

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        items = {**(dict(ordered_dict) if ordered_dict else {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = str(s)

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def refresh(self) -> None:
        """tqdm redraws here; a log line is written only on the interval or at the end."""

    def reset(self, total: float | None = None) -> None:
        self.n = self.initial = 0
        self._printed_n = None
        if total is not None:
            self.total = total
        self.start_t = self.last_print_t = time.monotonic()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if not self.disable and self.n != self._printed_n:  # (the last periodic line may be the end)
            self._print()

    @classmethod
    def write(cls, s: str, file=None, end: str = "\n", nolock: bool = False) -> None:
        stream = _stream(file)
        stream.write(str(s) + end)
        stream.flush()

    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("PlainProgress without an iterable is not iterable (use update())")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return int(self.total or 0)

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- the line ---------------------------------------------------------------------------------

    def line(self) -> str:
        """``desc: n/total unit (rate unit/s, elapsed[, eta]) postfix`` (never a carriage return)."""
        now = time.monotonic()
        elapsed = now - self.start_t
        done = self.n - self.initial
        count = _scaled(self.n, self.unit_scale)
        if self.total is not None:
            count += "/" + _scaled(self.total, self.unit_scale)
        timing = [_duration(elapsed)]
        if elapsed > 0 and done > 0:
            rate = done / elapsed
            shown = (
                _scaled(rate, True) if self.unit_scale else f"{rate:.0f}" if rate >= 100 else f"{rate:#.3g}"
            )
            timing.insert(0, f"{shown} {self.unit}/s")
            if self.total is not None and not self.closed and self.total > self.n:
                timing.append(f"eta {_duration((self.total - self.n) / rate)}")
        head = f"{self.desc}: " if self.desc else ""
        tail = f" {self.postfix}" if self.postfix else ""
        text = f"{head}{count} {self.unit} ({', '.join(timing)}){tail}"
        return text.replace("\r", " ").replace("\n", " ")

    def _print(self) -> None:
        self.last_print_t, self._printed_n = time.monotonic(), self.n
        try:
            self.write(self.line(), file=self.file)
        except (ValueError, OSError):  # a closed or broken stream must not fail the work
            pass
