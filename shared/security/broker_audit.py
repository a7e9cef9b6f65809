"""What the secure broker refused, counted from its own log (docs/SECURITY.md, "Refusals
the broker makes").

Most hostile messages on the secure profile never reach a receiver that could count
them: Mosquitto's ACL drops a denied publish, and refuses a bad login or TLS handshake,
before any edgesplit process sees it. Mosquitto counts none of this in ``$SYS``; it only
logs it, at debug level. So `up --secure` runs its broker with ``log_type all`` into a
pipe, and `BrokerAudit` reads that stream: it counts

- ``Publish_denied``: ``Denied PUBLISH from ID`` (the ACL refused a publish; ID is the
  identity, since the broker makes the identity the client id);
- ``Connect_refused``: a CONNACK with a non-zero code (no or a wrong password, an
  identity the broker does not know, anonymous access);
- ``Tls_refused``: a failed TLS handshake (``OpenSSL Error[0]`` or ``Client connection
  from HOST failed``, depending on where the handshake failed: plaintext on a TLS
  listener, no client certificate, one of another CA);
- ``Subscribe_denied``: a subscription that reaches topics the identity may not read
  (``nodes/+/requests`` by a client, ``#`` by anyone but the operator). Mosquitto accepts
  it and then delivers only what the ACL allows, so it logs no refusal; the audit
  compares the subscription Mosquitto logs (``ID QOS FILTER``) with the identity's read
  grants (`ReadGrants`, from the identity registry and shared/security/acl.py);
- ``Session_takenover``: ``Client ID already connected, closing old connection`` (a
  second connection of an identity replaced its session: the broker makes the identity
  the client id, so only the identity itself can, e.g. with a stolen certificate);

and keeps only the lines worth keeping in ``mosquitto.log`` (the per-packet debug lines
are dropped; each kind of refusal is kept the first time and then every
`KEEP_EVERY`-th, so a flood cannot fill the disk). The counts travel as the retained
``ServiceStatus`` of the service ``broker`` (`broker_status`), so `edgesplit status`
lists them beside every receiver's refusals.

Not judged: a subscription by an identity the registry did not hold when the audit
started (added later with `creds add-*`).
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import IO

from shared.messages import ServiceStatus
from shared.security.acl import Identity, rules_for
from shared.security.pki import subject_username

AUDIT_SERVICE = "broker"
"""The service name (and ``services/broker/status`` topic instance) of the counts."""
KEEP_EVERY = 100
"""A refusal line of one kind is kept in the log the first time, then every this many."""

_STAMP = re.compile(r"^\d+: ")
_DENIED = re.compile(r"^Denied PUBLISH from (\S+) \(d\d, q\d, r\d, m\d+, '([^']*)'")
_CONNACK = re.compile(r"^Sending CONNACK to (\S+) \((\d+), (\d+)\)")
_TAKEN_OVER = re.compile(r"^Client (\S+) already connected, closing old connection")
_TLS_FAILED = re.compile(r"^Client connection from \S+ failed: ")
_SUBSCRIPTION_ECHO = re.compile(r"^(\S+) \d+ (\S+)$")  # "client qos filter", after a SUBSCRIBE
_NOISE = ("Received ", "Sending ", "\t", "No will message specified", "Will message specified",
          "New client connected", "New connection from", "Client ", "Saving in-memory")  # fmt: skip


def covers(grant: str, wanted: str) -> bool:
    """True when every topic the MQTT filter ``wanted`` matches is matched by ``grant``."""
    granted, asked = grant.split("/"), wanted.split("/")
    for index, level in enumerate(granted):
        if level == "#":
            return True
        if index >= len(asked) or asked[index] == "#":
            return False
        if level != "+" and asked[index] != level:
            return False
    return len(asked) == len(granted)


class ReadGrants:
    """What each identity may read: the read filters of its ACL rules, by every username
    it connects with (its name; its certificate subject on the data listener)."""

    def __init__(self, filters: Mapping[str, tuple[str, ...]]) -> None:
        self.filters = dict(filters)

    @classmethod
    def of(cls, identities: Iterable[Identity], cluster: str) -> ReadGrants:
        filters: dict[str, tuple[str, ...]] = {}
        for identity in identities:
            readable = tuple(rule.filter for rule in rules_for(identity, cluster) if rule.access != "write")
            filters[identity.name] = filters[subject_username(identity.name)] = readable
        return cls(filters)

    def may_read(self, client: str, wanted: str) -> bool | None:
        """Whether ``client`` may read everything ``wanted`` matches (None: not an identity
        this registry knows)."""
        readable = self.filters.get(client)
        if readable is None:
            return None
        return any(covers(grant, wanted) for grant in readable)


class BrokerAudit:
    """Counts of what the broker refused, from its log lines (`feed`); thread-safe.
    ``grants``: each identity's read grants, to judge subscriptions (None: not judged)."""

    def __init__(self, grants: ReadGrants | None = None) -> None:
        self.grants = grants
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        """By ``Publish_denied``, ``Subscribe_denied``, ``Connect_refused``, ``Tls_refused``,
        ``Session_takenover``."""
        self.denied_by: Counter[str] = Counter()
        """Denied publishes and subscriptions by identity (client id)."""

    def feed(self, line: str) -> str | None:
        """Count ``line`` (one line of Mosquitto's log, with or without its time stamp);
        returns what to keep in the log (the line), or None for per-packet noise."""
        text = _STAMP.sub("", line.rstrip("\n"), count=1)
        kind = None
        if (denied := _DENIED.match(text)) is not None:
            kind = "Publish_denied"
            with self._lock:
                self.denied_by[denied.group(1)] += 1
        elif (connack := _CONNACK.match(text)) is not None:
            if connack.group(3) == "0":
                return None
            kind = "Connect_refused"
        elif (echo := _SUBSCRIPTION_ECHO.match(text)) is not None:
            if self.grants is None or self.grants.may_read(echo.group(1), echo.group(2)) is not False:
                return None
            kind = "Subscribe_denied"
            with self._lock:
                self.denied_by[echo.group(1)] += 1
        elif _TAKEN_OVER.match(text):
            kind = "Session_takenover"  # a second connection of the same identity
        elif text.startswith("OpenSSL Error[0]") or _TLS_FAILED.match(text):
            kind = "Tls_refused"  # Mosquitto logs a failed handshake one way or the other
        elif text.startswith("OpenSSL Error[") or text.startswith(_NOISE):
            return None
        if kind is None:
            return line
        with self._lock:
            self.counts[kind] += 1
            count = self.counts[kind]
        return line if count == 1 or count % KEEP_EVERY == 0 else None

    def forget_readiness_probe(self, timeout_s: float = 2.0) -> None:
        """Forget the refused connect of the readiness check (`connack_arrives`: an
        anonymous CONNECT that the broker answers with "not authorised") once it is
        counted, or after ``timeout_s``: it is the launcher's own, not an attack."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if self.counts["Connect_refused"] >= 1:
                    self.counts["Connect_refused"] -= 1
                    if not self.counts["Connect_refused"]:
                        del self.counts["Connect_refused"]
                    return
            time.sleep(0.01)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(sorted(self.counts.items()))

    def follow(self, stream: IO[bytes], keep: Callable[[bytes], None]) -> threading.Thread:
        """Read ``stream`` (the broker's stdout and stderr) on a daemon thread until it
        ends, passing the lines worth keeping to ``keep``. Returns the thread."""

        def run() -> None:
            for raw in iter(stream.readline, b""):
                kept = self.feed(raw.decode("utf-8", "replace"))
                if kept is not None:
                    keep(kept.encode())

        thread = threading.Thread(target=run, name="broker-audit", daemon=True)
        thread.start()
        return thread


def broker_status(counts: dict[str, int], at_s: float | None = None) -> ServiceStatus:
    """The retained status that carries the broker's refusals to `edgesplit status`."""
    return ServiceStatus(service=AUDIT_SERVICE, at_s=time.time() if at_s is None else at_s,  # type: ignore[arg-type]
                         refused=counts)  # fmt: skip


def audited_config(config: str) -> str:
    """``config`` (the secure template, rendered) with every log type and connection
    messages on: the refusals are logged at debug level only. Raises ValueError when the template changed so that
    the log types are not where they were."""
    quiet, silent = "log_type error\nlog_type warning\n", "connection_messages false\n"
    if quiet not in config or silent not in config:
        raise ValueError("the secure broker config has no 'log_type error/warning' or "
                         "'connection_messages false' lines to change")  # fmt: skip
    # connection messages on: Mosquitto 2.0.11 logs a failed client-certificate check
    # (OpenSSL Error) only with them
    return config.replace(quiet, "log_type all\n", 1).replace(silent, "connection_messages true\n", 1)

