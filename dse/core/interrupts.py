"""Stopping a command (Ctrl-C, SIGTERM) without leaving its work half done.

Python raises ``KeyboardInterrupt`` wherever the main thread happens to be. Inside a trial's
work that is what a user wants: the trial ends at once and is recorded as interrupted. Inside
Optuna's own bookkeeping around a trial it is not:

* between asking for a trial and starting its heartbeat, the trial stays RUNNING for good;
* while the heartbeat thread starts, the thread is never told to stop, and the process hangs
  after ``main`` returns, waiting for it;
* while a finished trial is told, Optuna itself fails with a traceback.

So while a study runs (:meth:`Interrupts.held`), a first signal that lands outside a trial's
work is held and raised at the next safe point: when the next trial's work starts (that trial
is recorded as interrupted), after a trial's callbacks (:meth:`Interrupts.check` is one), or
when the study returns. A second signal while one is held ends the process at once, by that
signal (a trial in flight then stays RUNNING until its heartbeat lapses, and is retried).
An export holds a signal the same way while it swaps the finished bundle for an old one.
"""
from __future__ import annotations

import contextlib
import os
import signal

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _stop_now(signum: int) -> None:
    """End the process by ``signum`` itself, as if no handler were installed."""
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


class Interrupts:
    def __init__(self):
        self.holding = False
        self.pending = False
        self.critical = False  # a block that must not be cut at all (swapping two folders)
        self.force = _stop_now

    def handler(self, signum, frame) -> None:
        if self.holding and (not self.pending or self.critical):
            if not self.pending and not self.critical:
                os.write(2, b"\nstopping once the current step is recorded (again: stop at once)\n")
            self.pending = True
            return
        if self.holding:  # the user insists: raising inside Optuna's bookkeeping would hang or corrupt it
            os.write(2, b"\nstopped at once: a trial in flight stays RUNNING until its heartbeat lapses, "
                        b"then the next run retries it\n")
            self.force(signum)
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def installed(self):
        """SIGINT and SIGTERM go to :meth:`handler` (a terminated worker stops as Ctrl-C stops it)."""
        previous = {s: signal.signal(s, self.handler) for s in SIGNALS}
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    @contextlib.contextmanager
    def held(self, last: bool = False):
        """Hold a first signal in this block (a study's run); raise it at the end if no safe point did.
        ``last``: the block finishes the work and is short (a finished bundle moved into place):
        every signal in it is held, and dropped at its end, as nothing is left to stop."""
        holding, critical = self.holding, self.critical
        self.holding, self.critical = True, critical or last
        try:
            yield
        except BaseException:  # the stop is under way, or the block failed: nothing is left held
            self.pending = False
            raise
        finally:
            self.holding, self.critical = holding, critical
        if last:
            self.pending = False
        self.check()

    @contextlib.contextmanager
    def raised(self):
        """Raise signals at once in this block (a trial's work), and a held one on entry."""
        holding, self.holding = self.holding, False
        try:
            self.check()
            yield
        finally:
            self.holding = holding

    def check(self, *_) -> None:
        """Raise a held signal now; also an Optuna callback, called after each trial."""
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt


INTERRUPTS = Interrupts()  # signals are the process's: one for all
