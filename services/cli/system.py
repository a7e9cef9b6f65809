"""`edgesplit up` and `edgesplit status`: the running system."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from services.cli.status_state import StatusSnapshot
from shared.bus import Bus
from shared.config import BusSettings, load_settings
from shared.process import first_edgesplit_error
from shared.topics import CAPACITY, DECISIONS, NODE_STATUS, PLAN, SERVICE_STATUS, TELEMETRY

DEFAULT_INTERVAL_S = 1.0
"""Seconds between `status --watch` redraws unless --interval says otherwise."""
MIN_INTERVAL_S, MAX_INTERVAL_S = 0.2, 60.0
"""Bounds of ``--interval`` (seconds): faster only costs CPU, slower hides changes."""


def register(subparsers: Any) -> None:
    up = subparsers.add_parser(
        "up", help="run the whole local stack in the foreground",
        description="Start a broker if none answers, prepare and shard the model, start one worker "
                    "per topology node, publish the plan, and serve until Ctrl-C.")  # fmt: skip
    up.add_argument("--topology", type=Path, help="topology TOML (default deploy/topologies/default.toml)")
    up.add_argument("--model", help="smollm2, minilm, tiny-llama, tiny-gpt2, tiny-bert or a folder "
                                    "(default smollm2 when its package is installed)")  # fmt: skip
    up.add_argument("--broker", help="broker URL (default $EDGESPLIT_BROKER_URL or mqtt://127.0.0.1:1883)")
    up.add_argument("--cluster", help="cluster id (default 'default')")
    up.add_argument("--run-dir", type=Path, help="where worker logs go (default a temp folder)")
    up.add_argument("--weights", choices=("fp32", "bf16", "int8", "int4"), default="fp32",
                    help="how the workers' shards store linear weights (default fp32; "
                         "docs/PERFORMANCE.md, 'Quantised weights')")  # fmt: skip
    up.add_argument("--static", action="store_true",
                    help="publish the static proportional plan instead of running the adaptive control loop")  # fmt: skip
    up.add_argument("--secure", action="store_true",
                    help="the secure profile: TLS with a client certificate per process, per-role "
                         "ACLs, no anonymous access (docs/SECURITY.md)")  # fmt: skip
    up.add_argument("--state", type=Path,
                    help="with --secure: the credentials folder, created when new (default "
                         "$EDGESPLIT_STATE_DIR or ~/.local/state/edgesplit/secure)")  # fmt: skip
    up.add_argument("--http", metavar="HOST:PORT",
                    help="where the OpenAI-compatible gateway listens (default 127.0.0.1:8000; "
                         "'off' starts none)")  # fmt: skip
    up.add_argument("--metrics", choices=("on", "off"), default="on",
                    help="Prometheus /metrics on a free port of each process, listed in "
                         "RUN/metrics-targets.json (default on)")  # fmt: skip
    up.set_defaults(handler=run_up)

    status = subparsers.add_parser(
        "status", help="nodes, links, the current plan and the latest decisions",
        description="Read the system's retained state from the broker and print it; with --watch, "
                    "keep following it and redraw a live view until Ctrl-C.")  # fmt: skip
    output = status.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print one JSON object")
    output.add_argument("--watch", action="store_true",
                        help="keep following the cluster and redraw the view until Ctrl-C "
                             "(on a pipe: a plain frame per change)")  # fmt: skip
    status.add_argument("--interval", type=_interval_s, metavar="S",
                        help=f"seconds between redraws with --watch (default 1, "
                             f"{MIN_INTERVAL_S:g}-{MAX_INTERVAL_S:g})")  # fmt: skip
    status.add_argument("--broker", help="broker URL")
    status.add_argument("--cluster", help="cluster id (default 'default')")
    status.add_argument("--wait-s", type=float, default=1.0,
                        help="how long to collect (default 1 s; --watch collects until Ctrl-C)")
    status.set_defaults(handler=run_status)


def _interval_s(text: str) -> float:
    """``--interval``: seconds, within [MIN_INTERVAL_S, MAX_INTERVAL_S]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not MIN_INTERVAL_S <= value <= MAX_INTERVAL_S:  # also refuses nan
        raise argparse.ArgumentTypeError(
            f"{text} s is outside {MIN_INTERVAL_S:g}-{MAX_INTERVAL_S:g} s"
        )
    return value


def _settings(args: argparse.Namespace) -> BusSettings:
    return load_settings(BusSettings, {"broker_url": args.broker, "cluster": args.cluster})


def run_up(args: argparse.Namespace) -> int:
    from services.cli.launcher import SecureOptions
    from services.cli.launcher import run_up as launch

    secure = None
    if args.secure:
        problem = _secure_problem(args)
        if problem:
            print(f"edgesplit: error: {problem}", file=sys.stderr)
            return 2
        from shared.config import parse_broker_url
        from shared.security.creds import default_state_dir

        port = parse_broker_url(args.broker).port if args.broker else None
        secure = SecureOptions(args.state.expanduser() if args.state else default_state_dir(), port)
    elif args.state is not None:
        print("edgesplit: error: --state needs --secure", file=sys.stderr)
        return 2
    from services.cli.gateway_up import check_http
    from shared.errors import ConfigError

    try:
        http = check_http(args.http)
    except ConfigError as error:
        print(f"edgesplit: error: {error}", file=sys.stderr)
        return 2
    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="edgesplit-up-"))
    return launch(_settings(args), args.topology, args.model, run_dir, static=args.static,
                  secure=secure, weights=args.weights, http=http, metrics=args.metrics == "on")  # fmt: skip


def _secure_problem(args: argparse.Namespace) -> str | None:
    """Why `up --secure` cannot run with these options (None when it can)."""
    if args.static:
        return "--static publishes the plan itself, which only the broadcaster may: drop --static"
    if args.broker:
        from shared.config import parse_broker_url

        address = parse_broker_url(args.broker)
        if not address.tls or address.host not in ("127.0.0.1", "localhost"):
            return (f"--secure starts its own broker: give --broker mqtts://127.0.0.1:PORT "
                    f"(not {address.redacted()}), or no --broker for a free port")  # fmt: skip
    return None


async def collect_status(settings: BusSettings, wait_s: float) -> dict[str, Any]:
    """Retained nodes, plan, capacity profile and decisions of the cluster."""
    snapshot = StatusSnapshot(broker=settings.broker.redacted(), cluster=settings.cluster)
    async with Bus(settings) as bus:
        subscriptions = [bus.subscribe(topic)
                         for topic in (NODE_STATUS, PLAN, CAPACITY, DECISIONS, TELEMETRY, SERVICE_STATUS)]
        try:
            await bus.wait_ready()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + wait_s
            for subscription in subscriptions:
                while True:
                    remaining = deadline - loop.time()
                    try:
                        async with asyncio.timeout(max(0.05, remaining)):
                            _, message = await subscription.get()
                    except TimeoutError:
                        break
                    snapshot.apply(message)
        finally:
            for subscription in subscriptions:
                subscription.close()
    nodes, plan, capacity = snapshot.nodes, snapshot.plan, snapshot.capacity
    return {
        "broker": snapshot.broker,
        "cluster": snapshot.cluster,
        "nodes": [nodes[n].model_dump(mode="json") for n in sorted(nodes)],
        "links": [link.model_dump(mode="json") for link in capacity.links] if capacity else [],
        "measured": {n.node: n.model_dump(mode="json") for n in capacity.nodes} if capacity else {},
        "profile_age_s": max(0.0, time.time() - capacity.as_of_s) if capacity else None,
        "plan": plan.model_dump(mode="json", exclude={"signature"}) if plan else None,
        "decisions": [d.model_dump(mode="json") for d in snapshot.latest_decisions(10)],
        "frames_forged": dict(sorted(snapshot.forged.items())),
        # control messages each control service refused (a worker's are in its node entry)
        "refused": {name: dict(s.refused) for name, s in sorted(snapshot.services.items()) if s.refused},
    }


def run_status(args: argparse.Namespace) -> int:
    if args.interval is not None and not args.watch:
        print("edgesplit: error: --interval needs --watch", file=sys.stderr)
        return 2
    settings = _settings(args)
    if args.watch:
        return _run_watch(settings, args.interval or DEFAULT_INTERVAL_S)
    try:
        state = asyncio.run(collect_status(settings, args.wait_s))
    except BaseExceptionGroup as group:
        found = first_edgesplit_error(group)
        if found is None:
            raise
        raise found from None
    if args.json:
        print(json.dumps(state))
        return 0
    print(f"broker {state['broker']}  cluster {state['cluster']}")
    plan = state["plan"]
    if plan is None:
        print("plan: none published")
    else:
        layout = "  ".join(f"{s['node']}[{s['start']},{s['end']})" for s in plan["segments"])
        print(f"plan: epoch {plan['epoch']}  model {plan['model_id']}  entry {plan['entry_node']}  {layout}")
    print(f"nodes ({len(state['nodes'])}):")
    for node in state["nodes"]:
        measured = state["measured"].get(node["node"])
        trust = f"{measured['trust']}" if measured else f"{node['trust']}"
        if measured and measured["trust"] != node["trust"]:
            trust += f" (claims {node['trust']})"  # placement uses the operator's registry
        print(f"  {node['node']:<16} {node['state']:<8} trust {trust}  "
              f"memory {node['memory_bytes'] / 1e6:.0f} MB  threads {node['threads']}  "
              f"device {node['device']}")  # fmt: skip
        measured = state["measured"].get(node["node"])
        budget = node.get("kv_budget_bytes")
        kv_budget = f" of {budget / 1e6:.1f}" if budget is not None else ""
        if node.get("refused"):
            print(f"  {'':<16} refused control messages: "
                  + ", ".join(f"{name} {count}" for name, count in node["refused"].items()))
        if measured:
            decode = measured["decode_s_per_block"]
            print(f"  {'':<16} health {measured['health']:<10} busy {measured['utilisation']:.0%}  "
                  f"queue {measured['queue_depth']:.0f}  in flight {measured['requests_in_flight']}  "
                  f"waiting {measured.get('requests_queued', 0)}  "
                  f"decode {decode * 1e3 if decode is not None else float('nan'):.3f} ms/block "
                  f"({measured['compute_source']})  KV {measured['kv_cache_bytes'] / 1e6:.1f}"
                  f"{kv_budget} MB  rss {measured['memory_used_bytes'] / 1e6:.0f} MB  "
                  f"overflows {measured.get('queue_overflows', 0)}")  # fmt: skip
    if state["links"]:
        print("links:")
        for link in state["links"]:
            rtt = link.get("rtt_s")
            print(f"  {link['src']} -> {link['dst']}: {link['bandwidth_bytes_per_s'] / 1e6:.2f} MB/s, "
                  f"{link['latency_s'] * 1e3:.1f} ms"
                  + (f" (rtt {rtt * 1e3:.1f} ms, loss {link['loss']:.0%}, {link['health']}"
                     f"{' ' + ','.join(link['degraded']) if link['degraded'] else ''})" if rtt is not None
                     else f" ({link.get('health', 'unknown')})"))  # fmt: skip
    for decision in state["decisions"]:
        print(_decision_line(decision))
    forged = ", ".join(f"{node} {count}" for node, count in state["frames_forged"].items() if count)
    if forged:
        print(f"forged frames dropped (failed authentication): {forged}")
    for service, refused in state["refused"].items():
        print(f"{service} refused control messages: " + ", ".join(f"{k} {v}" for k, v in refused.items()))
    if plan is None and not state["nodes"]:
        print(f"edgesplit: nothing of cluster {state['cluster']} at {state['broker']} (no plan, no "
              "nodes); is `edgesplit up` running, with the same --broker and --cluster?",
              file=sys.stderr)  # fmt: skip
    return 0


def _run_watch(settings: BusSettings, interval_s: float) -> int:
    """`status --watch` until Ctrl-C, which ends it with status 0 (it is the way to stop it)."""
    # Imported here: rich costs every other command a few hundred ms of start-up.
    from services.cli.watch import WatchConsole, watch_status

    try:
        asyncio.run(watch_status(settings, interval_s, WatchConsole()))
    except KeyboardInterrupt:
        return 0
    except BaseExceptionGroup as group:
        if group.subgroup(BrokenPipeError) is not None:
            return 0  # the reader went away (`status --watch | head`): nothing left to show
        found = first_edgesplit_error(group)
        if found is None:
            raise
        raise found from None
    return 0


def _decision_line(d: dict[str, Any]) -> str:
    """One decision: trigger and evidence, action and why, predicted vs realised."""
    detail = d.get("trigger_detail") or ""
    trigger = f"{d['trigger']}: {detail}" if detail else d["trigger"]
    line = f"decision {d['decision_id']}: {d['action']} ({trigger})"
    if d.get("outcome") not in (None, "none"):
        line += f" -> {d['outcome']}" + (f" epoch {d['to_epoch']}" if d.get("to_epoch") is not None else "")
    if d.get("current_latency_s") is not None:
        line += f"; running {d['current_latency_s'] * 1e3:.2f} ms/token"
    if d.get("predicted_latency_s") is not None:
        line += (f", predicted {d['predicted_latency_s'] * 1e3:.2f} ms/token, gain {d['predicted_gain_s']:.3f} s"
                 f" vs cost {d.get('predicted_cost_s', 0.0):.3f} s over {d.get('horizon_tokens', 0):.0f} tokens")
    if d.get("realised_tpot_s") is not None:
        line += f"; realised {d['realised_tpot_s'] * 1e3:.2f} ms/token"
        if d.get("baseline_tpot_s") is not None:
            line += f" (was {d['baseline_tpot_s'] * 1e3:.2f})"
    if d.get("reason"):
        line += f"\n    {d['reason']}  [{len(d.get('candidates', []))} candidates]"
    return line
