"""The site-to-regional bridge: its topics are the registry's control plane, and a real
Mosquitto with it passes control messages across and keeps activations on the site."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

import numpy as np
import pytest

from shared.bridge_config import (
    TEMPLATE,
    bridged_topics,
    local_topics,
    main,
    render,
    template_topics,
)
from shared.broker import LocalBroker, free_port
from shared.bus import Bus
from shared.config import BusSettings
from shared.errors import ConfigError
from shared.frame_headers import ActivationHeader
from shared.messages import TokenGenerated
from shared.topics import ACTIVATIONS, REGISTRY, REPLIES


def test_template_topics_are_the_registry_control_plane() -> None:
    assert template_topics(TEMPLATE.read_text()) == bridged_topics()
    control = {t.pattern for t in REGISTRY.values() if t.plane == "control"}
    assert len(bridged_topics()) == len(control) and local_topics() == ["nodes/+/activations"]
    assert not any("activations" in line for line in TEMPLATE.read_text().splitlines() if line.startswith("topic"))


def test_render_fills_placeholders_and_refuses_bad_values(capsys: pytest.CaptureFixture[str]) -> None:
    text = render("demo", "site1", "regional.example:1883")
    assert "address regional.example:1883" in text and "remote_clientid edgesplit-bridge-site1" in text
    assert "topic plan/current both 1 edgesplit/demo/ edgesplit/demo/" in text and "{" not in text
    for cluster, site, regional in (("a/b", "s", "h:1"), ("c", "s#", "h:1"), ("c", "s", "h"), ("c", "s", "h:0")):
        with pytest.raises(ConfigError):
            render(cluster, site, regional)
    assert main(["--cluster", "c", "--site", "s", "--regional", "nohost"]) == 2
    assert capsys.readouterr().err.startswith("bridge_config: --regional")


class _SiteBroker(LocalBroker):
    bridge = ""

    def render_config(self) -> str:
        return super().render_config() + "\n" + self.bridge


def _settings(url: str, cluster: str) -> BusSettings:
    return BusSettings(broker_url=url, cluster=cluster, connect_timeout_s=3.0)  # type: ignore[arg-type]


def test_a_real_bridge_carries_control_and_keeps_activations_on_site(broker: LocalBroker, tmp_path: Path) -> None:
    cluster = "br" + secrets.token_hex(3)
    site = _SiteBroker(port=free_port(), data_dir=tmp_path / "site")
    site.bridge = render(cluster, "s1", f"127.0.0.1:{broker.port}")
    site.start()
    token = TokenGenerated(request_id="r1", index=0, token_id=7, text="x")  # type: ignore[arg-type]
    header = ActivationHeader(request_id="r1", step=0, epoch=1, seq=1, target=0, pos=0,  # type: ignore[arg-type]
                              last_only=False, pass_id=1)  # fmt: skip

    async def main_() -> None:
        async with (
            Bus(_settings(site.url, cluster), origin="w1") as on_site,
            Bus(_settings(broker.url, cluster), origin="ctl") as regional,
            regional.subscribe(REPLIES, client="c1") as replies,
            regional.subscribe(ACTIVATIONS) as frames,
            on_site.subscribe(ACTIVATIONS) as site_frames,
        ):
            async with asyncio.timeout(10):  # the bridge connects and subscribes in its own time
                while True:
                    await on_site.publish(REPLIES, token, client="c1")
                    try:
                        async with asyncio.timeout(0.5):
                            assert (await replies.get()).message == token
                            break
                    except TimeoutError:
                        continue
            await on_site.publish_frame(ACTIVATIONS, header, np.zeros(8, np.float32), node="w2")
            assert (await site_frames.get()).params == {"node": "w2"}
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(1.0):
                    await frames.get()

    try:
        asyncio.run(asyncio.wait_for(main_(), 30))
    finally:
        site.close()

