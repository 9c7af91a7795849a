"""Ctrl-C and SIGTERM during a run: the first asks the loop to stop after its step (with a
checkpoint), or lets the final files finish; the next stops at once."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["StopRequests", "StoppedAtOnce", "sigterm_interrupts"]


class StoppedAtOnce(KeyboardInterrupt):
    """A second Ctrl-C or SIGTERM: training stopped without finishing its step or its final
    files; the last checkpoint is intact (the message says which files were written)."""


class StopRequests:
    """The first SIGINT / SIGTERM asks the loop to stop after the current step (it then writes a
    checkpoint), or, while the final weights and pictures are written (``finishing``), lets them
    finish; the next one raises :class:`StoppedAtOnce`. Each request says so at once on standard
    error, but in a process other than the main one (``quiet``)."""

    def __init__(self, quiet: bool = False) -> None:
        self.requested = False
        self.finishing = False
        self.quiet = quiet

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise StoppedAtOnce
        self.requested = True
        if self.quiet:
            return
        if self.finishing:
            _notice("stop requested: finishing the final pictures first (seconds); press Ctrl-C again to stop at once")
        else:
            _notice("stop requested: stopping after this step with a checkpoint; press Ctrl-C again to stop at once")

    @contextmanager
    def installed(self) -> Iterator[StopRequests]:
        """The handlers of SIGINT and SIGTERM while the context lasts (none outside the main thread)."""
        try:
            previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        except ValueError:  # not the main thread: no handlers
            yield self
            return
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises ``KeyboardInterrupt`` while the context lasts, as Ctrl-C does: a scheduler's
    cancel before training starts (data, model) then gets Ctrl-C's message and clean-up, not a
    silent death that leaves a half-made run directory. Within training, :class:`StopRequests`
    takes both signals over. Nothing outside the main thread."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _notice(text: str) -> None:
    """A line on standard error from a signal handler: written to the file descriptor, since the
    handler may interrupt a write to ``sys.stderr`` (a progress bar's), which cannot be reentered."""
    try:
        os.write(sys.stderr.fileno(), f"\n{text}\n".encode())
    except (OSError, ValueError, AttributeError):  # no descriptor (captured output): nothing to say
        pass
