"""`edgesplit health`: is one service or node alive, judged from its retained status.

A container's health check (deploy/containers, docs/DEPLOY.md). It reads one retained
message and exits 0 (healthy) or 1 (not), with one line on stderr saying why:

* a control service (``--service NAME``): ``services/{NAME}/status`` (ServiceStatus),
  healthy when its ``at_s`` is at most ``--max-age-s`` old (the services republish it
  every ``HEARTBEAT_S``, shared/security/reporting.py);
* a worker (``--node NODE``): ``nodes/{NODE}/status`` (NodeStatus), healthy while its
  state is ``online`` (the broker replaces it by the Last Will, ``offline``, when the
  worker's connection goes).

Without either option it checks the process its environment describes: the node
``EDGESPLIT_NODE_ID`` names, else the service ``EDGESPLIT_CLIENT_ID`` names. The broker and
cluster come from ``--broker``/``--cluster`` or EDGESPLIT_* as for every command. The
check connects with a client id of its own (``health-<random>``), so it never takes over
the session of the process it checks. On the secure profile the broker makes the
certificate's identity the client id whatever is asked, so the check needs an identity of
its own (``--tls-cert``/``--tls-key``, e.g. a client identity from `creds add-client`):
with the checked process's own certificate it would take over that process's session, and
it refuses to. Bad arguments: one line on stderr, exit 2.

The gateway (``--gateway URL``) is checked over HTTP instead: ``GET URL/health``
answers 200 while its broker connection is up (services/gateway/app.py).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from shared.bus import Bus
from shared.config import BusSettings, load_settings
from shared.errors import ConfigError, EdgesplitError, InvalidId
from shared.ids import validate_id
from shared.messages import NodeStatus, ServiceStatus
from shared.process import first_edgesplit_error
from shared.security.pki import common_name
from shared.security.reporting import HEARTBEAT_S
from shared.subscription import Subscription
from shared.topics import NODE_STATUS, SERVICE_STATUS

DEFAULT_MAX_AGE_S = 3 * HEARTBEAT_S
"""A service's status older than this (three missed heartbeats) is unhealthy."""
DEFAULT_WAIT_S = 3.0
"""How long to wait for the broker and the retained message, seconds."""


@dataclass(frozen=True)
class Target:
    """What to check: a control service or a worker node, by name."""

    kind: Literal["service", "node"]
    name: str


def register(subparsers: Any) -> None:
    health = subparsers.add_parser(
        "health", help="exit 0 when a service or node is alive (its retained status), else 1",
        description="Read the retained status of one control service (services/NAME/status: "
                    "fresh) or worker (nodes/NODE/status: online) and exit 0 or 1; a container "
                    "health check. Without --service/--node: EDGESPLIT_NODE_ID, else "
                    "EDGESPLIT_CLIENT_ID.")  # fmt: skip
    which = health.add_mutually_exclusive_group()
    which.add_argument("--service", help="control service name (monitor, orchestrator, ...)")
    which.add_argument("--node", help="worker node id")
    which.add_argument("--gateway", metavar="URL",
                       help="the gateway at URL (e.g. http://127.0.0.1:8000): GET URL/health answers 200")
    health.add_argument("--max-age-s", type=_positive_s, default=DEFAULT_MAX_AGE_S,
                        help=f"a service status older than this is stale (default {DEFAULT_MAX_AGE_S:g})")  # fmt: skip
    health.add_argument("--wait-s", type=_positive_s, default=DEFAULT_WAIT_S,
                        help=f"wait this long for the status (default {DEFAULT_WAIT_S:g})")  # fmt: skip
    health.add_argument("--broker", help="broker URL (default $EDGESPLIT_BROKER_URL)")
    health.add_argument("--cluster", help="cluster id (default $EDGESPLIT_CLUSTER or 'default')")
    health.add_argument("--tls-cert", type=Path, help="secure profile: the check's own client certificate "
                        "(default $EDGESPLIT_TLS_CERT_FILE; not the checked process's: the broker would "
                        "hand the check that process's session)")  # fmt: skip
    health.add_argument("--tls-key", type=Path, help="its key (default $EDGESPLIT_TLS_KEY_FILE)")
    health.set_defaults(handler=run_health)


def own_session_taken(settings: BusSettings, target: Target) -> str | None:
    """Why connecting with ``settings`` would take the checked process's session (the
    secure broker makes a certificate's identity the client id), or None."""
    if settings.tls_cert_file is None:
        return None
    try:
        identity = common_name(Path(settings.tls_cert_file))
    except (OSError, ValueError):
        return None  # unreadable: the connection reports it
    if identity in (target.name, settings.client_id):
        return (f"the certificate {settings.tls_cert_file} is {identity!r}'s own: on the secure profile the "
                f"check would take over that process's session; give the check an identity of its own "
                f"(--tls-cert/--tls-key, e.g. `edgesplit creds add-client health-{target.name}`)")
    return None


def _positive_s(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value <= 3600:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text} s is outside (0, 3600] s")
    return value


def target_from(service: str | None, node: str | None, environ: dict[str, str]) -> Target | None:
    """The target the options name, else the one the environment names (None: neither)."""
    if service:
        return Target("service", service)
    if node:
        return Target("node", node)
    if environ.get("EDGESPLIT_NODE_ID"):
        return Target("node", environ["EDGESPLIT_NODE_ID"])
    if environ.get("EDGESPLIT_CLIENT_ID"):
        return Target("service", environ["EDGESPLIT_CLIENT_ID"])
    return None


def verdict(target: Target, status: NodeStatus | ServiceStatus | None, now_s: float,
            max_age_s: float) -> tuple[bool, str]:  # fmt: skip
    """(healthy, why) for ``status``, the retained message of ``target`` (None: none)."""
    where = f"{target.kind} {target.name}"
    if status is None:
        return False, f"{where}: no retained status (not started, or not on this broker and cluster)"
    if isinstance(status, NodeStatus):
        if status.state != "online":
            return False, f"{where}: {status.state} (its Last Will: the connection went)"
        return True, f"{where}: online, epoch {status.epoch}"
    age_s = now_s - status.at_s
    if age_s > max_age_s:
        return False, f"{where}: last status {age_s:.1f} s ago (more than {max_age_s:g} s)"
    return True, f"{where}: status {max(0.0, age_s):.1f} s old"


async def read_status(settings: BusSettings, target: Target,
                      wait_s: float) -> NodeStatus | ServiceStatus | None:  # fmt: skip
    """The retained status of ``target``, or None when none arrives within ``wait_s``.

    Raises BusError when the broker does not answer within ``wait_s``."""
    origin = f"health-{secrets.token_hex(4)}"
    async with Bus(settings, origin=origin) as bus:
        subscription: Subscription[NodeStatus] | Subscription[ServiceStatus]
        if target.kind == "node":
            subscription = bus.subscribe(NODE_STATUS, node=target.name)
        else:
            subscription = bus.subscribe(SERVICE_STATUS, service=target.name)
        try:
            await bus.wait_ready(timeout_s=wait_s)
            try:
                async with asyncio.timeout(wait_s):
                    _, message = await subscription.get()
                    return message
            except TimeoutError:
                return None
        finally:
            subscription.close()


def gateway_health(url: str, wait_s: float) -> tuple[bool, str]:
    """(healthy, why) of the gateway at ``url``: its ``/health`` answers 200 within ``wait_s``."""
    address = f"{url.rstrip('/')}/health"
    try:
        with urllib.request.urlopen(address, timeout=wait_s) as answer:  # noqa: S310 - http(s) only, checked
            return True, f"gateway {url}: {answer.status} {answer.read(200).decode(errors='replace')}"
    except urllib.error.HTTPError as error:
        return False, f"gateway {url}: {error.code} {error.read(200).decode(errors='replace')}"
    except (urllib.error.URLError, OSError) as error:
        return False, f"gateway {url}: {getattr(error, 'reason', error)}"


def run_health(args: argparse.Namespace) -> int:
    if args.gateway is not None:
        if not args.gateway.startswith(("http://", "https://")):
            print(f"edgesplit: error: --gateway takes an http:// or https:// URL, not {args.gateway!r}",
                  file=sys.stderr)  # fmt: skip
            return 2
        healthy, why = gateway_health(args.gateway, args.wait_s)
        print(f"edgesplit: {'healthy' if healthy else 'unhealthy'}: {why}",
              file=sys.stdout if healthy else sys.stderr)  # fmt: skip
        return 0 if healthy else 1
    target = target_from(args.service, args.node, dict(os.environ))
    if target is None:
        print("edgesplit: error: health needs --service NAME or --node NODE "
              "(or EDGESPLIT_NODE_ID / EDGESPLIT_CLIENT_ID)", file=sys.stderr)  # fmt: skip
        return 2
    try:
        validate_id(target.name, target.kind)
    except InvalidId as error:
        print(f"edgesplit: error: {error}", file=sys.stderr)
        return 2
    try:
        settings = load_settings(BusSettings, {"broker_url": args.broker, "cluster": args.cluster,
                                               "connect_timeout_s": args.wait_s, "tls_cert_file": args.tls_cert,
                                               "tls_key_file": args.tls_key})  # fmt: skip
    except ConfigError as error:
        print(f"edgesplit: error: {error}", file=sys.stderr)
        return 2
    taken = own_session_taken(settings, target)
    if taken is not None:
        print(f"edgesplit: error: {taken}", file=sys.stderr)
        return 2
    try:
        status = asyncio.run(read_status(settings, target, args.wait_s))
    except BaseExceptionGroup as group:
        found = first_edgesplit_error(group)
        if found is None:
            raise
        print(f"edgesplit: unhealthy: {target.kind} {target.name}: {found}", file=sys.stderr)
        return 1
    except EdgesplitError as error:
        print(f"edgesplit: unhealthy: {target.kind} {target.name}: {error}", file=sys.stderr)
        return 1
    healthy, why = verdict(target, status, time.time(), args.max_age_s)
    print(f"edgesplit: {'healthy' if healthy else 'unhealthy'}: {why}",
          file=sys.stdout if healthy else sys.stderr)  # fmt: skip
    return 0 if healthy else 1
