"""`edgesplit up --secure`: the secure profile's broker and an identity per process.

`start_secure_broker_for` creates the state folder when it is new (`creds.init_state`
with the topology's nodes) or reuses it, checks that it covers the cluster and every
node, starts Mosquitto with its secure config, and returns what the launcher needs: the
broker, the launcher's own settings (it connects as the ``operator`` identity, which may
publish the privacy policy and read everything) and the EDGESPLIT_* variables of each
worker and service (its certificate, key, the CA, the data listener and its identity as
origin; the broker makes the identity each connection's client id).

The gateway connects as the ``gateway`` identity (Role.GATEWAY: it may send requests to
any entry, read its own replies and what the dashboard draws) and needs an API key: the
one in $EDGESPLIT_GATEWAY_API_KEY, else STATE/gateway-api-key, made on first use (0600).
A state folder made before the gateway identity existed gets it added.
"""

from __future__ import annotations

import os
import secrets
import shlex
from dataclasses import dataclass
from pathlib import Path

from shared.bus import Bus
from shared.config import BusSettings, load_settings
from shared.errors import ConfigError
from shared.security.acl import Role
from shared.security.broker import SecureBroker, start_secure_broker
from shared.security.broker_audit import AUDIT_SERVICE, BrokerAudit, ReadGrants, broker_status
from shared.security.creds import (
    SERVICE_IDENTITIES,
    StateDir,
    add_identity,
    client_environment,
    init_state,
    load_registry,
)
from shared.security.role_keys import KEYS_DIR, ensure_role_keys
from shared.security.signing import ensure_key_file
from shared.topics import SERVICE_STATUS
from shared.topology import Topology

LAUNCHER_IDENTITY = "operator"
SERVICES = ("monitor", "broadcaster", "orchestrator", "split-reviser", "gateway")
"""The launcher's process names of the services; each is also their identity."""
GATEWAY_IDENTITY = "gateway"
API_KEY_FILE = "gateway-api-key"
API_KEY_ENV = "EDGESPLIT_GATEWAY_API_KEY"


@dataclass(frozen=True)
class SecureLaunch:
    """The started secure broker, the launcher's settings and each process's variables."""

    broker: SecureBroker
    settings: BusSettings
    environments: dict[str, dict[str, str]]
    created: bool
    """True when this run created the state folder."""
    api_key_source: str
    """Where the gateway's API key comes from (a file, or the environment variable)."""
    audit: BrokerAudit
    """What the broker refused, counted from its log (`report_broker_refusals` publishes it)."""

    def client_hint(self, state: StateDir) -> str:
        """How a user connects as the ``client`` identity (shell variables)."""
        variables = client_environment(state, "client", self.broker.url)
        return " ".join(f"{key}={shlex.quote(value)}" for key, value in variables.items())


def start_secure_broker_for(settings: BusSettings, state_root: Path, topology: Topology,
                            tls_port: int | None, data_dir: Path) -> SecureLaunch:  # fmt: skip
    """Prepare (or reuse) ``state_root`` and start its broker. Blocking: run it off the loop.
    Raises ConfigError (a state folder of another cluster, or missing identities) and
    BrokerUnavailable."""
    state = StateDir(state_root)
    created = not state.registry.exists()
    if created:
        init_state(state_root, topology, cluster=settings.cluster)
    registry = load_registry(state)
    if registry.cluster != settings.cluster:
        raise ConfigError(f"{state_root} holds credentials for cluster {registry.cluster!r}, not "
                          f"{settings.cluster!r}; give --cluster {registry.cluster} or another --state")  # fmt: skip
    workers = {identity.name for identity in registry.of_role(Role.WORKER)}
    missing = [node.id for node in topology.nodes if node.id not in workers]
    if registry.get(GATEWAY_IDENTITY) is None:  # a state folder older than the gateway's role
        add_identity(state_root, GATEWAY_IDENTITY, Role.GATEWAY, trust=0)
        registry = load_registry(state)
    missing += [name for name, _ in SERVICE_IDENTITIES if registry.get(name) is None]
    if missing:
        raise ConfigError(f"{state_root} has no identity for {', '.join(missing)}; add nodes with "
                          "`edgesplit creds add-node NAME --trust N --state ...`")  # fmt: skip
    audit = BrokerAudit(ReadGrants.of(registry.identities, registry.cluster))
    broker = start_secure_broker(state, tls_port=tls_port, data_dir=data_dir, audit=audit)
    try:
        ensure_role_keys(state_root / KEYS_DIR)  # each signing role's Ed25519 key pair
        names = [*(node.id for node in topology.nodes), *SERVICES]
        # One control key per state folder, and the registry every node's trust comes from.
        control = {"EDGESPLIT_PLAN_SIGNING_KEY_FILE": str(ensure_key_file(state_root)),
                   "EDGESPLIT_IDENTITIES_FILE": str(state.registry)}  # fmt: skip
        # The cluster key derives frame keys: only the workers and the broadcaster get it;
        # the monitor and the orchestrator sign with their role keys alone.
        environments = {name: {**client_environment(state, name, broker.url), **control} for name in names}
        for name in ("monitor", "orchestrator", GATEWAY_IDENTITY):
            del environments[name]["EDGESPLIT_PLAN_SIGNING_KEY_FILE"]
        api_key, api_key_source = gateway_api_key(state_root)
        environments[GATEWAY_IDENTITY][API_KEY_ENV] = api_key
        own = client_environment(state, LAUNCHER_IDENTITY, broker.url)
        launcher = load_settings(type(settings), {
            **settings.model_dump(), "broker_url": broker.url, "client_id": LAUNCHER_IDENTITY,
            "data_broker_url": own["EDGESPLIT_DATA_BROKER_URL"],
            "tls_ca_file": own["EDGESPLIT_TLS_CA_FILE"], "tls_cert_file": own["EDGESPLIT_TLS_CERT_FILE"],
            "tls_key_file": own["EDGESPLIT_TLS_KEY_FILE"], "plan_signing_key": None,
            "plan_signing_key_file": control["EDGESPLIT_PLAN_SIGNING_KEY_FILE"],
            "identities_file": control["EDGESPLIT_IDENTITIES_FILE"],
            "role_keys_dir": own["EDGESPLIT_ROLE_KEYS_DIR"], "role_key_file": own["EDGESPLIT_ROLE_KEY_FILE"],
        })  # fmt: skip
    except BaseException:
        broker.close()
        raise
    return SecureLaunch(broker, launcher, environments, created, api_key_source, audit)


async def report_broker_refusals(bus: Bus, audit: BrokerAudit, reported: dict[str, int] | None) -> dict[str, int]:
    """Publish the broker's refusal counts (retained ``services/broker/status``, as the
    launcher's ``operator`` identity) when they changed since ``reported`` (None: never
    published). Returns what was published."""
    counts = audit.snapshot()
    if counts != reported:
        await bus.publish(SERVICE_STATUS, broker_status(counts), service=AUDIT_SERVICE)
    return counts


def gateway_api_key(state_root: Path) -> tuple[str, str]:
    """The key the gateway of `up --secure` requires, and where it comes from: the
    environment's EDGESPLIT_GATEWAY_API_KEY, else STATE/gateway-api-key (made, 0600,
    with 256 random bits when missing). Raises ConfigError on an empty key file."""
    given = os.environ.get(API_KEY_ENV, "").strip()
    if given:
        return given, f"${API_KEY_ENV}"
    path = state_root / API_KEY_FILE
    if not path.exists():
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(secrets.token_urlsafe(32) + "\n")
    key = path.read_text(encoding="utf-8").strip()
    if not key:
        raise ConfigError(f"{path} is empty; delete it for a new key, or set ${API_KEY_ENV}")
    return key, str(path)
