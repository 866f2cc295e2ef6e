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
when the study returns. A second signal while one is held is raised at once, wherever it lands.
An export holds a signal the same way while it swaps the finished bundle for an old one.
"""
from __future__ import annotations

import contextlib
import signal

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupts:
    def __init__(self):
        self.holding = False
        self.pending = False

    def handler(self, signum, frame) -> None:
        if self.holding and not self.pending:
            self.pending = True
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
        ``last``: the block finishes the work (a finished bundle moved into place), so a signal
        held in it has nothing left to stop and is dropped."""
        holding, self.holding = self.holding, True
        try:
            yield
        except KeyboardInterrupt:  # the held one, or a second: either way the stop is under way
            self.pending = False
            raise
        finally:
            self.holding = holding
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
