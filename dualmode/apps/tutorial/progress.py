"""Where the tutorial writes: its own lines to stdout, a progress bar and a compile ticker to stderr.

The bar is tqdm's, shown only when stderr is a terminal (tqdm's `disable=None`); the tutorial's lines go through
`tqdm.write` so that they never tear the bar. While graph mode compiles (minutes for MobileNetV2 on two cores),
a thread shows the seconds elapsed: in the bar's postfix on a terminal, else a line every `quiet_every` seconds.
"""

from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager


class _NoBar:
    """Stands in for a tqdm bar when there is none (no terminal, or tqdm not installed)."""

    disabled = True

    def advance(self, loss: float) -> None:
        pass

    def show(self, text: str) -> None:
        pass


class _Bar:
    """A tqdm bar over the steps of one mode, with the last loss as postfix."""

    disabled = False

    def __init__(self, bar):
        self._bar = bar

    def advance(self, loss: float) -> None:
        self._bar.set_postfix_str(f"loss {loss:.4f}", refresh=False)
        self._bar.update(1)

    def show(self, text: str) -> None:
        self._bar.set_postfix_str(text, refresh=True)


class Console:
    """The tutorial's output: `say()` for its lines, `progress()` for a bar, `compiling()` around a compile.

    Streams are looked up at each call (sys.stdout / sys.stderr by default), so that captured output works.
    """

    def __init__(self, out=None, err=None, *, tick_every: float = 1.0, quiet_every: float = 30.0):
        self._out, self._err = out, err
        self._bar = _NoBar()
        self.tick_every = tick_every
        self.quiet_every = quiet_every

    @property
    def out(self):
        return self._out if self._out is not None else sys.stdout

    @property
    def err(self):
        return self._err if self._err is not None else sys.stderr

    def say(self, text: str) -> None:
        """One or more lines of the tutorial's output, to stdout."""
        if self._bar.disabled:
            print(text, file=self.out, flush=True)
        else:
            from tqdm import tqdm

            tqdm.write(text, file=self.out)

    @contextmanager
    def progress(self, total: int, desc: str):
        """A progress bar of `total` steps on stderr while the block runs; yields it (`advance(loss)`)."""
        try:
            from tqdm import tqdm
        except ImportError:  # the bar is a comfort, not a requirement
            yield self._bar
            return
        bar = tqdm(total=total, desc=desc, unit="step", file=self.err, disable=None, dynamic_ncols=True)
        if bar.disable:
            bar.close()
            yield self._bar
            return
        self._bar = _Bar(bar)
        try:
            yield self._bar
        finally:
            self._bar = _NoBar()
            bar.close()

    @contextmanager
    def compiling(self, backend: str):
        """Say that graph mode compiles, tick the elapsed seconds while the block runs, then say how long it took."""
        self.say(f"graph mode: first call: tracing forward + backward + update and compiling them with "
                 f"torch.compile(backend={backend!r}); with inductor this takes minutes on 2 cores the first "
                 "time, seconds once inductor's on-disk cache holds the step ...")
        start = time.perf_counter()
        done = threading.Event()
        ticker = threading.Thread(target=self._tick, args=(start, done), daemon=True)
        ticker.start()
        try:
            yield
        finally:
            done.set()
            ticker.join()
        self.say(f"graph mode: first call (trace + compile + one step) took {time.perf_counter() - start:.1f} s")

    def _tick(self, start: float, done: threading.Event) -> None:
        last_line = start
        while not done.wait(self.tick_every):
            now = time.perf_counter()
            if not self._bar.disabled:
                self._bar.show(f"compiling {now - start:.0f} s")
            elif now - last_line >= self.quiet_every:
                last_line = now
                print(f"  ... still compiling, {now - start:.0f} s", file=self.err, flush=True)
