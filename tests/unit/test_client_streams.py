"""The client library's in-process channels (services/cli/streams.py): a retained feed
gives each listener what a fresh subscription would have seen; a token stream yields
tokens in order, then the final answer or the request's error. No broker."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from services.cli.client import Client
from services.cli.streams import RetainedFeed, TokenStream
from shared.errors import Busy, ConfigError, ServingError
from shared.messages import NodeStatus, RequestFinished, TokenGenerated


class FakeSubscription:
    """Deliveries pushed by the test, as ``(params, message)`` pairs."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[dict[str, str], Any]] = asyncio.Queue()

    def __aiter__(self) -> FakeSubscription:
        return self

    async def __anext__(self) -> tuple[dict[str, str], Any]:
        return await self.queue.get()


def status(node: str, state: str) -> NodeStatus:
    return NodeStatus(node=node, state=state, trust=1, memory_bytes=0, threads=1)  # type: ignore[arg-type]


def token(index: int) -> TokenGenerated:
    return TokenGenerated(request_id="r1", index=index, token_id=100 + index, text=f"t{index}")  # type: ignore[arg-type]


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_a_listener_gets_the_latest_per_key_then_every_later_message() -> None:
    async def scenario() -> None:
        subscription = FakeSubscription()
        feed: RetainedFeed[NodeStatus] = RetainedFeed(subscription, lambda params, _: params["node"])  # type: ignore[arg-type]
        follower = asyncio.create_task(feed.run())
        for node, state in (("car", "online"), ("rsu", "online"), ("car", "offline")):
            subscription.queue.put_nowait(({"node": node}, status(node, state)))
        assert (await feed.wait_for("car", 1.0)) is not None
        await settle()
        seen: list[tuple[str, str]] = []
        with feed.listen() as listener:
            subscription.queue.put_nowait(({"node": "rsu"}, status("rsu", "offline")))
            async with asyncio.timeout(1.0):
                for _ in range(3):
                    _, message = await anext(listener)
                    seen.append((message.node, message.state))
        assert seen == [("car", "offline"), ("rsu", "online"), ("rsu", "offline")]
        assert feed.latest("rsu") == status("rsu", "offline")
        assert await feed.wait_for("mec", 0.05) is None
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)

    asyncio.run(scenario())


def _stream(body: Callable[[Callable[[TokenGenerated], None]], Any]) -> TokenStream:
    return TokenStream(lambda on_token: asyncio.get_running_loop().create_task(body(on_token)))


def test_a_token_stream_yields_tokens_in_order_then_the_answer() -> None:
    finished = RequestFinished(request_id="r1", token_ids=(100, 101), text="t0t1",  # type: ignore[arg-type]
                               finish_reason="length", ttft_s=0.1, tpot_s=0.01)  # fmt: skip

    async def serve(on_token: Callable[[TokenGenerated], None]) -> RequestFinished:
        for index in range(2):
            on_token(token(index))
            await asyncio.sleep(0)
        return finished

    async def scenario() -> None:
        stream = _stream(serve)
        assert [t.index async for t in stream] == [0, 1]
        assert stream.result == finished
        assert [t async for t in stream] == []  # iterating again ends at once
        assert await _stream(serve).collect() == finished

    asyncio.run(scenario())


def test_a_token_stream_raises_the_request_error_and_stops_on_close() -> None:
    async def refused(on_token: Callable[[TokenGenerated], None]) -> RequestFinished:
        on_token(token(0))
        raise Busy("busy: 8 requests in flight")

    async def endless(on_token: Callable[[TokenGenerated], None]) -> RequestFinished:
        await asyncio.sleep(3600)
        raise AssertionError("not reached")

    async def scenario() -> None:
        stream = _stream(refused)
        assert (await anext(stream)).index == 0
        with pytest.raises(Busy):
            await anext(stream)
        stopped = _stream(endless)
        await stopped.aclose()
        with pytest.raises(ServingError, match="stopped"):
            await stopped.collect()

    asyncio.run(scenario())


def test_a_client_needs_async_with_before_requests() -> None:
    client = Client("mqtt://127.0.0.1:1", timeout_s=5.0)
    assert client.options.timeout_s == 5.0 and client.options.settings.broker_url == "mqtt://127.0.0.1:1"
    with pytest.raises(ConfigError, match="not connected"):
        client.generate("hello")
    with pytest.raises(ConfigError):
        Client("http://nowhere")


def test_a_request_whose_entry_died_with_no_plan_after_ends_typed_not_lost() -> None:
    """The entry goes offline and no plan without it comes: with entry_down_wait_s set the
    request fails with NoFeasiblePlan (a typed answer) instead of waiting out its deadline;
    without it (the default) the request keeps waiting for the entry's return."""
    from pathlib import Path

    from services.cli.client import ClientOptions, NoFeasiblePlan, _Session
    from shared.config import BusSettings
    from shared.messages import GenerateRequest, Plan, Segment

    class FakeBus:
        sessions = 1

        def __init__(self) -> None:
            self.sent: list[Any] = []

        async def publish(self, topic: Any, message: Any, **params: str) -> None:
            self.sent.append((message, params))

        async def wait_ready(self, min_sessions: int = 0, timeout_s: float | None = None) -> None:
            await asyncio.sleep(3600)

    async def scenario() -> None:
        bus = FakeBus()
        options = ClientOptions(BusSettings(models_dir=Path("/tmp")), timeout_s=30.0, resync_after_s=0.05,
                                entry_down_wait_s=0.3)  # fmt: skip
        plan = Plan(epoch=1, model_id="m", entry_node="car", segments=(Segment(node="car", start=0, end=2),))  # type: ignore[arg-type]
        request = GenerateRequest(request_id="r1", reply_to="c1", token_ids=(1, 2), max_new_tokens=4)  # type: ignore[arg-type]
        session = _Session(bus, options, request, plan, None)  # type: ignore[arg-type]
        events = FakeSubscription()
        events.queue.put_nowait(({"node": "car"}, status("car", "offline")))
        with pytest.raises(NoFeasiblePlan, match="entry node car is down"):
            async with asyncio.timeout(5):  # far below the request's 30 s deadline
                await session.run(events)
        assert len(bus.sent) == 1  # sent once; nothing resubmitted to a dead entry
        waiting = _Session(bus, ClientOptions(options.settings, timeout_s=30.0, resync_after_s=0.05),  # type: ignore[arg-type]
                           request, plan, None)  # fmt: skip
        events.queue.put_nowait(({"node": "car"}, status("car", "offline")))
        task = asyncio.create_task(waiting.run(events))
        await asyncio.sleep(0.6)  # twice the limit above: still waiting
        assert not task.done()
        task.cancel()

    asyncio.run(scenario())


def test_the_entrys_typed_timeout_just_after_the_clients_deadline_ends_the_request() -> None:
    """The entry enforces the request's deadline from when it received it, a little after
    the client sent it: its typed ``timeout`` arrives just after the client's own deadline.
    The client waits DEADLINE_GRACE_S for it (a request the system answered is not lost);
    only a silent entry ends in NoAnswer, that much after the deadline."""
    from pathlib import Path

    from services.cli.client import DEADLINE_GRACE_S, ClientOptions, NoAnswer, _Session
    from shared.config import BusSettings
    from shared.errors import StageTimedOut
    from shared.messages import GenerateRequest, Plan, RequestFailed, Segment
    from shared.messages.requests import seal_reply

    class FakeBus:
        sessions = 1

        async def publish(self, topic: Any, message: Any, **params: str) -> None:
            pass

        async def wait_ready(self, min_sessions: int = 0, timeout_s: float | None = None) -> None:
            await asyncio.sleep(3600)

    options = ClientOptions(BusSettings(models_dir=Path("/tmp")), timeout_s=0.3, resync_after_s=10.0)
    plan = Plan(epoch=1, model_id="m", entry_node="car", segments=(Segment(node="car", start=0, end=2),))  # type: ignore[arg-type]
    request = GenerateRequest(request_id="r1", reply_to="c1", token_ids=(1, 2), max_new_tokens=4)  # type: ignore[arg-type]

    async def scenario() -> tuple[type[BaseException], type[BaseException], float]:
        replies = FakeSubscription()
        answered = _Session(FakeBus(), options, request, plan, None)  # type: ignore[arg-type]

        async def late_timeout() -> None:
            await asyncio.sleep(0.3 + 0.5)  # half a second past the client's deadline
            failed = RequestFailed(request_id="r1", error="timeout", message="deadline")  # type: ignore[arg-type]
            replies.queue.put_nowait(({}, seal_reply(failed, answered.message.reply_key or "")))

        pending = asyncio.create_task(late_timeout())
        try:
            await answered.run(replies)
        except Exception as error:  # noqa: BLE001 - the type is the assertion
            first = type(error)
        await pending
        loop = asyncio.get_running_loop()
        began = loop.time()
        try:
            await _Session(FakeBus(), options, request, plan, None).run(FakeSubscription())  # type: ignore[arg-type]
        except Exception as error:  # noqa: BLE001
            second = type(error)
        return first, second, loop.time() - began

    first, second, silent_s = asyncio.run(asyncio.wait_for(scenario(), 10))
    assert first is StageTimedOut and second is NoAnswer
    assert 0.3 + DEADLINE_GRACE_S - 0.05 <= silent_s < 0.3 + DEADLINE_GRACE_S + 1.0
