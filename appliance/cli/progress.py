"""A progress bar for TensorRT builds, fed by the builder's IProgressMonitor.

TensorRT calls the monitor from its own threads, with nested phases; the bar shows the
outermost phase's share done and the innermost phase's name. On a terminal it redraws one
line; elsewhere it prints one line as each top-level phase starts and ends. Setting
``cancelled`` makes the next step report ask TensorRT to stop the build.
"""

from __future__ import annotations

import sys
import threading
import time


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
        line = (f"\r[{bar}] {100 * done // steps:3d}% {root}"
                + (f" > {inner} {idone}/{isteps}" if inner != root else ""))
        print(line[:160].ljust(100), end="", file=self.out, flush=True)
