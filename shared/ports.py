"""Listening ports that nothing else takes before their listener binds them.

`shared.broker.free_port` asks the kernel for a port in its ephemeral range. Between that
call and the moment a slow starter (docker-compose's port proxy, a fresh install's `up`)
binds it, any of the suite's concurrent outgoing connections or other `free_port` callers
may take it: a CI run on 2026-12-07 lost the secure compose stack that way ("bind: address
already in use" on a port free_port had returned seconds before). A port below the
ephemeral range is never handed out for an outgoing connection nor by ``bind(0)``, so only
a fixed listener could still race for it. `up` takes its metrics ports here too
(services/cli/metrics_up.py): a worker binds its port only after importing torch, seconds
later, and a fresh-clone CI run on 2026-12-07 lost a worker to "metrics cannot listen on
127.0.0.1:48815: Address already in use" with a bind(0) port.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

LOWEST = 20000
RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def _ephemeral_low() -> int:
    try:
        return int(RANGE_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("0.0.0.0", port))  # noqa: S104 - a probe, closed at once
        except OSError:
            return False
    return True


def quiet_ports(count: int = 1, tries: int = 200) -> int:
    """The first of ``count`` consecutive ports below the kernel's ephemeral range that
    nothing is bound to now (on any address)."""
    high = _ephemeral_low() - count
    if high <= LOWEST:
        raise RuntimeError(f"no room below the ephemeral range ({RANGE_FILE} starts at {high + count})")
    for _ in range(tries):
        first = random.randint(LOWEST, high)  # noqa: S311 - not a secret
        if all(_bindable(first + i) for i in range(count)):
            return first
    raise RuntimeError(f"no {count} free consecutive ports in {LOWEST}..{high + count} after {tries} tries")
