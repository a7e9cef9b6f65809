"""What deploy/containers/compose.secure.yaml mounts, from a secure state folder
(`edgesplit creds compose`, docs/DEPLOY.md "Secure profile in containers").

``export_compose(state, out)`` writes one folder per container, each holding only that
container's secrets, under the names the compose file expects:

* ``OUT/mosquitto/``: ``mosquitto.conf`` (deploy/mosquitto/secure.conf.template for the
  container's paths: TLS listener 8883, data listener 8884, on all addresses; the
  password listener on the container's loopback; ``allow_anonymous false``), ``ca.crt``,
  a broker certificate issued by the state's CA for ``broker_host`` (the name the other
  containers use) and localhost, ``passwords`` and ``acl`` (the state's, as they are).
* ``OUT/NAME/`` for each service, the gateway and each worker identity: ``tls.crt``,
  ``tls.key`` (its identity), ``ca.crt``, ``role-keys/`` (every signing role's public
  key), ``identities.toml`` (the registry: placement trust), ``role.key`` (its own
  private role key, signing roles only), ``signing.key`` (the cluster key: workers,
  broadcaster and split reviser, as `up --secure` gives it), and for each checked
  container ``health.crt``/``health.key``: a client identity ``health-NAME`` of its own, so
  the health check never takes over the process's session (added to the state when
  missing).
* ``OUT/gateway.env``: ``EDGESPLIT_GATEWAY_API_KEY=...`` (compose's ``env_file``), the key
  the caller gives (`creds compose`: STATE/gateway-api-key, made when missing, or
  $EDGESPLIT_GATEWAY_API_KEY, as `up --secure`).

Folders are 0700 and secrets 0600, owned by the images' users (``uid``: 10001,
``broker_uid``: 10002), which needs root unless those are the caller's own id.
Blocking file work: call it from a thread in async code.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from shared.errors import ConfigError
from shared.security import pki
from shared.security.acl import Role
from shared.security.creds import (
    SERVER_NAMES,
    SERVICE_IDENTITIES,
    TEMPLATE,
    StateDir,
    add_identity,
    load_registry,
)
from shared.security.role_keys import KEYS_DIR, ensure_role_keys, private_key_file
from shared.security.signing import ensure_key_file

CONTROL_SERVICES = ("monitor", "orchestrator", "split-reviser", "broadcaster")
"""The control services compose.secure.yaml runs, each as its own identity."""
GATEWAY = "gateway"
WITHOUT_CLUSTER_KEY = frozenset({"monitor", "orchestrator", GATEWAY})
"""They sign with their role keys alone (as in `edgesplit up --secure`)."""
HEALTH_PREFIX = "health-"
TLS_PORT, DATA_PORT, PASSWORD_PORT = 8883, 8884, 1884
"""The listeners inside the broker container."""
BROKER_DIR = "mosquitto"
IMAGE_UID, BROKER_UID = 10001, 10002
"""The users the edgesplit and Mosquitto images run as (deploy/containers/Dockerfile.*)."""


@dataclass(frozen=True)
class ComposeExport:
    """What `export_compose` wrote: the folder, the cluster, the containers' names, and
    the identities it added to the state folder."""

    out: Path
    cluster: str
    workers: tuple[str, ...]
    added: tuple[str, ...]


def broker_config(folder: str = f"/{BROKER_DIR}") -> str:
    """The secure broker configuration for the container (its files under ``folder``)."""
    return TEMPLATE.read_text().format(
        tls_port=TLS_PORT, data_port=DATA_PORT, password_port=PASSWORD_PORT, bind_address="0.0.0.0",
        data_dir="/var/lib/mosquitto", user="mosquitto", ca_file=f"{folder}/ca.crt",
        cert_file=f"{folder}/broker.crt", key_file=f"{folder}/broker.key",
        password_file=f"{folder}/passwords", acl_file=f"{folder}/acl",
    )  # fmt: skip


def export_compose(root: Path, out: Path, api_key: str, broker_host: str = "mosquitto",
                   uid: int = IMAGE_UID, broker_uid: int = BROKER_UID) -> ComposeExport:  # fmt: skip
    """Write ``out`` (new or empty) from the state folder ``root``; ``api_key`` is the
    gateway's (services/cli/secure_up.py `gateway_api_key`). Raises ConfigError
    (no state folder, ``out`` not empty, files that cannot be given to ``uid``)."""
    state = StateDir(root)
    registry = load_registry(state)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} exists and is not an empty folder; not overwriting it")
    if os.geteuid() != 0 and {uid, broker_uid} != {os.geteuid()}:
        raise ConfigError(f"the files must belong to the containers' users (uid {uid}, {broker_uid}): run "
                          f"as root, or give --uid {os.geteuid()} --broker-uid {os.geteuid()} when the "
                          "containers run as you")  # fmt: skip
    added: list[str] = []
    if registry.get(GATEWAY) is None:  # a state folder older than the gateway's role
        add_identity(root, GATEWAY, Role.GATEWAY, trust=0)
        added.append(GATEWAY)
    workers = tuple(identity.name for identity in registry.of_role(Role.WORKER))
    missing = [name for name, _ in SERVICE_IDENTITIES if load_registry(state).get(name) is None]
    if missing:
        raise ConfigError(f"{root} has no identity for {', '.join(missing)}")
    checked = (*CONTROL_SERVICES, *workers)
    for name in checked:
        if load_registry(state).get(HEALTH_PREFIX + name) is None:
            add_identity(root, HEALTH_PREFIX + name, Role.CLIENT, trust=0)
            added.append(HEALTH_PREFIX + name)
    keys = ensure_role_keys(root / KEYS_DIR)
    cluster_key = ensure_key_file(root)

    out.mkdir(parents=True, exist_ok=True, mode=0o755)
    broker = _folder(out / BROKER_DIR)
    shutil.copyfile(state.ca.cert_file, broker / "ca.crt")
    pki.issue(state.ca, broker, "broker", server_names=(broker_host, *SERVER_NAMES))
    shutil.copyfile(state.passwords, broker / "passwords")
    shutil.copyfile(state.acl, broker / "acl")
    (broker / "mosquitto.conf").write_text(broker_config())
    _own(broker, broker_uid)

    for name in (*CONTROL_SERVICES, GATEWAY, *workers):
        folder = _folder(out / name)
        credentials = state.credentials(name)
        shutil.copyfile(credentials.cert_file, folder / "tls.crt")
        shutil.copyfile(credentials.key_file, folder / "tls.key")
        shutil.copyfile(state.ca.cert_file, folder / "ca.crt")
        shutil.copytree(keys / "public", folder / "role-keys")
        shutil.copyfile(state.registry, folder / "identities.toml")
        if private_key_file(keys, name).is_file():  # named as its role: the loader reads the role from it
            (folder / "role-key").mkdir()
            shutil.copyfile(private_key_file(keys, name), folder / "role-key" / f"{name}.key")
        if name not in WITHOUT_CLUSTER_KEY:
            shutil.copyfile(cluster_key, folder / "signing.key")
        if name in checked:
            health = state.credentials(HEALTH_PREFIX + name)
            shutil.copyfile(health.cert_file, folder / "health.crt")
            shutil.copyfile(health.key_file, folder / "health.key")
        _own(folder, uid)

    env_file = out / "gateway.env"
    pki.write_private(env_file, f"EDGESPLIT_GATEWAY_API_KEY={api_key}\n".encode())
    return ComposeExport(out, registry.cluster, workers, tuple(added))


def _folder(path: Path) -> Path:
    path.mkdir(mode=0o700)
    return path


def _own(folder: Path, uid: int) -> None:
    """``folder`` and everything in it: owned by ``uid`` (its group too), 0700 / 0600."""
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o700 if path.is_dir() else 0o600)
        try:
            os.chown(path, uid, uid)
        except PermissionError:
            raise ConfigError(f"cannot give {path} to uid {uid}: run as root") from None
