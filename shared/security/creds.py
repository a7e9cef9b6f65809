"""The secure profile's state folder: a CA, per-identity credentials, the identity
registry, and the broker files generated from them.

Layout (``STATE``)::

    identities.toml         the registry: cluster, and each identity's role and trust
    ca/ca.crt, ca/ca.key    the development CA (pki.py)
    certs/broker.crt|key    the broker's TLS certificate (localhost, 127.0.0.1, ::1)
    certs/NAME.crt|key      one client certificate per identity (CN = NAME)
    secrets/NAME.password   that identity's password for the loopback password listener
    passwords               Mosquitto's password_file (PBKDF2-SHA512, "$7$")
    acl                     Mosquitto's acl_file (acl.py, from the topic registry)
    mosquitto-secure.conf   deploy/mosquitto/secure.conf.template rendered for this folder

The broker has a control listener (TLS, username = the certificate's common name), a
data listener on the next port (TLS, username = the certificate's subject) and a loopback
password listener; on each the client id is the username (`data_broker_url`).

Keys, secrets and the password file are 0600. Nothing existing is overwritten: `init`
refuses an initialised folder and `add_identity` an existing name (ConfigError). The
registry is what the monitor, the orchestrator and the broadcaster read to give
authenticated identities their trust (``identities_file``; shared/security/trust.py).
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import os
import secrets
import tomllib
from dataclasses import dataclass
from pathlib import Path

from shared.errors import ConfigError
from shared.ids import validate_id
from shared.security import pki
from shared.security.acl import Identity, Role, render_acl
from shared.security.role_keys import KEYS_DIR, ensure_role_keys, private_key_file
from shared.topology import Topology

TEMPLATE = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto" / "secure.conf.template"
REGISTRY_FILE = "identities.toml"


def default_state_dir() -> Path:
    """$EDGESPLIT_STATE_DIR, else $XDG_STATE_HOME/edgesplit/secure (~/.local/state/...)."""
    given = os.environ.get("EDGESPLIT_STATE_DIR")
    if given:
        return Path(given).expanduser()
    base = os.environ.get("XDG_STATE_HOME") or str(Path("~/.local/state").expanduser())
    return Path(base) / "edgesplit" / "secure"


BROKER_CERT_NAME = "broker"
"""Reserved: the broker's own certificate (certs/broker.crt), not an identity."""
SERVER_NAMES = ("localhost", "127.0.0.1", "::1")
DEFAULT_TLS_PORT, DEFAULT_PASSWORD_PORT = 8883, 1884
DATA_PORT_OFFSET = 1
"""The data-plane listener is the TLS port + 1 (8884 by default)."""
PBKDF2_ITERATIONS = 101
"""Mosquitto 2.0's own default for "$7$" hashes (mosquitto_passwd)."""
SERVICE_IDENTITIES = (
    ("broadcaster", Role.BROADCASTER),
    ("orchestrator", Role.ORCHESTRATOR),
    ("split-reviser", Role.SPLIT_REVISER),
    ("monitor", Role.MONITOR),
    ("operator", Role.OPERATOR),
    ("client", Role.CLIENT),
    ("gateway", Role.GATEWAY),
)
"""The standard identities `init` creates besides one worker per topology node."""


@dataclass(frozen=True)
class Credentials:
    """The files one identity connects with."""

    name: str
    cert_file: Path
    key_file: Path
    password_file: Path
    ca_file: Path

    def password(self) -> str:
        return self.password_file.read_text().strip()


@dataclass(frozen=True)
class StateDir:
    """Paths of a state folder (nothing is created by constructing one)."""

    root: Path

    @property
    def registry(self) -> Path:
        return self.root / REGISTRY_FILE

    @property
    def ca(self) -> pki.CertPair:
        return pki.CertPair(self.root / "ca" / "ca.crt", self.root / "ca" / "ca.key")

    @property
    def certs(self) -> Path:
        return self.root / "certs"

    @property
    def secrets(self) -> Path:
        return self.root / "secrets"

    @property
    def passwords(self) -> Path:
        return self.root / "passwords"

    @property
    def acl(self) -> Path:
        return self.root / "acl"

    @property
    def broker_config(self) -> Path:
        return self.root / "mosquitto-secure.conf"

    @property
    def server(self) -> pki.CertPair:
        return pki.CertPair(self.certs / f"{BROKER_CERT_NAME}.crt", self.certs / f"{BROKER_CERT_NAME}.key")

    def credentials(self, name: str) -> Credentials:
        return Credentials(name, self.certs / f"{name}.crt", self.certs / f"{name}.key",
                           self.secrets / f"{name}.password", self.ca.cert_file)  # fmt: skip


@dataclass(frozen=True)
class Registry:
    """identities.toml: the cluster the ACLs are bound to and every identity."""

    cluster: str
    identities: tuple[Identity, ...]

    def get(self, name: str) -> Identity | None:
        return next((i for i in self.identities if i.name == name), None)

    def of_role(self, role: Role) -> tuple[Identity, ...]:
        return tuple(i for i in self.identities if i.role is role)


def hash_password(password: str, salt: bytes | None = None) -> str:
    """Mosquitto's "$7$" password hash: PBKDF2-HMAC-SHA512, 101 iterations, 12-byte salt."""
    salt = salt if salt is not None else secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, PBKDF2_ITERATIONS)
    encoded = (base64.b64encode(part).decode() for part in (salt, digest))
    return f"$7${PBKDF2_ITERATIONS}${next(encoded)}${next(encoded)}"


def load_registry(state: StateDir) -> Registry:
    """Read identities.toml; ConfigError naming the file and the problem."""
    if not state.registry.exists():
        raise ConfigError(
            f"{state.root} is not an edgesplit state folder (no {REGISTRY_FILE}); "
            "run `edgesplit creds init` first"
        )
    return read_registry(state.registry)


def read_registry(path: Path) -> Registry:
    """Read an identities.toml file; ConfigError naming the file and the problem."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise ConfigError(f"identity registry {path}: {error}") from None
    try:
        identities = tuple(
            Identity(str(entry["name"]), Role(entry["role"]), int(entry.get("trust", 0)))
            for entry in data.get("identity", [])
        )
        return Registry(validate_id(str(data["cluster"]), "cluster id"), identities)
    except (KeyError, ValueError, TypeError) as error:
        raise ConfigError(f"{path}: invalid entry ({error})") from None


def _write_registry(state: StateDir, registry: Registry) -> None:
    lines = ["# edgesplit identities: written by `edgesplit creds`; role and trust per identity.",
             f'cluster = "{registry.cluster}"']  # fmt: skip
    for identity in registry.identities:
        lines += ["", "[[identity]]", f'name = "{identity.name}"',
                  f'role = "{identity.role.value}"', f"trust = {identity.trust}"]  # fmt: skip
    temporary = state.registry.with_suffix(".tmp")
    temporary.write_text("\n".join(lines) + "\n")
    temporary.replace(state.registry)


def _write_acl(state: StateDir, registry: Registry) -> None:
    temporary = state.acl.with_suffix(".tmp")
    temporary.write_text(render_acl(registry.identities, registry.cluster))
    temporary.replace(state.acl)


def _issue(state: StateDir, identity: Identity) -> Credentials:
    """Certificate, key and password of a new identity; appends its password hash."""
    if identity.name == BROKER_CERT_NAME:
        raise ConfigError(f"{BROKER_CERT_NAME!r} is reserved for the broker's certificate")
    credentials = state.credentials(identity.name)
    pki.issue(state.ca, state.certs, identity.name)
    state.secrets.mkdir(mode=0o700, exist_ok=True)
    password = secrets.token_urlsafe(24)
    pki.write_private(credentials.password_file, (password + "\n").encode())
    fd = os.open(state.passwords, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a") as passwords:
        passwords.write(f"{identity.name}:{hash_password(password)}\n")
    return credentials


def init_state(root: Path, topology: Topology | None, cluster: str = "default") -> Registry:
    """Create a state folder: CA, broker certificate, the standard service identities,
    one worker per topology node (its trust from the topology) and the signing roles'
    Ed25519 keys (shared/security/role_keys.py). ConfigError if ``root``
    already holds a registry or a CA."""
    state = StateDir(root)
    validate_id(cluster, "cluster id")
    if state.registry.exists() or state.ca.cert_file.exists():
        raise ConfigError(f"{root} is already initialised; not overwriting it "
                          "(use `edgesplit creds add-node`, or another --state)")  # fmt: skip
    identities = [Identity(name, role) for name, role in SERVICE_IDENTITIES]
    for node in topology.nodes if topology else ():
        if any(node.id == i.name for i in identities) or node.id == BROKER_CERT_NAME:
            raise ConfigError(f"topology node {node.id!r} has the name of a service identity")
        identities.append(Identity(node.id, Role.WORKER, node.trust))
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    pki.create_ca(state.root / "ca")
    pki.issue(state.ca, state.certs, BROKER_CERT_NAME, server_names=SERVER_NAMES)
    for identity in identities:
        _issue(state, identity)
    registry = Registry(cluster, tuple(identities))
    _write_registry(state, registry)
    _write_acl(state, registry)
    write_broker_config(state, DEFAULT_TLS_PORT, DEFAULT_PASSWORD_PORT, state.root / "broker")
    ensure_role_keys(state.root / KEYS_DIR)  # each signing role's Ed25519 key pair
    return registry


def add_identity(root: Path, name: str, role: Role, trust: int) -> Credentials:
    """Issue credentials for a new identity and add it to the registry and the ACL."""
    state = StateDir(root)
    registry = load_registry(state)
    identity = Identity(validate_id(name, "identity name"), role, trust)
    if registry.get(name) is not None:
        raise ConfigError(f"identity {name!r} already exists in {state.registry}")
    credentials = _issue(state, identity)
    registry = Registry(registry.cluster, (*registry.identities, identity))
    _write_registry(state, registry)
    _write_acl(state, registry)
    return credentials


def data_broker_url(broker_url: str) -> str:
    """The data listener's URL for the control listener's ``mqtts://HOST:PORT`` (PORT + 1)."""
    head, _, port = broker_url.rpartition(":")
    if not port.isdigit():
        raise ConfigError(f"secure broker URL {broker_url!r} has no port")
    return f"{head}:{int(port) + DATA_PORT_OFFSET}"


def render_broker_config(state: StateDir, tls_port: int, password_port: int, data_dir: Path,
                         bind_address: str = "127.0.0.1") -> str:  # fmt: skip
    """deploy/mosquitto/secure.conf.template filled in for ``state`` (the data listener on
    ``tls_port`` + 1)."""
    return TEMPLATE.read_text().format(
        tls_port=tls_port, data_port=tls_port + DATA_PORT_OFFSET, password_port=password_port,
        bind_address=bind_address,
        data_dir=data_dir, user=getpass.getuser(), ca_file=state.ca.cert_file,
        cert_file=state.server.cert_file, key_file=state.server.key_file,
        password_file=state.passwords, acl_file=state.acl,
    )  # fmt: skip


def write_broker_config(state: StateDir, tls_port: int, password_port: int, data_dir: Path,
                        path: Path | None = None) -> Path:  # fmt: skip
    """Render the broker config to ``path`` (default STATE/mosquitto-secure.conf)."""
    target = path or state.broker_config
    target.write_text(render_broker_config(state, tls_port, password_port, data_dir))
    return target


def client_environment(state: StateDir, name: str, broker_url: str) -> dict[str, str]:
    """EDGESPLIT_* variables that make a process connect as ``name`` (certificate and
    key for mqtts://, the data plane on the data listener, the identity as origin so its
    reply topics are its own)."""
    credentials = state.credentials(name)
    if not credentials.cert_file.is_file():
        raise ConfigError(f"no credentials for {name!r} in {state.root}")
    variables = {
        "EDGESPLIT_BROKER_URL": broker_url,
        "EDGESPLIT_DATA_BROKER_URL": data_broker_url(broker_url),
        "EDGESPLIT_TLS_CA_FILE": str(credentials.ca_file),
        "EDGESPLIT_TLS_CERT_FILE": str(credentials.cert_file),
        "EDGESPLIT_TLS_KEY_FILE": str(credentials.key_file),
        "EDGESPLIT_CLIENT_ID": name,
    }
    keys = state.root / KEYS_DIR  # the roles' keys (`up --secure` creates them)
    if (keys / "public").is_dir():
        variables["EDGESPLIT_ROLE_KEYS_DIR"] = str(keys / "public")
    if private_key_file(keys, name).is_file():  # a signing role's own private key
        variables["EDGESPLIT_ROLE_KEY_FILE"] = str(private_key_file(keys, name))
    return variables
