"""`edgesplit creds`: the secure profile's state folder (shared/security/creds.py).

``creds init`` creates a development CA, the broker's certificate and the identities of
the standard roles plus one worker per node of a topology; ``creds add-node NAME --trust
N``, ``creds add-client NAME`` and ``creds add-operator NAME`` issue credentials for one
more identity and add it to the registry and the ACL; ``creds rotate ROLE`` replaces a
signing role's key pair (the old one kept under keys/retired); ``creds list`` prints the
registry; ``creds compose --out DIR`` writes what deploy/containers/compose.secure.yaml
mounts (shared/security/compose_export.py). Bad input is one line on stderr and exit
status 2; existing files are never overwritten.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from pathlib import Path
from typing import Any

from services.cli.secure_up import gateway_api_key
from shared.errors import ConfigError
from shared.security.acl import Role
from shared.security.compose_export import BROKER_UID, CONTROL_SERVICES, IMAGE_UID, export_compose
from shared.security.creds import (
    Credentials,
    StateDir,
    add_identity,
    default_state_dir,
    init_state,
    load_registry,
)
from shared.security.role_keys import KEYS_DIR, SIGNING_ROLES, rotate_role_key
from shared.topology import DEFAULT_TOPOLOGY, load_topology


def _trust(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 0 <= value <= 10:
        raise argparse.ArgumentTypeError(f"{value} is outside 0-10")
    return value


def register(subparsers: Any) -> None:
    creds = subparsers.add_parser(
        "creds", help="credentials of the secure profile: CA, identities, ACLs",
        description="Create and extend the secure profile's state folder (docs/SECURITY.md).",
    )  # fmt: skip
    commands = creds.add_subparsers(dest="creds_command", metavar="COMMAND",
                                    parser_class=type(creds))  # fmt: skip
    commands.required = True
    state_help = "state folder (default $EDGESPLIT_STATE_DIR or ~/.local/state/edgesplit/secure)"

    init = commands.add_parser("init", help="create the CA and the standard identities")
    init.add_argument("--state", type=Path, help=state_help)
    init.add_argument("--topology", type=Path,
                      help="one worker identity per node, with its trust (default "
                           "deploy/topologies/default.toml)")  # fmt: skip
    init.add_argument("--cluster", default="default", help="the cluster the ACLs cover (default 'default')")
    init.set_defaults(handler=run_init)

    node = commands.add_parser("add-node", help="issue credentials for a new worker node")
    node.add_argument("name", help="the node id (its identity)")
    node.add_argument("--trust", type=_trust, required=True, help="trust level 0-10")
    node.add_argument("--state", type=Path, help=state_help)
    node.set_defaults(handler=run_add, role=Role.WORKER)

    client = commands.add_parser("add-client", help="issue credentials for a new client")
    client.add_argument("name", help="the client id (its identity; its replies topic)")
    client.add_argument("--state", type=Path, help=state_help)
    client.set_defaults(handler=run_add, role=Role.CLIENT, trust=0)

    operator = commands.add_parser("add-operator", help="issue credentials for another operator identity "
                                   "(e.g. for `edgesplit status` while `up --secure` holds 'operator')")  # fmt: skip
    operator.add_argument("name", help="the identity's name")
    operator.add_argument("--state", type=Path, help=state_help)
    operator.set_defaults(handler=run_add, role=Role.OPERATOR, trust=0)

    rotate = commands.add_parser("rotate", help="replace a signing role's key pair (then restart every process)")
    rotate.add_argument("role", help=f"the signing role ({', '.join(SIGNING_ROLES)})")
    rotate.add_argument("--state", type=Path, help=state_help)
    rotate.set_defaults(handler=run_rotate)

    compose = commands.add_parser(
        "compose", help="write what deploy/containers/compose.secure.yaml mounts",
        description="One folder per container of compose.secure.yaml with only its own secrets, "
                    "the broker's TLS config, and the gateway's API key (docs/DEPLOY.md).")  # fmt: skip
    compose.add_argument("--state", type=Path, help=state_help)
    compose.add_argument("--out", type=Path, required=True, help="a new or empty folder (EDGESPLIT_SECURE_DIR)")
    compose.add_argument("--broker-host", default="mosquitto",
                         help="the broker's name on the containers' network, put in its certificate "
                              "(default mosquitto; localhost is always in it)")  # fmt: skip
    compose.add_argument("--uid", type=_uid, default=IMAGE_UID,
                         help=f"owner of the services' folders (default {IMAGE_UID}, the images' user)")
    compose.add_argument("--broker-uid", type=_uid, default=BROKER_UID,
                         help=f"owner of the broker's folder (default {BROKER_UID}, Mosquitto's image user)")
    compose.set_defaults(handler=run_compose)

    listing = commands.add_parser("list", help="the identities, their roles and trust")
    listing.add_argument("--state", type=Path, help=state_help)
    listing.add_argument("--json", action="store_true", help="print one JSON object")
    listing.set_defaults(handler=run_list)


def _uid(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a user id: {text!r}") from None
    if not 0 <= value < 2**31:
        raise argparse.ArgumentTypeError(f"{value} is no user id")
    return value


def _state(args: argparse.Namespace) -> Path:
    return Path(args.state).expanduser() if args.state else default_state_dir()


def _refuse(error: ConfigError) -> int:
    print(f"edgesplit: error: {error}", file=sys.stderr)
    return 2


def run_init(args: argparse.Namespace) -> int:
    root = _state(args)
    try:
        topology = load_topology(args.topology or DEFAULT_TOPOLOGY)
        registry = init_state(root, topology, cluster=args.cluster)
    except ConfigError as error:
        return _refuse(error)
    state = StateDir(root)
    print(f"created {root}: CA {state.ca.cert_file}, {len(registry.identities)} identities "
          f"for cluster {registry.cluster}")  # fmt: skip
    for identity in registry.identities:
        print(f"  {identity.name:<16} {identity.role.value:<14} trust {identity.trust}")
    print(f"broker config {state.broker_config} (start it with `mosquitto -c {state.broker_config}`, "
          "or run `edgesplit up --secure`)")  # fmt: skip
    return 0


def run_add(args: argparse.Namespace) -> int:
    root = _state(args)
    try:
        credentials = add_identity(root, args.name, args.role, args.trust)
    except ConfigError as error:
        return _refuse(error)
    _print_credentials(args.role, args.name, args.trust, credentials, StateDir(root))
    return 0


def _print_credentials(role: Role, name: str, trust: int, credentials: Credentials,
                       state: StateDir) -> None:  # fmt: skip
    print(f"issued {role.value} {name} (trust {trust}):")
    print(f"  certificate {credentials.cert_file}")
    print(f"  key         {credentials.key_file}")
    print(f"  password    {credentials.password_file}")
    print(f"  CA          {credentials.ca_file}")
    print(f"added to {state.registry} and {state.acl}; a running broker reads them again on "
          "SIGHUP (kill -HUP <mosquitto pid>)")  # fmt: skip


def run_rotate(args: argparse.Namespace) -> int:
    root = _state(args)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S%fZ")
    try:
        load_registry(StateDir(root))  # a state folder, not any folder
        public = rotate_role_key(root / KEYS_DIR, args.role, stamp)
    except ConfigError as error:
        return _refuse(error)
    print(f"rotated the {args.role} key: new public key {public}, the old pair in {root / KEYS_DIR / 'retired'}")
    print("restart every process of the cluster (they read the public keys at start; `edgesplit up --secure` "
          "does on its next start); until then they refuse what the new key signs")  # fmt: skip
    return 0


def run_compose(args: argparse.Namespace) -> int:
    root = _state(args)
    try:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.:-]{0,252}", args.broker_host):
            raise ConfigError(f"--broker-host {args.broker_host!r} is no host name or address")
        load_registry(StateDir(root))  # a state folder, before any key is made in it
        api_key, _ = gateway_api_key(root)
        done = export_compose(root, Path(args.out).expanduser(), api_key, args.broker_host,
                              args.uid, args.broker_uid)  # fmt: skip
    except ConfigError as error:
        return _refuse(error)
    print(f"wrote {done.out} for cluster {done.cluster}: mosquitto, {', '.join(CONTROL_SERVICES)}, "
          f"gateway, workers {', '.join(done.workers) or '(none)'}")  # fmt: skip
    if done.added:
        print(f"added to {root}: {', '.join(done.added)}")
    print(f"run: EDGESPLIT_SECURE_DIR={done.out} EDGESPLIT_CLUSTER={done.cluster} EDGESPLIT_SHARDS_HOST_DIR=... "
          "docker-compose -f deploy/containers/compose.secure.yaml up -d")  # fmt: skip
    return 0


def run_list(args: argparse.Namespace) -> int:
    root = _state(args)
    try:
        registry = load_registry(StateDir(root))
    except ConfigError as error:
        return _refuse(error)
    if args.json:
        print(json.dumps({"state": str(root), "cluster": registry.cluster, "identities": [
            {"name": i.name, "role": i.role.value, "trust": i.trust} for i in registry.identities
        ]}))  # fmt: skip
        return 0
    print(f"{root}: cluster {registry.cluster}, {len(registry.identities)} identities")
    for identity in registry.identities:
        print(f"  {identity.name:<16} {identity.role.value:<14} trust {identity.trust}")
    return 0
