"""The operator's surfaces on a running `edgesplit up` (real Mosquitto, real worker
processes, a tiny random checkpoint): every process's Prometheus /metrics during
generations and a re-plan, and the gateway's dashboard in Debian's headless chromium."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.broker import LocalBroker
from tests.integration.surfaces import (
    PlanWatch,
    Samples,
    Traffic,
    has,
    metrics_targets,
    provoke_replan,
    scrape,
    total,
)
from tests.integration.test_gateway import Site, _up

pytestmark = [pytest.mark.integration, pytest.mark.slow]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ARTEFACTS = Path(os.environ.get("EDGESPLIT_ARTEFACTS_DIR", Path(__file__).resolve().parents[2] / "tmp" / "artefacts"))
"""Where the browser test keeps its screenshot (tmp/artefacts/ of the checkout unless set)."""
REPLAN_TIMEOUT_S = 240.0
"""A loaded 2-core machine: the slowed entry's block times need a few windows of traffic."""


@pytest.fixture(scope="module")
def site(broker: LocalBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    yield from _up("tiny-llama", broker, tmp_path_factory.mktemp("surfaces"))


@pytest.fixture(scope="module")
def watch(site: Site) -> Iterator[PlanWatch]:
    follower = PlanWatch(site.broker_url, site.cluster)
    try:
        yield follower
    finally:
        follower.close()


def _run_dir(site: Site) -> Path:
    return site.log.parent


def _scrape_all(targets: dict[str, str], skip: set[str] = frozenset()) -> dict[str, Samples]:  # type: ignore[assignment]
    return {name: scrape(address) for name, address in targets.items() if name not in skip}


def test_every_process_serves_metrics_that_move_with_generation_and_a_replan(site: Site, watch: PlanWatch) -> None:
    targets = metrics_targets(_run_dir(site))
    assert set(targets) == {"car", "rsu", "mec", "split-reviser", "monitor", "broadcaster", "orchestrator", "gateway"}
    before = _scrape_all(targets)
    for name, samples in before.items():  # dropped, duplicate and refused messages, everywhere
        for disposition in ("dropped", "duplicate", "refused"):
            assert ("edgesplit_messages_total", (("disposition", disposition),)) in samples, (name, disposition)
    monitor = before["monitor"]
    for series in ("edgesplit_node_utilisation", "edgesplit_node_kv_cache_bytes", "edgesplit_link_bandwidth_bytes_per_second",
                   "edgesplit_link_latency_seconds"):  # fmt: skip
        assert has(monitor, series), series
    assert total(monitor, "edgesplit_link_bandwidth_bytes_per_second", src="car", dst="rsu") > 0
    for node in ("car", "rsu", "mec"):
        assert total(before[node], "edgesplit_weights_moved_bytes_total", node=node) > 0  # warmed blocks
        assert has(before[node], "edgesplit_node_kv_cache_bytes") and has(before[node], "edgesplit_kv_moved_bytes_total")
    assert total(before["orchestrator"], "edgesplit_replans_total", trigger="initial") == 1

    stream = site.api.completions.create(model=site.model, prompt="the edge", max_tokens=8, temperature=0,
                                         stream=True)  # fmt: skip
    tokens = sum(len((choice.model_extra or {}).get("token_ids") or []) for chunk in stream for choice in chunk.choices)
    gateway = scrape(targets["gateway"])
    assert tokens >= 1
    assert total(gateway, "edgesplit_tokens_generated_total") - total(before["gateway"], "edgesplit_tokens_generated_total") == tokens
    assert total(gateway, "edgesplit_time_to_first_token_seconds_count") == total(
        before["gateway"], "edgesplit_time_to_first_token_seconds_count") + 1
    assert total(gateway, "edgesplit_time_per_output_token_seconds_count") >= tokens - 1
    assert total(gateway, "edgesplit_requests_total", kind="generate", outcome="ok") >= 1
    # the entry worker times the same request itself (`up --http off` still has latency)
    entry = str(watch.latest().entry_node)
    at_entry = scrape(targets[entry])
    assert total(at_entry, "edgesplit_time_to_first_token_seconds_count") == total(
        before[entry], "edgesplit_time_to_first_token_seconds_count") + 1
    assert total(at_entry, "edgesplit_time_per_output_token_seconds_count") - total(
        before[entry], "edgesplit_time_per_output_token_seconds_count") == tokens - 1

    plan = watch.latest()
    traffic = Traffic(site.api, site.model)
    try:
        how = provoke_replan(plan, site.cluster, site.broker_url, site.env)
        replanned, _ = watch.after(plan.epoch, REPLAN_TIMEOUT_S)
        completed = traffic.completed
        _until(lambda: traffic.completed > completed, 60, "a generation after the re-plan")
        gone = {how.removeprefix("killed ")} if how.startswith("killed") else set()
        after = _scrape_all(targets, gone)  # while generations run
    finally:
        traffic.close()
    assert total(after["orchestrator"], "edgesplit_replans_total") > total(before["orchestrator"], "edgesplit_replans_total"), how
    assert total(after["broadcaster"], "edgesplit_rollouts_total", outcome="committed") > total(
        before["broadcaster"], "edgesplit_rollouts_total", outcome="committed")
    assert total(after["broadcaster"], "edgesplit_replan_stall_seconds_count", phase="prepare") > total(
        before["broadcaster"], "edgesplit_replan_stall_seconds_count", phase="prepare")
    assert total(after["split-reviser"], "edgesplit_plan_proposals_total") > total(
        before["split-reviser"], "edgesplit_plan_proposals_total")
    assert total(after["orchestrator"], "edgesplit_plan_epoch") >= replanned.epoch
    assert total(after["gateway"], "edgesplit_tokens_generated_total") > total(gateway, "edgesplit_tokens_generated_total")
    assert traffic.completed >= 1, traffic.errors[-3:]


def _browser() -> object:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    assert shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER), (
        "the dashboard test needs Debian's chromium and chromium-driver (make setup installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1280,1150"):  # fmt: skip
        options.add_argument(argument)
    return webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))


SHOWN_JS = """
const bands = [...document.querySelectorAll('#plan rect.band')].map(
  b => [b.dataset.node, Number(b.dataset.start), Number(b.dataset.end)]);
const nodes = [...document.querySelectorAll('#graph g.node')].map(g => g.dataset.node);
return [document.getElementById('epoch').textContent, bands, nodes];
"""
"""The page's epoch, bands and graph nodes, read in one script (the page redraws whole)."""


def _shown(driver: object) -> tuple[str, list[tuple[str, int, int]], set[str]]:
    """The page's epoch, plan bands (node, start, end) and graph nodes, as drawn."""
    epoch, bands, nodes = driver.execute_script(SHOWN_JS)  # type: ignore[attr-defined]
    return str(epoch), [(str(n), int(s), int(e)) for n, s, e in bands], set(nodes)


def _until(condition: object, timeout_s: float, what: str) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()  # type: ignore[operator]
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout_s} s: {what}")


def test_dashboard_shows_the_plan_and_follows_a_replan_within_2_s(site: Site, watch: PlanWatch) -> None:
    base = str(site.api.base_url).removesuffix("/").removesuffix("/v1")
    driver = _browser()
    traffic = None
    try:
        driver.get(f"{base}/dashboard")  # type: ignore[attr-defined]
        plan = watch.latest()
        layout = [(s.node, s.start, s.end) for s in plan.segments]
        _until(lambda: _shown(driver)[0] == str(plan.epoch) and _shown(driver)[1] == layout, 20,
               f"the page shows epoch {plan.epoch} {layout}")  # fmt: skip
        assert {"car", "rsu", "mec"} <= _shown(driver)[2]
        traffic = Traffic(site.api, site.model)
        time.sleep(3)  # a few tokens for the time-per-token chart
        how = provoke_replan(plan, site.cluster, site.broker_url, site.env)
        replanned, arrived_s = watch.after(plan.epoch, REPLAN_TIMEOUT_S)
        _until(lambda: _shown(driver)[0] != str(plan.epoch), 10, "the page leaves the old epoch")
        shown_s = time.monotonic()
        epoch, bands, _ = _shown(driver)
        assert shown_s - arrived_s <= 2.0, f"{how}: the page showed the re-plan {shown_s - arrived_s:.2f} s after the bus"
        newest = watch.latest()
        assert int(epoch) in (replanned.epoch, newest.epoch)
        expected = {e: [(s.node, s.start, s.end) for s in watch.arrived[e][0].segments] for e in watch.arrived}
        _until(lambda: _shown(driver)[1] == expected[int(_shown(driver)[0])], 5, "bands of the shown epoch")
        time.sleep(2)  # let the decision's outcome and a few more tokens arrive before the picture
        ARTEFACTS.mkdir(parents=True, exist_ok=True)
        assert driver.save_screenshot(str(ARTEFACTS / "dashboard.png"))  # type: ignore[attr-defined]
    finally:
        if traffic is not None:
            traffic.close()
        driver.quit()  # type: ignore[attr-defined]
