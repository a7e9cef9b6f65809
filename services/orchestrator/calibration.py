"""The measured per-token overhead the plan model does not cover (no I/O, no clock).

A plan's predicted time per token (`logic.per_token_s`) covers the blocks' compute and
the links; the head, sampling, streaming and the broker hops are not in it. The
orchestrator measures that difference: each finished request's TPOT minus the running
plan's prediction at the load the request saw (the median of the predictions the
profiles gave while it ran). A request is counted ``settle_s`` after it finished, so the
requests that ran beside it are known too; the overhead is the median of the last
``window`` such differences. The overhead is the same for every plan, so it changes no
ranking, only the relative saving and the predicted TPOT.

A median, not a running mean: with 4 requests decoding on a shared 2-core machine,
bursts of slow requests come and go within seconds. Smoothed with 0.2 (the earlier
rule), the overhead of one run swung between 3.3 and 8.8 ms on an 11 ms time per token
within 6 s, and a decision taken at a low point predicted the new plan 23 % too fast.

A request is only a sample when the conditions under it were those the model saw: the
running plan is re-evaluated on every profile (`reference_seen`), and a request is
skipped when the prediction at its end, the median while it ran and the median until
``settle_s`` after its end differ by more than ``STABLE_SHARE``. The profile lags reality by the monitor's detection time
(3-5 s for a link cut), so without this a request slowed by a cut the profile did not
show yet counted as overhead (+10 ms on a 12 ms TPOT), and one the profile already
charged with it pulled the overhead to 0.
"""

from __future__ import annotations

import asyncio
import statistics
from collections import deque
from collections.abc import Callable
from typing import Any

from services.orchestrator.logic import CandidatePlan
from services.orchestrator.records import TpotTracker
from shared.messages import DecisionRecorded, RequestFinished

OVERHEAD_WINDOW = 96
"""Differences the overhead is the median of (4 requests decoding: the last 15-20 s). With
the last 32 (about 6 s) the window's median still followed slow and fast spells: in 7
bandwidth-drop runs the median of a run's last 8 differences ranged 3.5-11.1 ms while
the whole run's lay at 6.0-9.0."""
CALIBRATE_AFTER_S = 5.0
"""A finished request is counted this long after it ended (the monitor's detection lag)."""
STABLE_SHARE = 0.25
"""A request under which the running plan's prediction moved by more is no sample (a
link cut to a tenth moves it by 100 % and more; profile-to-profile noise is about 10 %)."""
LOAD_SAMPLES = 600
"""Profiles whose entry load and running-plan model are kept (one a second: ten minutes)."""


class OverheadCalibration:
    """Finished requests waiting to be counted and the entry's load over time."""

    def __init__(self, window: int = OVERHEAD_WINDOW, settle_s: float = CALIBRATE_AFTER_S) -> None:
        self.settle_s = settle_s
        self.samples = 0
        self._residuals: deque[float] = deque(maxlen=window)
        """The last ``window`` (TPOT - prediction) differences, seconds, at least 0."""
        self._load: deque[tuple[float, int]] = deque(maxlen=LOAD_SAMPLES)
        """(profile time, requests in flight at the entry), one per profile."""
        self._pending: deque[tuple[float, float, float, CandidatePlan]] = deque(maxlen=4096)
        """Finished requests not yet counted: (start, end Unix s, TPOT s, the plan's model)."""
        self._references: deque[tuple[float, CandidatePlan]] = deque(maxlen=LOAD_SAMPLES)
        """(profile time, the running plan evaluated on that profile)."""
        self.skipped = 0
        """Requests left out because the conditions changed under them."""

    def load_seen(self, at_s: float, in_flight: int) -> None:
        self._load.append((at_s, in_flight))

    def reference_seen(self, at_s: float, model: CandidatePlan) -> None:
        """The running plan evaluated on the profile of ``at_s`` (Unix s)."""
        self._references.append((at_s, model))

    def finished(self, reply: RequestFinished, now_s: float, changed_at_s: float | None,
                 model: CandidatePlan) -> None:  # fmt: skip
        """A request that finished at ``now_s`` (Unix s), the running plan's model then.
        Skipped: one token (no time per token), or a request that straddled the last plan
        change at ``changed_at_s`` (two plans served it)."""
        duration_s = reply.ttft_s + reply.tpot_s * (reply.generated_tokens - 1)
        one_plan = changed_at_s is None or now_s - duration_s >= changed_at_s
        if reply.generated_tokens > 1 and reply.tpot_s > 0 and one_plan:
            self._pending.append((now_s - duration_s, now_s, reply.tpot_s, model))

    def update(self, overhead_s: float, now_s: float, tracker: TpotTracker) -> float:
        """``overhead_s`` with every request that settled by ``now_s`` counted in."""
        while self._pending and self._pending[0][1] <= now_s - self.settle_s:
            start_s, end_s, tpot_s, model = self._pending.popleft()
            load = max(tracker.concurrency(start_s, end_s), self.concurrency(start_s, end_s))
            predicted = self._predicted(model, load, start_s, end_s)
            if predicted is None:
                self.skipped += 1
                continue
            self.samples += 1
            self._residuals.append(max(0.0, tpot_s - predicted))
        return statistics.median(self._residuals) if self._residuals else overhead_s

    def _predicted(self, model: CandidatePlan, load: float, start_s: float, end_s: float) -> float | None:
        """The running plan's prediction for a request that ran from ``start_s`` to
        ``end_s`` at ``load``: the median of the profiles' predictions while it ran (the
        plan's model at its end when no profile fell in between). None when that, the
        prediction at its end and the median of those until ``settle_s`` later differ by
        more than STABLE_SHARE (medians: one noisy profile is not a change)."""
        during = [m.per_token_s(load) for at_s, m in self._references
                  if start_s <= at_s <= end_s and m.segments == model.segments]  # fmt: skip
        after = [m.per_token_s(load) for at_s, m in self._references
                 if end_s < at_s <= end_s + self.settle_s and m.segments == model.segments]  # fmt: skip
        values = [model.per_token_s(load)] + [statistics.median(v) for v in (during, after) if v]
        if max(values) > (1 + STABLE_SHARE) * min(values):
            return None
        return statistics.median(during) if during else model.per_token_s(load)

    def concurrency(self, start_s: float, end_s: float) -> float:
        """Mean requests in flight at the entry between two Unix times, from the profiles
        (1 when none fell in the interval)."""
        seen = [count for at_s, count in self._load if start_s <= at_s <= end_s]
        return max(1.0, sum(seen) / len(seen)) if seen else 1.0


async def realised_effect(tracker: TpotTracker, record: DecisionRecorded, committed_s: float,
                          observe_s: float, clock: Callable[[], float]) -> dict[str, Any] | None:  # fmt: skip
    """The realised effect of a committed change, once requests that started after
    ``committed_s`` (Unix s) finished: waits ``observe_s``, then for such requests at most
    6 x ``observe_s`` after the commit. The record's update, or None when none finished."""
    await asyncio.sleep(observe_s)
    while True:
        tpot, count = tracker.after(committed_s)
        if tpot is not None or clock() >= committed_s + 6 * observe_s:
            break
        await asyncio.sleep(observe_s / 2)
    if tpot is None:
        return None
    gain = None if record.baseline_tpot_s is None else (record.baseline_tpot_s - tpot) * record.horizon_tokens
    return {"realised_tpot_s": tpot, "realised_requests": count, "realised_gain_s": gain}
