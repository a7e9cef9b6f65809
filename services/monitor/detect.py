"""The monitor's detectors, pure: sample windows, persistence with hysteresis, and link
metrics judged against a baseline. No I/O, no clock of their own: every call takes
``now_s`` (Unix seconds) from the caller.

- Smoothing: a metric keeps a window of its last samples; its value is their median
  (one outlier never moves it); samples older than ``max_sample_age_s`` expire.
- Change detection: a metric is compared with its *baseline* (armed once
  ``min_samples`` fill the window, following slow drift while not beyond the threshold,
  which also corrects a baseline armed on start-up noise); it trips when it stays beyond
  the threshold for ``persist_s`` and clears when it stays back near the baseline (half
  the threshold: hysteresis) for ``persist_s``. The baseline freezes while tripped.
- RTT is judged on the window's lower quartile, not its median: on a loaded machine the
  probes' round trips pick up milliseconds of scheduling delay (a probe crosses two
  workers' event loops and the broker), always upwards. A real latency rise lifts every
  sample; jitter lifts some. The rise must also exceed ``rtt_min_rise_s`` absolute.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass
from typing import Literal

from shared.messages import Evidence

Transition = Literal["tripped", "cleared"]
MetricKind = Literal["bandwidth", "rtt", "loss"]


@dataclass(frozen=True)
class MonitorConfig:
    """Thresholds and windows (docs/MONITOR.md explains each)."""

    heartbeat_timeout_s: float = 3.0
    window: int = 5
    load_window: int = 3
    max_sample_age_s: float = 20.0
    persist_s: float = 3.0
    min_samples: int = 5
    baseline_alpha: float = 0.1
    bandwidth_drop: float = 0.3
    fast_link_bytes_per_s: float = 20e6
    rtt_rise: float = 0.5
    rtt_min_rise_s: float = 0.02
    loss_degraded: float = 0.2
    loss_recovered: float = 0.05
    busy_overloaded: float = 0.9
    busy_cleared: float = 0.7
    queue_overloaded: float = 4.0
    queue_cleared: float = 1.0


class MedianWindow:
    """The last ``size`` samples younger than ``max_age_s``; their median or lower quartile."""

    def __init__(self, size: int, max_age_s: float) -> None:
        self._samples: deque[tuple[float, float]] = deque(maxlen=size)
        self._max_age_s = max_age_s

    def add(self, now_s: float, value: float) -> None:
        if math.isfinite(value):
            self._samples.append((now_s, value))

    def _fresh(self, now_s: float) -> list[float]:
        return [value for at_s, value in self._samples if now_s - at_s <= self._max_age_s]

    def count(self, now_s: float) -> int:
        return len(self._fresh(now_s))

    def value(self, now_s: float) -> float | None:
        """The median of the fresh samples (None without any)."""
        fresh = self._fresh(now_s)
        return statistics.median(fresh) if fresh else None

    def newest_s(self, now_s: float) -> float:
        """When the newest fresh sample came (-inf without one)."""
        fresh = [at_s for at_s, _ in self._samples if now_s - at_s <= self._max_age_s]
        return fresh[-1] if fresh else -math.inf

    def latest(self, now_s: float, count: int) -> list[float]:
        """The newest ``count`` fresh samples (fewer when there are fewer)."""
        return self._fresh(now_s)[-count:]

    def lower_quartile(self, now_s: float) -> float | None:
        """The fresh sample at the lower quartile (of 5: the second smallest; of 2 to 4:
        the smallest), so it rises only when at least three quarters of the window rose."""
        fresh = sorted(self._fresh(now_s))
        return fresh[(len(fresh) - 1) // 4] if fresh else None


@dataclass
class Persistence:
    """Two states with hysteresis: trips after ``bad`` held for ``persist_s``, clears after
    ``good`` held for ``persist_s``. Between the thresholds nothing changes."""

    persist_s: float
    tripped: bool = False
    pending_since_s: float | None = None

    def update(self, now_s: float, bad: bool, good: bool) -> Transition | None:
        towards = bad if not self.tripped else good
        if not towards:
            self.pending_since_s = None
            return None
        if self.pending_since_s is None:
            self.pending_since_s = now_s
        if now_s - self.pending_since_s < self.persist_s:
            return None
        self.tripped = not self.tripped
        self.pending_since_s = None
        return "tripped" if self.tripped else "cleared"

    def held_s(self, now_s: float) -> float:
        return 0.0 if self.pending_since_s is None else now_s - self.pending_since_s


@dataclass
class Change:
    """A metric's transition and its evidence."""

    transition: Transition
    evidence: Evidence


FAST_FALL_SAMPLES = 2
FAST_RISE_FACTOR = 1.5
"""The newest FAST_FALL_SAMPLES samples all this much better than the median (bandwidth
above it by the factor, rtt below it by the factor) are planned with at once (their
worst), as a fall is: a link that fades in is used within a second or two, not when the
window's median follows three samples later. Noise (+-10 %) stays far below the factor,
and a stall only ever lengthens a round trip, never shortens it."""


def _fast_rise(kind: MetricKind, value: float, newest_worst: float) -> float:
    """``value``, or ``newest_worst`` when it is better by FAST_RISE_FACTOR (see above)."""
    if kind == "bandwidth" and newest_worst >= FAST_RISE_FACTOR * value:
        return newest_worst
    if kind == "rtt" and newest_worst * FAST_RISE_FACTOR <= value:
        return newest_worst
    return value


_METRIC_NAMES = {"bandwidth": "bandwidth_bytes_per_s", "rtt": "rtt_s", "loss": "loss"}


class TrackedMetric:
    """A smoothed link metric with a baseline and a persistence detector.

    ``kind`` sets what "worse" means: bandwidth falls, rtt rises, loss rises past a level.
    ``value`` is the window's median; the detector judges ``judged`` (the median, or for
    rtt the lower quartile), and the baseline is kept in that same statistic.
    """

    def __init__(self, kind: MetricKind, config: MonitorConfig) -> None:
        self.kind, self.config = kind, config
        self.window = MedianWindow(config.window, config.max_sample_age_s)
        self.detector = Persistence(config.persist_s)
        self.baseline: float | None = None
        self._agreed: tuple[float, float] | None = None
        """(when, bound) of the newest sample when the probes behind it agreed on a change
        (bandwidth: all at most bound; rtt: all at least bound); None otherwise."""

    def value(self, now_s: float) -> float | None:
        return self.window.value(now_s)

    def planning_value(self, now_s: float) -> float | None:
        """What the profile shows: the median, but worse at once (bandwidth down, rtt up)
        when the newest ``FAST_FALL_SAMPLES`` samples all agree on it (their best; bandwidth
        only), or when the newest sample's own probes did (a window of two or more pairs that agree: the
        worker sends such a window at once). A link that fades is planned around within a
        second or two, not when the window's median follows; one outlier moves nothing.
        Better at once too, but only when the newest samples all are better by
        FAST_RISE_FACTOR (their worst): a link fading in, not noise."""
        median = self.window.value(now_s)
        if median is None or self.kind == "loss":
            return median
        worse = min if self.kind == "bandwidth" else max
        best = max if self.kind == "bandwidth" else min
        newest = self.window.latest(now_s, FAST_FALL_SAMPLES)
        value = median
        if len(newest) >= FAST_FALL_SAMPLES:
            if self.kind == "bandwidth":  # rtt: stalls lift whole windows on a loaded machine
                value = worse(value, best(newest))
            value = _fast_rise(self.kind, value, worse(newest))
        agreed = self._agreed
        if agreed is not None and agreed[0] == self.window.newest_s(now_s):
            value = worse(value, agreed[1])
        return value

    def fresh_fall(self, now_s: float) -> float | None:
        """The planning value while it is below the median (a fall the newest samples agree
        on and the median has not followed yet); None otherwise."""
        value, median = self.planning_value(now_s), self.window.value(now_s)
        return value if value is not None and median is not None and value < median else None

    def newest_s(self, now_s: float) -> float:
        return self.window.newest_s(now_s)

    def judged(self, now_s: float) -> float | None:
        """The statistic the detector compares with the baseline."""
        return self.window.lower_quartile(now_s) if self.kind == "rtt" else self.window.value(now_s)

    def add(self, now_s: float, sample: float, agreed: float | None = None) -> Change | None:
        """Take one sample (``agreed``: the bound the probes behind it agree on, see
        ``planning_value``); a Change when the metric trips or clears."""
        self.window.add(now_s, sample)
        if agreed is not None and math.isfinite(agreed) and math.isfinite(sample):
            self._agreed = (now_s, agreed)
        value = self.judged(now_s)
        if value is None or self.window.count(now_s) < self.config.min_samples:
            return None
        if self.baseline is None:
            self.baseline = value
        bad, good, threshold = self._judge(value, self.baseline)
        started_s = self.detector.pending_since_s
        transition = self.detector.update(now_s, bad, good)
        if not self.detector.tripped and not bad:
            self.baseline += self.config.baseline_alpha * (value - self.baseline)
        if transition is None:
            return None
        held_s = now_s - started_s if started_s is not None else 0.0
        evidence = Evidence(metric=_METRIC_NAMES[self.kind], old_value=self.baseline, new_value=value,
                            threshold=threshold, window_s=held_s,
                            samples=self.window.count(now_s))  # fmt: skip
        return Change(transition, evidence)

    def _judge(self, value: float, base: float) -> tuple[bool, bool, float]:
        """(bad, good, threshold) of ``value`` against ``base``."""
        config = self.config
        if self.kind == "bandwidth":
            threshold = base * (1 - config.bandwidth_drop)
            fast = value >= config.fast_link_bytes_per_s
            return (value < threshold and not fast,
                    fast or value >= base * (1 - config.bandwidth_drop / 2), threshold)  # fmt: skip
        if self.kind == "rtt":
            threshold = max(base * (1 + config.rtt_rise), base + config.rtt_min_rise_s)
            relaxed = max(base * (1 + config.rtt_rise / 2), base + config.rtt_min_rise_s / 2)
            return value > threshold, value <= relaxed, threshold
        return value >= config.loss_degraded, value <= config.loss_recovered, config.loss_degraded
