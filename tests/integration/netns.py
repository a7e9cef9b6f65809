"""Test harness: several "hosts" as Linux network namespaces on one bridge.

Each host is a namespace with one veth pair: one end inside (``10.X.Y.i/24``), the other
end enslaved to a bridge in a fourth kind of namespace, the hub (``{tag}hub``). The
root namespace joins the same bridge with a veth of its own holding ``10.X.Y.254``, so
the test process is one more host on that LAN (it runs the client and reads the broker).
The bridge lives in the hub, not in the root namespace, because there the root's
firewall would see bridged traffic (``bridge-nf-call-iptables`` is 1 and Docker sets
``FORWARD DROP``): the hub has no rules, and nothing global is changed.
Processes started with ``Hosts.spawn(host, ...)`` run under ``ip netns exec``: they
share no loopback with anyone and reach each other only by address, through the kernel's
bridge. Links are shaped by the kernel: ``shape(host, rate)`` puts a ``tc tbf`` on the
hub side of the host's veth (traffic *into* that host), ``cut(host)`` sets that veth
down. ``tc netem`` does not exist on these machines, so there is no kernel delay here
(tbf's ``latency`` only bounds its queue); delay comes from the project's own shaper
(docs/EMULATION.md).

Every name carries a random tag (``es<6 hex>``), so parallel runs never collide, and
``close()`` deletes everything it made (namespaces, veths, bridge) even after a failure;
use it from a fixture finalizer.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path


def unavailable_reason() -> str | None:
    """Why namespaces cannot be used here (None: they can): not root, no `ip`, or
    `ip netns add` refused."""
    if os.geteuid() != 0:
        return f"network namespaces need root (running as uid {os.geteuid()})"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "the `ip` and `tc` commands (iproute2) are not installed"
    probe = "esprobe" + secrets.token_hex(3)
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


@dataclass
class Hosts:
    """``count`` namespaces ``{tag}h0 .. {tag}h{count-1}`` on bridge ``{tag}br``."""

    count: int
    tag: str = field(default_factory=lambda: "es" + secrets.token_hex(3))
    subnet: str = field(default_factory=lambda: f"10.{secrets.randbelow(200) + 20}.{secrets.randbelow(250) + 1}")
    created: list[tuple[str, str]] = field(default_factory=list)
    """(kind, name) of everything made, for close()."""

    @property
    def bridge(self) -> str:
        return f"{self.tag}br"

    @property
    def hub(self) -> str:
        """The namespace holding the bridge and the hub ends of every veth."""
        return f"{self.tag}hub"

    @property
    def gateway(self) -> str:
        """The root namespace's address on the bridge (where the test process sits)."""
        return f"{self.subnet}.254"

    def namespace(self, host: int) -> str:
        return f"{self.tag}h{host}"

    def address(self, host: int) -> str:
        return f"{self.subnet}.{host + 1}"

    def veth(self, host: int) -> str:
        """The hub end of ``host``'s veth pair (where shaping and cuts apply)."""
        return f"{self.tag}v{host}"

    def open(self) -> Hosts:
        try:
            _ip("netns", "add", self.hub)
            self.created.append(("netns", self.hub))
            _ip("-n", self.hub, "link", "add", self.bridge, "type", "bridge")
            _ip("-n", self.hub, "link", "set", self.bridge, "up")
            root_end = f"{self.tag}g"
            _ip("link", "add", root_end, "type", "veth", "peer", "name", f"{self.tag}gb")
            self.created.append(("link", root_end))
            self._enslave(f"{self.tag}gb")
            _ip("addr", "add", f"{self.gateway}/24", "dev", root_end)
            _ip("link", "set", root_end, "up")
            for host in range(self.count):
                self._add_host(host)
        except BaseException:
            self.close()
            raise
        return self

    def _enslave(self, hub_end: str) -> None:
        _ip("link", "set", hub_end, "netns", self.hub)
        _ip("-n", self.hub, "link", "set", hub_end, "master", self.bridge, "up")

    def _add_host(self, host: int) -> None:
        namespace, outside, inside = self.namespace(host), self.veth(host), f"{self.tag}i{host}"
        _ip("netns", "add", namespace)
        self.created.append(("netns", namespace))
        _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        _ip("link", "set", inside, "netns", namespace)
        self._enslave(outside)
        _ip("-n", namespace, "addr", "add", f"{self.address(host)}/24", "dev", inside)
        _ip("-n", namespace, "link", "set", inside, "up")
        _ip("-n", namespace, "link", "set", "lo", "up")

    def close(self) -> None:
        """Delete every namespace and link made (processes inside must be stopped first);
        a veth goes with the namespace of either end."""
        for kind, name in reversed(self.created):
            _ip(kind, "del", name, check=False)
        self.created.clear()

    # --- processes and links ------------------------------------------------------------------

    def command(self, host: int, argv: list[str]) -> list[str]:
        """``argv`` run inside ``host``'s namespace."""
        return ["ip", "netns", "exec", self.namespace(host), *argv]

    def spawn(self, host: int, argv: list[str], log: Path, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.Popen[bytes]:  # fmt: skip
        with log.open("ab") as out:
            return subprocess.Popen(self.command(host, argv), stdout=out, stderr=out, env=env, cwd=cwd,
                                    start_new_session=True)  # fmt: skip

    def shape(self, host: int, rate_bytes_per_s: float, burst_bytes: int = 4096) -> None:
        """Limit traffic into ``host`` to ``rate_bytes_per_s`` with a token bucket
        (``tc tbf``) of ``burst_bytes``; its queue holds at most 500 ms."""
        rate = f"{int(rate_bytes_per_s * 8)}bit"
        done = subprocess.run(["ip", "netns", "exec", self.hub, "tc", "qdisc", "replace", "dev", self.veth(host),
                               "root", "tbf", "rate", rate,
                               "burst", str(burst_bytes), "latency", "500ms"],
                              capture_output=True, text=True, timeout=30)  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"tc tbf on {self.veth(host)}: {done.stderr.strip()}")

    def unshape(self, host: int) -> None:
        subprocess.run(["ip", "netns", "exec", self.hub, "tc", "qdisc", "del", "dev", self.veth(host), "root"],
                       capture_output=True, timeout=30)  # fmt: skip

    def cut(self, host: int) -> None:
        """Take ``host``'s link down (its cable pulled): nothing in or out."""
        _ip("-n", self.hub, "link", "set", self.veth(host), "down")

    def mend(self, host: int) -> None:
        _ip("-n", self.hub, "link", "set", self.veth(host), "up")
