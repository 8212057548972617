"""Ctrl-C / SIGTERM as a request to stop at the end of the current step, after a checkpoint.

Every long loop that checkpoints (synthesis, PSAQ-ViT V2's teacher-student fine-tuning) runs inside
:class:`Interrupt`: the first signal only sets ``requested``; the loop saves, then calls
:meth:`Interrupt.deliver`, which lets the signal take its usual course. Dependency-free on purpose:
any stage may import it.
"""

from __future__ import annotations

import signal
import threading


class Interrupt:
    """Ctrl-C or SIGTERM sets a flag; the loop saves a checkpoint at the end of the iteration, then
    :meth:`deliver` lets the signal take its course: KeyboardInterrupt for Ctrl-C; for SIGTERM the
    handler installed before (the CLI's raises ``Terminated``, exit 143; the default ends the
    process). A second signal acts at once. A signal ignored before stays ignored."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                old = signal.getsignal(sig)
                if old is signal.SIG_IGN or old is None:  # None: installed outside Python; leave it
                    continue
                self._old[sig] = old
                signal.signal(sig, self._handler)
        return self

    def _handler(self, signum, frame):
        if self.requested:
            self.deliver(signum)
        self.requested = True
        self.signum = signum

    def deliver(self, signum: int | None = None) -> None:
        """Raise (or end the process) the way the signal would have without us; never returns."""
        signum = signum if signum is not None else self.signum
        old = self._old.get(signum) if signum is not None else None
        self._restore()
        if signum == signal.SIGTERM:
            if callable(old):
                old(signum, None)  # e.g. the CLI's handler: raises Terminated (exit 143)
            elif old == signal.SIG_DFL:
                signal.raise_signal(signum)  # the default: the process ends here, its checkpoint saved
        raise KeyboardInterrupt

    def _restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}

    def __exit__(self, exc_type, *exc):
        if exc_type is None and self.requested:  # arrived after the loop's last check: honour it now
            self.deliver()
        self._restore()
        return False
