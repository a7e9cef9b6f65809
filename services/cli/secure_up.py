"""`edgesplit up --secure`: the secure profile's broker and an identity per process.

`start_secure_broker_for` creates the state folder when it is new (`creds.init_state`
with the topology's nodes) or reuses it, checks that it covers the cluster and every
node, starts Mosquitto with its secure config, and returns what the launcher needs: the
broker, the launcher's own settings (it connects as the ``operator`` identity, which may
publish the privacy policy and read everything) and the EDGESPLIT_* variables of each
worker and service (its certificate, key, the CA, the data listener and its identity as
origin; the broker makes the identity each connection's client id).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from shared.config import BusSettings, load_settings
from shared.errors import ConfigError
from shared.security.acl import Role
from shared.security.broker import SecureBroker, start_secure_broker
from shared.security.creds import (
    SERVICE_IDENTITIES,
    StateDir,
    client_environment,
    init_state,
    load_registry,
)
from shared.security.role_keys import KEYS_DIR, ensure_role_keys
from shared.security.signing import ensure_key_file
from shared.topology import Topology

LAUNCHER_IDENTITY = "operator"
SERVICES = ("monitor", "broadcaster", "orchestrator", "split-reviser")
"""The launcher's process names of the control services; each is also their identity."""


@dataclass(frozen=True)
class SecureLaunch:
    """The started secure broker, the launcher's settings and each process's variables."""

    broker: SecureBroker
    settings: BusSettings
    environments: dict[str, dict[str, str]]
    created: bool
    """True when this run created the state folder."""

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
    missing += [name for name, _ in SERVICE_IDENTITIES if registry.get(name) is None]
    if missing:
        raise ConfigError(f"{state_root} has no identity for {', '.join(missing)}; add nodes with "
                          "`edgesplit creds add-node NAME --trust N --state ...`")  # fmt: skip
    broker = start_secure_broker(state, tls_port=tls_port, data_dir=data_dir)
    try:
        ensure_role_keys(state_root / KEYS_DIR)  # each signing role's Ed25519 key pair
        names = [*(node.id for node in topology.nodes), *SERVICES]
        # One control key per state folder, and the registry every node's trust comes from.
        control = {"EDGESPLIT_PLAN_SIGNING_KEY_FILE": str(ensure_key_file(state_root)),
                   "EDGESPLIT_IDENTITIES_FILE": str(state.registry)}  # fmt: skip
        # The cluster key derives frame keys: only the workers and the broadcaster get it;
        # the monitor and the orchestrator sign with their role keys alone.
        environments = {name: {**client_environment(state, name, broker.url), **control} for name in names}
        for name in ("monitor", "orchestrator"):
            del environments[name]["EDGESPLIT_PLAN_SIGNING_KEY_FILE"]
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
    return SecureLaunch(broker, launcher, environments, created)
