"""Helpers of the user-surface tests (tests/integration/test_surfaces.py): scraping a
process's /metrics, following the committed plan on the bus, keeping traffic flowing
through the gateway, and provoking a re-plan of a running `edgesplit up`."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import openai
from prometheus_client.parser import text_string_to_metric_families

from shared.bus import Bus
from shared.config import BusSettings
from shared.messages import Plan
from shared.topics import PLAN

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def metrics_targets(run_dir: Path) -> dict[str, str]:
    """The service -> host:port that `up` recorded in RUN/metrics-targets.json."""
    groups = json.loads((run_dir / "metrics-targets.json").read_text())
    return {group["labels"]["service"]: group["targets"][0] for group in groups}


def scrape(address: str) -> Samples:
    """One /metrics scrape: (sample name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=20) as answer:  # noqa: S310
        text = answer.read().decode()
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(value for (sample, have), value in samples.items()
               if sample == name and set(labels.items()) <= set(have))  # fmt: skip


def has(samples: Samples, name: str) -> bool:
    return any(sample == name for sample, _ in samples)


class PlanWatch:
    """Follows ``plan/current`` on a thread of its own: each epoch and when it arrived
    (time.monotonic())."""

    def __init__(self, broker_url: str, cluster: str) -> None:
        self.settings = BusSettings(broker_url=broker_url, cluster=cluster)
        self.arrived: dict[int, tuple[Plan, float]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._follow()), daemon=True)
        self._thread.start()

    async def _follow(self) -> None:
        async with Bus(self.settings) as bus, bus.subscribe(PLAN) as plans:
            while not self._stop.is_set():
                try:
                    async with asyncio.timeout(0.2):
                        _, plan = await plans.get()
                except TimeoutError:
                    continue
                with self._lock:
                    self.arrived.setdefault(plan.epoch, (plan, time.monotonic()))

    def latest(self, timeout_s: float = 30.0) -> Plan:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if self.arrived:
                    return self.arrived[max(self.arrived)][0]
            time.sleep(0.1)
        raise AssertionError(f"no plan on the bus within {timeout_s} s")

    def after(self, epoch: int, timeout_s: float) -> tuple[Plan, float]:
        """The first plan newer than ``epoch`` and when it arrived."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                newer = sorted(e for e in self.arrived if e > epoch)
                if newer:
                    return self.arrived[newer[0]]
            time.sleep(0.05)
        raise AssertionError(f"no plan after epoch {epoch} within {timeout_s} s")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


class Traffic:
    """Greedy completions through the gateway, back to back on a thread, until closed."""

    def __init__(self, api: openai.OpenAI, model: str, tokens: int = 24) -> None:
        self.api, self.model, self.tokens = api, model, tokens
        self.completed = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.api.completions.create(model=self.model, prompt="the road side unit", max_tokens=self.tokens,
                                            temperature=0)  # fmt: skip
                self.completed += 1
            except openai.APIError as error:  # a re-plan may refuse one (typed); counted, not hidden
                self.errors.append(str(error))
                time.sleep(0.2)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=120)


def worker_pids(cluster: str, node: str) -> list[int]:
    """The pids of `python -m services.worker --node-id NODE ... --cluster CLUSTER` (the
    workers `up` started for this test's own cluster id)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [word.decode(errors="replace") for word in argv]
        if ("services.worker" in words and _after(words, "--node-id") == node
                and _after(words, "--cluster") == cluster):  # fmt: skip
            found.append(int(entry.name))
    return found


def _after(words: list[str], flag: str) -> str | None:
    return words[words.index(flag) + 1] if flag in words and words.index(flag) + 1 < len(words) else None


def provoke_replan(plan: Plan, cluster: str, broker_url: str, env: dict[str, str]) -> str:
    """Make the running system re-plan away from ``plan``: kill a non-entry node it uses
    (NodeDown, an emergency re-plan), or, when the entry runs everything, slow the entry
    30x (with traffic flowing, its measured block times make the plan degraded). Says which."""
    others = [segment.node for segment in plan.segments if segment.node != plan.entry_node]
    if others:
        pids = worker_pids(cluster, others[-1])
        assert pids, f"no worker process of {others[-1]} in cluster {cluster}"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        return f"killed {others[-1]}"
    done = subprocess.run([sys.executable, "-m", "services.cli", "emulate", plan.entry_node, "--slowdown", "30",
                           "--broker", broker_url, "--cluster", cluster],
                          capture_output=True, text=True, timeout=60, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return f"slowed {plan.entry_node} 30x"
