"""Rates of monotonic byte counters over the last few seconds, kept by the
process that counts (so a one-shot ``nicsplit status`` shows a real rate,
not one computed between two calls of its own).

The counting process calls `RateWindow.sample` with its current totals
whenever `due` says so (about once a second: from its loop, no extra
thread); `rates` divides what each counter grew since the oldest sample in
the window (at most ``span_s`` old) by the time between. A key missing from
that sample counts from 0 (it appeared since). Before the first sample every
rate is 0.0.

Example::

    rw = RateWindow(span_s=10)
    if rw.due(now): rw.sample(now, {"cg1": total_in})
    rw.rates(now, {"cg1": total_in})   # {"cg1": bytes per second}
"""

from __future__ import annotations

from collections import deque
from typing import Mapping

__all__ = ["RateWindow"]


class RateWindow:
    def __init__(self, span_s: float = 10.0, every_s: float = 1.0) -> None:
        if span_s <= 0 or every_s <= 0:
            raise ValueError("span_s and every_s must be positive")
        self.span_s = span_s
        self.every_s = every_s
        self._samples: deque[tuple[float, dict[str, int]]] = deque(maxlen=int(span_s / every_s) + 1)
        self._next = 0.0

    def due(self, now: float) -> bool:
        return now >= self._next

    def sample(self, now: float, totals: Mapping[str, int]) -> None:
        self._samples.append((now, dict(totals)))
        self._next = now + self.every_s
        while self._samples and now - self._samples[0][0] > self.span_s + self.every_s:
            self._samples.popleft()  # a long pause: too old to say anything about the last span

    def rates(self, now: float, totals: Mapping[str, int]) -> dict[str, float]:
        """Per key: growth per second since the oldest sample kept (0.0 without one)."""
        if not self._samples:
            return {k: 0.0 for k in totals}
        t0, old = self._samples[0]
        dt = now - t0
        if dt < 0.5:  # too short to be a rate (the first sample was just taken)
            return {k: 0.0 for k in totals}
        return {k: round(max(0, v - old.get(k, 0)) / dt, 1) for k, v in totals.items()}
