"""Progress bars: TensorRT builds (``BuildProgressBar``, fed by the builder's
IProgressMonitor) and a model's layout being measured (``MeasureProgress``).

TensorRT calls the monitor from its own threads, with nested phases; the bar shows the
outermost phase's share done and the innermost phase's name. On a terminal it redraws one
line; elsewhere it prints one line as each top-level phase starts and ends. Setting
``cancelled`` makes the next step report ask TensorRT to stop the build.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time

# Back to the line's start, then erase to its end: a shorter line leaves no tail behind
_REDRAW, _ERASE = "\r", "\x1b[K"


def fit_line(text: str) -> str:
    """``text`` cut to the terminal's width, less one column (a line that fills the
    last column wraps on many terminals, and every redraw would then stack a line), as a
    redraw of the current line."""
    columns = shutil.get_terminal_size(fallback=(80, 24)).columns
    return _REDRAW + text[:max(columns - 1, 10)] + _ERASE


class BuildProgressBar:
    def __init__(self, out=None, width: int = 28):
        self.out = out or sys.stderr
        self.tty = bool(getattr(self.out, "isatty", lambda: False)())
        self.width = width
        self.cancelled = False
        self._phases: dict[str, list] = {}  # name -> [done, steps, parent]
        self._order: list[str] = []
        self._lock = threading.Lock()
        self._t0 = time.monotonic()

    def phase_start(self, phase: str, parent: str | None, steps: int) -> None:
        with self._lock:
            self._phases[phase] = [0, max(1, steps), parent]
            self._order.append(phase)
            if parent is None and not self.tty:
                print(f"build: {phase} ({steps} steps)", file=self.out, flush=True)
            self._draw()

    def step_complete(self, phase: str, step: int) -> bool:
        with self._lock:
            if phase in self._phases:
                self._phases[phase][0] = step + 1
            self._draw()
        return not self.cancelled

    def phase_finish(self, phase: str) -> None:
        with self._lock:
            info = self._phases.pop(phase, None)
            if phase in self._order:
                self._order.remove(phase)
            if info is not None and info[2] is None and not self.tty:
                print(f"build: {phase} done after {time.monotonic() - self._t0:.1f} s",
                      file=self.out, flush=True)
            self._draw()

    def close(self) -> None:
        if self.tty:
            print(file=self.out, flush=True)

    def _draw(self) -> None:
        if not self.tty or not self._order:
            return
        root = next((p for p in self._order if self._phases[p][2] is None), self._order[0])
        done, steps, _ = self._phases[root]
        inner = self._order[-1]
        idone, isteps, _ = self._phases[inner]
        filled = int(self.width * done / steps)
        bar = "#" * filled + "." * (self.width - filled)
        line = (f"[{bar}] {100 * done // steps:3d}% {root}"
                + (f" > {inner} {idone}/{isteps}" if inner != root else ""))
        print(fit_line(line), end="", file=self.out, flush=True)


class MeasureProgress:
    """``progress(done, total, what)`` of the layout measuring (scheduling/tuning.py): one
    redrawn line on a terminal, elsewhere a line as it starts and one when it ends."""

    def __init__(self, model: str, out=None, width: int = 20):
        self.out = out or sys.stderr
        self.tty = bool(getattr(self.out, "isatty", lambda: False)())
        self.model = model
        self.width = width
        self._started = False
        self._t0 = time.monotonic()

    def __call__(self, done: int, total: int, what: str) -> None:
        if not self._started:
            self._started = True
            if not self.tty:
                print(f"measuring how {self.model} runs best here ({total} steps)",
                      file=self.out, flush=True)
        if self.tty:
            filled = int(self.width * done / max(total, 1))
            line = (f"measuring {self.model} [{'#' * filled}{'.' * (self.width - filled)}] "
                    f"{done}/{total} {what}")
            print(fit_line(line), end="", file=self.out, flush=True)

    def close(self) -> None:
        if not self._started:
            return
        if self.tty:
            print(file=self.out, flush=True)
        else:
            print(f"measured {self.model} in {time.monotonic() - self._t0:.1f} s",
                  file=self.out, flush=True)
