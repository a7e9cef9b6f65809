"""Several hosts for real: the stack over network namespaces joined by a bridge, links
shaped and cut by the kernel (tests/integration/netns.py). Slow tier; root only."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from shared.bus import Bus
from shared.messages import CapacityProfile, LinkCapacity, Plan, RequestFinished, TokenGenerated
from shared.model.shard import write_shards
from shared.model.shard_files import ShardFiles
from shared.model.tiny import write_tiny_checkpoint
from shared.topics import CAPACITY
from tests.integration.cluster import (
    KEY_ENV,
    TEST_SIGNING_KEY,
    make_plan,
    publish_plan,
    settings_for,
)
from tests.integration.fullstack import ROOT
from tests.integration.netns import Hosts, unavailable_reason
from tests.integration.netns_stack import BROKER_PORT, NetnsStack, start_broker, start_shard_server

_REASON = unavailable_reason()
if _REASON is not None:
    print(f"test_netns skipped: {_REASON}", file=sys.stderr)
pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]  # fmt: skip

BLOCKS_2 = 380e3
"""Memory for two blocks of the tiny model and their caches: a plan needs three nodes."""
NODES = (("car", 2, 0.5, BLOCKS_2), ("rsu", 1, 1.0, BLOCKS_2), ("mec", 0, 1.0, BLOCKS_2),
         ("spare", 1, 1.0, BLOCKS_2))  # fmt: skip
PLACEMENT = {"car": 1, "rsu": 1, "mec": 2, "spare": 3}
"""Host 0: broker, control services, shard server; car and rsu share host 1."""
MB = 1e6


@pytest.fixture
def site(tmp_path: Path) -> Iterator[NetnsStack]:
    torch.set_num_threads(1)
    hosts = Hosts(4).open()
    stack: NetnsStack | None = None
    try:
        start_broker_process = start_broker(hosts, 0, tmp_path / "broker")
        url = f"mqtt://{hosts.address(0)}:{BROKER_PORT}"
        stack = NetnsStack(url, "ns" + hosts.tag[2:], tmp_path, NODES, "car", hosts=hosts, placement=PLACEMENT)
        stack.processes["mosquitto"] = start_broker_process
        server, stack.shards_url = start_shard_server(hosts, 0, stack.shards, tmp_path / "serve-shards.log")
        stack.processes["serve-shards"] = server
        stack.start(timeout_s=150)
        yield stack
    finally:
        if stack is not None:
            stack.stop()
        hosts.close()


async def _generate_while(site: NetnsStack, fault: object, prompt: tuple[int, ...], tokens: int) -> RequestFinished:
    """One request; after its 5th token, ``fault()`` runs; returns the finished request."""
    started = asyncio.Event()

    def on_token(token: TokenGenerated) -> None:
        if token.index >= 4:
            started.set()

    task = asyncio.create_task(_request(site, prompt, tokens, on_token))
    async with asyncio.timeout(60):
        await started.wait()
    fault()  # type: ignore[operator]
    return await task


async def _request(site: NetnsStack, prompt: tuple[int, ...], tokens: int, on_token: object) -> RequestFinished:
    from services.cli.client import ClientOptions, request
    from shared.messages import GenerateRequest

    def make(client: str) -> GenerateRequest:
        return GenerateRequest(request_id=f"r{time.monotonic_ns()}", reply_to=client, token_ids=prompt,  # type: ignore[arg-type]
                               max_new_tokens=tokens, timeout_s=120)  # fmt: skip
    result = await request(ClientOptions(site.settings, timeout_s=120), make, on_token)  # type: ignore[arg-type]
    assert isinstance(result, RequestFinished), result
    return result


async def _link_estimate(site: NetnsStack, dst: str, expected: float, timeout_s: float) -> LinkCapacity:
    """The first link into ``dst`` whose bandwidth estimate comes within 25 % of ``expected``
    (AssertionError with the last estimates after ``timeout_s``)."""
    last: dict[tuple[str, str], float] = {}
    async with Bus(site.settings) as bus, bus.subscribe(CAPACITY) as profiles:
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    _, profile = await profiles.get()
                    assert isinstance(profile, CapacityProfile)
                    for link in profile.links:
                        if link.dst == dst and link.bandwidth_source == "probe":
                            last[(link.src, link.dst)] = link.bandwidth_bytes_per_s
                            if abs(link.bandwidth_bytes_per_s - expected) <= 0.25 * expected:
                                return link
        except TimeoutError:
            raise AssertionError(f"no estimate into {dst} within 25 % of {expected:.0f} B/s: {last}") from None


def _victim(plan: Plan, alone: bool) -> str:
    """A node of ``plan`` other than the entry; ``alone``: one with a host of its own."""
    nodes = [s.node for s in plan.segments if s.node != plan.entry_node]
    if alone:
        nodes = [n for n in nodes if list(PLACEMENT.values()).count(PLACEMENT[n]) == 1]
    assert nodes, plan
    return nodes[-1]


def test_tokens_across_hosts_match_local_and_tbf_shaping_is_measured(site: NetnsStack) -> None:
    prompt = (5, 17, 99, 3)
    plan = asyncio.run(site.current_plan())
    hosts_used = {PLACEMENT[s.node] for s in plan.segments}
    assert len(hosts_used) >= 2, plan  # the pipeline crosses hosts
    assert plan.manifest_sha256 == ShardFiles(site.shards).manifest_sha256  # pinned by the orchestrator
    result = asyncio.run(_request(site, prompt, 24, None))
    assert result.token_ids == site.expected(prompt, 24)
    assert site.hosts is not None
    target = _victim(plan, alone=True)
    site.hosts.shape(PLACEMENT[target], 1 * MB)
    began = time.monotonic()
    link = asyncio.run(_link_estimate(site, target, 1 * MB, 40))
    print(f"tc tbf 1 MB/s into {target}: {link.src}->{link.dst} estimated "
          f"{link.bandwidth_bytes_per_s / MB:.3f} MB/s after {time.monotonic() - began:.1f} s")  # fmt: skip
    result = asyncio.run(_request(site, prompt, 24, None))  # still identical over the shaped link
    assert result.token_ids == site.expected(prompt, 24)


def test_a_worker_killed_mid_generation_loses_no_token(site: NetnsStack) -> None:
    prompt = (11, 12, 13, 14)
    plan = asyncio.run(site.current_plan())
    victim = _victim(plan, alone=False)
    result = asyncio.run(_generate_while(site, lambda: site.kill(victim), prompt, 60))
    assert result.token_ids == site.expected(prompt, 60)
    after = asyncio.run(site.current_plan())
    assert victim not in {s.node for s in after.segments}, after


def test_a_cut_link_mid_generation_loses_no_token(site: NetnsStack) -> None:
    prompt = (200, 100, 50, 25)
    plan = asyncio.run(site.current_plan())
    victim = _victim(plan, alone=True)
    assert site.hosts is not None
    hosts = site.hosts
    result = asyncio.run(_generate_while(site, lambda: hosts.cut(PLACEMENT[victim]), prompt, 60))
    assert result.token_ids == site.expected(prompt, 60)
    after = asyncio.run(site.current_plan())
    assert victim not in {s.node for s in after.segments}, after


def test_workers_fetch_shards_from_another_host_and_refuse_a_tampered_one(tmp_path: Path) -> None:
    model = write_tiny_checkpoint("llama", tmp_path / "model", layers=4, seed=12)
    write_shards(model, tmp_path / "shards")
    tampered = tmp_path / "tampered"
    shutil.copytree(tmp_path / "shards", tampered)
    block = tampered / "block-003.safetensors"
    data = bytearray(block.read_bytes())
    data[-40] ^= 0x01
    block.write_bytes(bytes(data))
    pin = ShardFiles(tmp_path / "shards").manifest_sha256
    hosts = Hosts(3).open()
    processes = []
    try:
        processes.append(start_broker(hosts, 0, tmp_path / "broker"))
        server, good_url = start_shard_server(hosts, 0, tmp_path / "shards", tmp_path / "good.log")
        processes.append(server)
        settings = settings_for(f"mqtt://{hosts.address(0)}:{BROKER_PORT}", "nsh" + hosts.tag[2:])
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **KEY_ENV,
               "EDGESPLIT_PROBE_PERIOD_S": "0", "EDGESPLIT_BENCHMARK": "false"}  # fmt: skip
        bad = tmp_path / "bad-server"  # the tampered copy served from host 2 itself
        processes.append(hosts.spawn(2, [sys.executable, "-m", "services.cli", "serve-shards", str(tampered),
                                         "--host", hosts.address(2), "--port", "8766"], bad.with_suffix(".log"),
                                     cwd=ROOT))  # fmt: skip
        bad_url = f"http://{hosts.address(2)}:8766/"
        for node, host, url in (("car", 1, good_url), ("mec", 2, good_url), ("rsu", 1, bad_url)):
            argv = [sys.executable, "-m", "services.worker", "--node-id", node, "--shards-url", url,
                    "--broker", settings.broker_url, "--cluster", settings.cluster, "--threads", "1"]  # fmt: skip
            processes.append(hosts.spawn(host, argv, tmp_path / f"{node}.log",
                                         env={**env, "EDGESPLIT_SHARD_CACHE_DIR": str(tmp_path / f"cache-{node}")},
                                         cwd=ROOT))  # fmt: skip
        plan = make_plan(1, "car", (("car", 0, 2), ("mec", 2, 4)), TEST_SIGNING_KEY, manifest_sha256=pin)
        assert not asyncio.run(publish_plan(settings, plan, timeout_s=120))
        assert "block-003.safetensors" in {p.name for p in (tmp_path / "cache-mec" / pin).iterdir()}
        refused = make_plan(2, "car", (("car", 0, 2), ("rsu", 2, 4)), TEST_SIGNING_KEY, manifest_sha256=pin)
        assert asyncio.run(publish_plan(settings, refused, timeout_s=120)) == {"rsu"}
        log = (tmp_path / "rsu.log").read_text(errors="replace")
        assert f"block-003.safetensors from {bad_url}block-003.safetensors" in log, log[-2000:]
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=15)
        hosts.close()
