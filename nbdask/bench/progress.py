"""Progress of a study in units of work. The base class is silent (library code prints
nothing); the CLI draws ``StderrBar``."""

from __future__ import annotations

import sys
import time


class Progress:
    """Counts work done against work announced; ``add`` announces, ``step`` completes."""

    def __init__(self):
        self.done, self.total, self.note = 0, 0, ""

    def add(self, n: int) -> None:
        self.total += n
        self.draw()

    def step(self, note: str = "", n: int = 1) -> None:
        self.done += n
        self.note = note or self.note
        self.draw()

    def draw(self) -> None:
        pass

    def close(self) -> None:
        pass


class StderrBar(Progress):
    """One self-overwriting line on stderr: ``label [#####-----] 12/40  1m02s  note``."""

    def __init__(self, label: str, stream=None, width: int = 30):
        super().__init__()
        self.label, self.stream, self.width = label, stream or sys.stderr, width
        self.start = time.perf_counter()
        self._last = 0.0

    def draw(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self._last < 0.2 and self.done < self.total:
            return
        self._last = now
        frac = self.done / self.total if self.total else 0.0
        fill = int(round(frac * self.width))
        secs = int(now - self.start)
        line = (f"{self.label} [{'#' * fill}{'-' * (self.width - fill)}] {self.done}/{self.total} "
                f"{secs // 60}m{secs % 60:02d}s  {self.note}")
        self.stream.write("\r" + line[:110].ljust(110))
        self.stream.flush()

    def close(self) -> None:
        self.draw(force=True)
        self.stream.write("\n")
        self.stream.flush()
