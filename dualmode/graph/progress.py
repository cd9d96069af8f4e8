"""Saying that graph mode is compiling, while it compiles: the first call can take minutes on a CPU.

Lines go to the "dualmode" logger at INFO: one when the compile starts and one when it ends (with where the time
went). In a program that never configured `logging` those would go nowhere, so there a compile that is still
running after `QUIET_AFTER_S` says so on stderr, then every `HEARTBEAT_S`, and ends with the same last line.
`logging.getLogger("dualmode").setLevel(logging.WARNING)` silences both.
"""

from __future__ import annotations

import logging
import sys
import threading
import time

LOGGER = logging.getLogger("dualmode")
QUIET_AFTER_S = 3.0
HEARTBEAT_S = 15.0


def _configured() -> bool:
    return LOGGER.hasHandlers()


def _silenced() -> bool:
    return LOGGER.getEffectiveLevel() > logging.INFO if _configured() else LOGGER.level > logging.INFO


def _to_stderr(message: str) -> None:
    print(f"[dualmode] {message}", file=sys.stderr, flush=True)


class CompileProgress:
    """A context for the call that compiles: start and end lines, and a heartbeat while it runs."""

    def __init__(self, what: str, quiet_after_s: float = QUIET_AFTER_S, heartbeat_s: float = HEARTBEAT_S):
        self.what = what
        self.quiet_after_s, self.heartbeat_s = quiet_after_s, heartbeat_s
        self.summary = ""  # set by the caller before the context ends: where the time went
        self._done = threading.Event()
        self._spoke = False  # whether the stderr fallback said something, so that it also says the end
        self._thread: threading.Thread | None = None
        self._start = 0.0

    def __enter__(self) -> CompileProgress:  # noqa: PYI034 (never subclassed)
        self._start = time.perf_counter()
        LOGGER.info("%s: compiling (the first call traces and compiles the whole step; on a CPU this can take "
                    "minutes)", self.what)
        if not _configured() and not _silenced():
            self._thread = threading.Thread(target=self._heartbeat, name="dualmode-compile-progress", daemon=True)
            self._thread.start()
        return self

    def _heartbeat(self) -> None:
        wait = self.quiet_after_s
        while not self._done.wait(wait):
            self._spoke = True
            _to_stderr(f"{self.what}: still compiling ({time.perf_counter() - self._start:.0f} s so far)")
            wait = self.heartbeat_s

    def __exit__(self, kind, error, traceback) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()
        seconds = time.perf_counter() - self._start
        if kind is not None:
            LOGGER.info("%s: compiling failed after %.1f s", self.what, seconds)
            return
        line = f"{self.what}: compiled in {seconds:.1f} s" + (f" ({self.summary})" if self.summary else "")
        LOGGER.info("%s", line)
        if self._spoke:
            _to_stderr(line)
