"""The bus against a real Mosquitto: round trips, retained birth, Last Will, reconnect."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiomqtt
import numpy as np
import pytest

from shared.broker import LocalBroker, free_port
from shared.bus import Announcement, Bus, Delivery
from shared.config import BusSettings
from shared.errors import BrokerUnavailable
from shared.frame_headers import ActivationHeader, ResultHeader
from shared.messages import NodeStatus, Telemetry, TokenGenerated
from shared.tensor_frame import Frame
from shared.topics import ACTIVATIONS, NODE_STATUS, REPLIES, TELEMETRY

ROOT = Path(__file__).resolve().parents[2]
PROTOCOLS = ["3.1.1", "5", "auto"]


def run(main: Callable[[], Awaitable[None]], timeout_s: float = 20.0) -> None:
    """Run an async test body under a deadline."""

    async def guarded() -> None:
        async with asyncio.timeout(timeout_s):
            await main()

    asyncio.run(guarded())


def settings_for(url: str, cluster: str, protocol: str = "auto", **extra: object) -> BusSettings:
    values: dict[str, object] = {"connect_timeout_s": 3.0, "reconnect_initial_s": 0.05,
                                  "reconnect_max_s": 0.5, **extra}  # fmt: skip
    return BusSettings(broker_url=url, cluster=cluster, protocol=protocol, **values)  # type: ignore[arg-type]


def status(node: str, state: str = "online") -> NodeStatus:
    return NodeStatus(node=node, state=state, trust=1, memory_bytes=10**8, threads=1)  # type: ignore[arg-type]


def presence(node: str) -> dict[str, Announcement[NodeStatus]]:
    return {
        "birth": Announcement(NODE_STATUS, status(node), {"node": node}),
        "will": Announcement(NODE_STATUS, status(node, "offline"), {"node": node}),
    }


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_control_and_frame_round_trip(broker: LocalBroker, cluster: str, protocol: str) -> None:
    async def main() -> None:
        async with Bus(settings_for(broker.url, cluster, protocol), origin="w1") as bus:
            assert bus.protocol is not None and bus.protocol.name == (
                "V311" if protocol == "3.1.1" else "V5"
            )
            async with (
                bus.subscribe(REPLIES, client="cli-1") as replies,
                bus.subscribe(ACTIVATIONS, node="w2") as frames,
            ):
                assert bus.ready.is_set()
                token = TokenGenerated(request_id="r1", index=0, token_id=42, text=" Paris")
                await bus.publish(REPLIES, token, client="cli-1")
                delivery = await replies.get()
                params, message = delivery
                assert (params, message) == ({"client": "cli-1"}, token)
                assert delivery.envelope is not None and delivery.envelope.origin == "w1"

                tensor = np.random.default_rng(0).standard_normal((128, 576), dtype=np.float32)
                header = ActivationHeader(request_id="r1", step=0, epoch=3, seq=1, target=0, pos=0,  # type: ignore[arg-type]
                                          last_only=False, pass_id=1)  # fmt: skip
                await bus.publish_frame(ACTIVATIONS, header, tensor, node="w2")
                frame: Delivery[Frame] = await frames.get()
                assert frame.params == {"node": "w2"} and frame.message.header == header
                assert np.array_equal(frame.message.array, tensor)

    run(main)


def test_retained_birth_reaches_a_late_subscriber(broker: LocalBroker, cluster: str) -> None:
    async def first_status(settings: BusSettings) -> Delivery[NodeStatus]:
        async with Bus(settings) as monitor, monitor.subscribe(NODE_STATUS) as statuses:
            return await statuses.get()

    async def main() -> None:
        settings = settings_for(broker.url, cluster)
        async with Bus(settings, **presence("w1")) as worker:
            await worker.wait_ready()
            birth = await first_status(settings)
            assert birth.retained and birth.params == {"node": "w1"}
            assert birth.message.state == "online"
        # a clean exit sends no Last Will: the bus published the offline status itself
        goodbye = await first_status(settings)
        assert goodbye.retained and goodbye.message.state == "offline"

    run(main)


CHILD = """
import asyncio, sys
from shared.bus import Announcement, Bus
from shared.config import BusSettings
from shared.messages import NodeStatus
from shared.topics import NODE_STATUS

async def main():
    settings = BusSettings(broker_url=sys.argv[1], cluster=sys.argv[2], protocol=sys.argv[3])
    def status(state):
        return NodeStatus(node="doomed", state=state, trust=0, memory_bytes=1, threads=1)
    async with Bus(settings, birth=Announcement(NODE_STATUS, status("online"), {"node": "doomed"}),
                   will=Announcement(NODE_STATUS, status("offline"), {"node": "doomed"})) as bus:
        await bus.wait_ready()
        print("ready", flush=True)
        await asyncio.Event().wait()

asyncio.run(main())
"""


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_last_will_arrives_when_the_process_is_killed(
    broker: LocalBroker, cluster: str, protocol: str
) -> None:
    async def main() -> None:
        async with Bus(settings_for(broker.url, cluster)) as monitor:
            async with monitor.subscribe(NODE_STATUS, node="doomed") as statuses:
                child = await asyncio.create_subprocess_exec(
                    sys.executable, "-c", CHILD, broker.url, cluster, protocol,
                    stdout=asyncio.subprocess.PIPE, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                )  # fmt: skip
                try:
                    assert child.stdout is not None
                    assert await child.stdout.readline() == b"ready\n"
                    assert (await statuses.get()).message.state == "online"
                    child.send_signal(signal.SIGKILL)
                    will = await statuses.get()
                    assert will.message.state == "offline" and will.params == {"node": "doomed"}
                finally:
                    if child.returncode is None:
                        child.kill()
                    await child.wait()

    run(main, timeout_s=30)


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_reconnects_and_resubscribes_after_broker_restart(
    own_broker: LocalBroker, cluster: str, protocol: str
) -> None:
    async def main() -> None:
        async with Bus(settings_for(own_broker.url, cluster, protocol), **presence("w1")) as bus:
            async with (
                bus.subscribe(TELEMETRY) as telemetry,
                bus.subscribe(NODE_STATUS) as statuses,
            ):
                assert (await statuses.get()).message.state == "online"
                sessions = bus.sessions
                own_broker.stop()
                own_broker.start()
                await bus.wait_ready(min_sessions=sessions + 2, timeout_s=10)
                async with Bus(settings_for(own_broker.url, cluster, protocol)) as other:
                    sample = Telemetry(node="w2", window_s=1.0, cpu_utilisation=0.5,
                                       memory_used_bytes=1, requests_in_flight=0)  # fmt: skip
                    await other.publish(TELEMETRY, sample, node="w2")
                    assert (await telemetry.get()).message == sample
                # Mosquitto may publish our Last Will as it shuts down (retained "offline");
                # the birth republished after the reconnect must end with "online".
                async for delivery in statuses:
                    if delivery.message.state == "online":
                        break

    run(main, timeout_s=30)


def test_malformed_payloads_are_dropped_and_the_reader_survives(
    broker: LocalBroker, cluster: str
) -> None:
    async def main() -> None:
        async with Bus(settings_for(broker.url, cluster)) as bus:
            async with bus.subscribe(TELEMETRY) as telemetry, bus.subscribe(ACTIVATIONS) as frames:
                async with aiomqtt.Client("127.0.0.1", broker.port) as raw:
                    for garbage in (b"", b"\xc1", b"\xdd\xff\xff\xff\xff", b"\x91" * 100_000):
                        await raw.publish(TELEMETRY.topic(cluster, node="w9"), garbage, qos=1)
                    await raw.publish(ACTIVATIONS.topic(cluster, node="w9"), b"ESF2junk", qos=1)
                sample = Telemetry(node="w1", window_s=1.0, cpu_utilisation=0.1,
                                   memory_used_bytes=1, requests_in_flight=0)  # fmt: skip
                await bus.publish(TELEMETRY, sample, node="w1")
                assert (await telemetry.get()).message == sample
                header = ResultHeader(request_id="r", step=1, epoch=0, seq=2, pass_id=1)  # type: ignore[arg-type]
                await bus.publish_frame(ACTIVATIONS, header, np.zeros(576, np.float32), node="w1")
                assert (await frames.get()).message.header == header
                assert bus.counters[f"malformed:{TELEMETRY.pattern}"] == 4
                assert bus.counters[f"malformed:{ACTIVATIONS.pattern}"] == 1

    run(main)


def test_no_broker_is_broker_unavailable_within_the_deadline(cluster: str) -> None:
    async def main() -> None:
        settings = settings_for(f"mqtt://127.0.0.1:{free_port()}", cluster, connect_timeout_s=1.0)
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(BrokerUnavailable, match="no MQTT broker answered"):
            async with Bus(settings):
                pass
        assert loop.time() - start < 2.0

    run(main)


async def _v311_only_proxy(broker_port: int) -> asyncio.Server:
    """A front for Mosquitto that answers MQTT 5 CONNECTs like a 3.1.1-only broker."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readexactly(2)
        while head[-1] & 0x80:  # remaining-length varint
            head += await reader.readexactly(1)
        head += await reader.readexactly(7)  # 00 04 'MQTT' level
        if head[-1] == 5:
            writer.write(b"\x20\x02\x00\x01")  # CONNACK: unacceptable protocol version
            await writer.drain()
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", broker_port)
        up_writer.write(head)
        async with asyncio.TaskGroup() as group:
            group.create_task(pipe(reader, up_writer))
            group.create_task(pipe(up_reader, writer))

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def test_auto_falls_back_to_mqtt_311(broker: LocalBroker, cluster: str) -> None:
    async def main() -> None:
        server = await _v311_only_proxy(broker.port)
        port = server.sockets[0].getsockname()[1]
        async with server:
            async with Bus(settings_for(f"mqtt://127.0.0.1:{port}", cluster, "auto")) as bus:
                assert bus.protocol is not None and bus.protocol.name == "V311"
                async with bus.subscribe(NODE_STATUS, node="w1") as statuses:
                    await bus.publish(NODE_STATUS, status("w1"), node="w1")
                    assert (await statuses.get()).message == status("w1")
            server.close()

    run(main)


def test_full_queue_drops_oldest_for_state_topics_and_newest_for_frames(cluster: str) -> None:
    async def main() -> None:
        bus = Bus(settings_for("mqtt://127.0.0.1:1", cluster))  # no I/O until entered
        telemetry = bus.subscribe(TELEMETRY, queue_size=2)
        frames = bus.subscribe(ACTIVATIONS, queue_size=2)
        for index in range(5):
            telemetry.offer(Delivery({"node": "w1"}, index, None, False))
            frames.offer(Delivery({"node": "w1"}, index, None, False))
        assert [(await telemetry.get()).message for _ in range(2)] == [3, 4]
        assert [(await frames.get()).message for _ in range(2)] == [0, 1]
        assert telemetry.dropped == frames.dropped == 3
        assert bus.counters[f"overflow:{TELEMETRY.pattern}"] == 3

    run(main)


def test_errors_and_cancellation_pass_through_unchanged(broker: LocalBroker, cluster: str) -> None:
    async def main() -> None:
        settings = settings_for(broker.url, cluster)
        with pytest.raises(KeyError):
            async with Bus(settings):
                raise KeyError("from the service")
        started = asyncio.Event()

        async def serve() -> None:
            async with Bus(settings) as bus, bus.subscribe(TELEMETRY) as telemetry:
                started.set()
                async for _ in telemetry:
                    pass

        async with asyncio.TaskGroup() as group:
            service = group.create_task(serve())
            await started.wait()
            service.cancel()
        assert service.cancelled()

    run(main)
