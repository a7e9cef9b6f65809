"""The overhead calibration counts a finished request only when the running plan's
prediction stayed put from its start until the monitor could have shown a change."""

from __future__ import annotations

from services.orchestrator.calibration import OverheadCalibration
from services.orchestrator.logic import CandidatePlan
from services.orchestrator.records import TpotTracker
from shared.messages import RequestFinished, Segment

PLAN = (Segment(node="car", start=0, end=2), Segment(node="mec", start=2, end=6))  # type: ignore[arg-type]


def model(latency_s: float) -> CandidatePlan:
    return CandidatePlan(kind="current", segments=PLAN, latency_s=latency_s, bottleneck_s=latency_s)


def finished(tpot_s: float, tokens: int = 11) -> RequestFinished:
    return RequestFinished(request_id="r1", token_ids=tuple(range(tokens)), ttft_s=0.0, tpot_s=tpot_s)  # type: ignore[arg-type]


def test_a_request_under_stable_predictions_is_a_sample() -> None:
    calibration, tracker = OverheadCalibration(settle_s=5.0), TpotTracker()
    for at_s in (100.0, 101.0, 102.0, 104.0, 106.0):
        calibration.reference_seen(at_s, model(0.010))
    calibration.finished(finished(0.012), 101.0, None, model(0.010))  # ran 100.0-101.0
    assert calibration.update(0.0, 105.9, tracker) == 0.0  # not settled yet
    assert abs(calibration.update(0.0, 106.0, tracker) - 0.002) < 1e-12
    assert (calibration.samples, calibration.skipped) == (1, 0)


def test_one_noisy_profile_is_not_a_change() -> None:
    calibration, tracker = OverheadCalibration(settle_s=5.0), TpotTracker()
    for at_s, latency_s in ((100.0, 0.010), (100.5, 0.014), (101.0, 0.010), (103.0, 0.010), (104.0, 0.0105)):
        calibration.reference_seen(at_s, model(latency_s))
    calibration.finished(finished(0.012), 101.0, None, model(0.010))
    calibration.update(0.0, 106.0, tracker)
    assert (calibration.samples, calibration.skipped) == (1, 0)


def test_a_request_slowed_by_a_change_the_profile_showed_later_is_skipped() -> None:
    """A link cut at 100.5 s: the request is slow, the profile shows it at 104 s."""
    calibration, tracker = OverheadCalibration(settle_s=5.0), TpotTracker()
    for at_s, latency_s in ((100.0, 0.010), (101.0, 0.010), (104.0, 0.025), (105.0, 0.025)):
        calibration.reference_seen(at_s, model(latency_s))
    calibration.finished(finished(0.030), 101.0, None, model(0.010))
    assert calibration.update(0.001, 106.0, tracker) == 0.001
    assert (calibration.samples, calibration.skipped) == (0, 1)


def test_a_burst_of_slow_requests_moves_the_overhead_little() -> None:
    """The overhead is a median: 8 requests 6 ms slower than usual among 24 barely move
    it (a running mean smoothed with 0.2 rose from 4 ms to over 9 ms on such a burst)."""
    calibration, tracker = OverheadCalibration(settle_s=5.0), TpotTracker()
    for second in range(40):
        calibration.reference_seen(100.0 + second, model(0.010))
    for index in range(32):
        slow = 24 <= index < 32
        calibration.finished(finished(0.020 if slow else 0.014), 101.0 + index * 0.25, None, model(0.010))
    overhead = calibration.update(0.0, 200.0, tracker)
    assert calibration.samples == 32
    assert abs(overhead - 0.004) < 1e-9


def test_the_difference_is_taken_against_the_prediction_while_the_request_ran() -> None:
    """The model of the last decision (8 ms) is stale; the profiles while the request ran
    predicted 10 ms (within the stable band of each other), so the overhead is 2 ms."""
    calibration, tracker = OverheadCalibration(settle_s=5.0), TpotTracker()
    for at_s in (100.0, 100.5, 101.0, 103.0):
        calibration.reference_seen(at_s, model(0.010))
    calibration.finished(finished(0.012), 101.0, None, model(0.009))
    assert abs(calibration.update(0.0, 106.0, tracker) - 0.002) < 1e-12


def test_the_window_forgets_old_requests() -> None:
    calibration, tracker = OverheadCalibration(window=4, settle_s=5.0), TpotTracker()
    for second in range(30):
        calibration.reference_seen(100.0 + second, model(0.010))
    for index, tpot_s in enumerate((0.011, 0.011, 0.011, 0.011, 0.015, 0.015, 0.015, 0.015)):
        calibration.finished(finished(tpot_s), 101.0 + index, None, model(0.010))
    assert abs(calibration.update(0.0, 200.0, tracker) - 0.005) < 1e-12


def test_the_copy_without_content_calibrates_like_the_full_reply() -> None:
    """requests/finished carries no tokens or text (issue #17, item 5), only counts."""
    full = finished(0.012)
    bare = full.without_content()
    assert bare.token_ids == () and bare.text == "" and bare.generated_tokens == 11
    results = []
    for reply in (full, bare):
        calibration, tracker = OverheadCalibration(settle_s=5.0), TpotTracker()
        calibration.reference_seen(100.0, model(0.010))
        calibration.reference_seen(106.0, model(0.010))
        calibration.finished(reply, 101.0, None, model(0.010))
        tracker.add(reply, 101.0)
        results.append((calibration.update(0.0, 106.0, tracker), tracker.tokens_per_s(101.0)))
    assert results[0] == results[1] and results[0][1] > 0
