"""Per-role access rules, generated from the topic registry (shared/topics.py).

Each role lists, for the topics it uses, whether it may publish and subscribe, and on
whose instances: ``OWN`` is the instance whose parameter is the identity itself (the
``%u`` of Mosquitto's patterns: a worker's own ``nodes/{node}/status``, a client's own
``clients/{client}/replies``), ``ANY`` is every instance. The grants follow what each
service's code really publishes and subscribes to (docs/ARCHITECTURE.md, "who
publishes, who subscribes"); everything not granted is denied.

Mosquitto's ``pattern`` lines apply to every user, so a role-scoped ``%u`` rule cannot be
written as one; `render_acl` therefore writes one ``user`` block per identity with the
identity substituted, which is what ``%u`` would have matched. Rules are bound to one
cluster (``edgesplit/{cluster}/...``). `rules_for` is pure and is what the unit tests read.

Each identity has two usernames, one per listener of the secure profile: its name (the
certificate's common name, the control listener) and its certificate's subject
(``CN=NAME,O=edgesplit``, the data listener; `pki.subject_username`). Both get the same
rules. The broker makes each username its MQTT client id, so an identity holds one
session per listener and can take over no one else's (docs/SECURITY.md).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from shared.errors import ConfigError
from shared.ids import validate_id
from shared.security.pki import subject_username
from shared.topics import (
    ACTIVATIONS,
    CAPACITY,
    DECISIONS,
    EMULATION,
    EMULATION_STATE,
    EPOCH_ACKS,
    EPOCH_COMMANDS,
    FINISHED,
    NODE_STATUS,
    PLAN,
    POLICY,
    PROFILE_EVENTS,
    REGISTRY,
    REPLIES,
    REQUESTS,
    REVISER_REPLIES,
    REVISER_REQUESTS,
    ROLLOUT_LEDGER,
    ROLLOUT_RESULTS,
    ROLLOUTS,
    ROOT,
    SERVICE_STATUS,
    TELEMETRY,
    Topic,
)


class Role(enum.Enum):
    """What an identity is; its ACL follows from it."""

    WORKER = "worker"
    BROADCASTER = "broadcaster"
    ORCHESTRATOR = "orchestrator"
    SPLIT_REVISER = "split_reviser"
    MONITOR = "monitor"
    OPERATOR = "operator"
    CLIENT = "client"
    GATEWAY = "gateway"


class Scope(enum.Enum):
    OWN = "own"
    """Only the instance whose (single) topic parameter is the identity's name."""
    ANY = "any"
    """Every instance of the topic."""
    BROKER = "broker"
    """Only the instance named ``broker``: the broker's refusal counts, which the launcher
    of `up --secure` publishes (shared/security/broker_audit.py)."""


@dataclass(frozen=True)
class Grant:
    """What a role may do on one topic: publish and/or subscribe, and on which instances."""

    publish: Scope | None = None
    subscribe: Scope | None = None


PUB, SUB, BOTH = Grant(publish=Scope.ANY), Grant(subscribe=Scope.ANY), Grant(Scope.ANY, Scope.ANY)

GRANTS: Mapping[Role, Mapping[Topic[Any], Grant]] = {
    Role.WORKER: {
        # its own liveness and measurements (and the broker publishes its Last Will there)
        NODE_STATUS: Grant(publish=Scope.OWN, subscribe=Scope.ANY),  # peers: probes, health
        TELEMETRY: Grant(publish=Scope.OWN),
        EMULATION_STATE: Grant(publish=Scope.OWN),
        EPOCH_ACKS: Grant(publish=Scope.OWN),
        # what it serves: its own requests, emulation commands and frames
        REQUESTS: Grant(subscribe=Scope.OWN),
        EMULATION: Grant(subscribe=Scope.OWN),
        ACTIVATIONS: Grant(publish=Scope.ANY, subscribe=Scope.OWN),  # frames go to any node
        # as the entry: answers to any client, and every finished generation once more
        REPLIES: Grant(publish=Scope.ANY),
        FINISHED: PUB,
        # what steers it
        PLAN: SUB,
        EPOCH_COMMANDS: SUB,
        POLICY: SUB,  # its privacy guard
        PROFILE_EVENTS: SUB,  # health: NodeDown of a peer
        DECISIONS: SUB,  # health: an emergency without a plan
    },
    Role.BROADCASTER: {
        PLAN: BOTH,
        EPOCH_COMMANDS: PUB,
        EPOCH_ACKS: SUB,
        ROLLOUTS: SUB,
        ROLLOUT_RESULTS: PUB,
        ROLLOUT_LEDGER: BOTH,
        POLICY: SUB,  # refuses a rollout that breaks the policy in force (signing.py)
        SERVICE_STATUS: Grant(Scope.OWN, Scope.OWN),  # refusal counters; `edgesplit health` reads
        NODE_STATUS: SUB,  # a node of the rollout went down (Last Will): abort at once
        PROFILE_EVENTS: SUB,  # the monitor's NodeDown (a frozen node has no Last Will yet)
    },
    Role.ORCHESTRATOR: {
        PLAN: SUB,
        POLICY: SUB,
        DECISIONS: BOTH,
        CAPACITY: SUB,
        PROFILE_EVENTS: SUB,
        ROLLOUT_RESULTS: SUB,
        FINISHED: SUB,
        REVISER_REQUESTS: PUB,
        REVISER_REPLIES: Grant(subscribe=Scope.OWN),
        ROLLOUTS: PUB,
        SERVICE_STATUS: Grant(Scope.OWN, Scope.OWN),
    },
    Role.SPLIT_REVISER: {
        REVISER_REQUESTS: SUB,
        REVISER_REPLIES: Grant(publish=Scope.ANY),  # to whoever asked (reply_to)
        SERVICE_STATUS: Grant(Scope.OWN, Scope.OWN),  # its heartbeat; `edgesplit health` reads
    },
    Role.MONITOR: {
        NODE_STATUS: SUB,
        TELEMETRY: SUB,
        EMULATION_STATE: SUB,
        CAPACITY: BOTH,  # reads its own retained profile back after a restart
        PROFILE_EVENTS: PUB,
        SERVICE_STATUS: Grant(Scope.OWN, Scope.OWN),
    },
    Role.OPERATOR: {  # and it reads everything: READ_ALL
        POLICY: PUB,
        EMULATION: PUB,
        SERVICE_STATUS: Grant(publish=Scope.BROKER),  # `up --secure` reports the broker's refusals
    },
    Role.CLIENT: {
        REQUESTS: Grant(publish=Scope.ANY),  # to the entry the plan names
        REPLIES: Grant(subscribe=Scope.OWN),
        PLAN: SUB,
        NODE_STATUS: SUB,
        PROFILE_EVENTS: SUB,
        SERVICE_STATUS: SUB,  # `edgesplit status`
    },
    Role.GATEWAY: {  # a client of the request topics that also draws the dashboard
        REQUESTS: Grant(publish=Scope.ANY),  # to the entry the plan names
        REPLIES: Grant(subscribe=Scope.OWN),
        PLAN: SUB,
        NODE_STATUS: SUB,
        PROFILE_EVENTS: SUB,
        CAPACITY: SUB,  # the dashboard's nodes and links
        DECISIONS: SUB,  # the dashboard's decisions
    },
}


READ_ALL = frozenset({Role.OPERATOR})
"""Roles that may subscribe to every topic of their cluster (``edgesplit/{cluster}/#``)."""


@dataclass(frozen=True)
class Identity:
    """An authenticated identity: its name (the MQTT username, the certificate's CN),
    its role and its trust level (0-10; what the orchestrator will trust it with)."""

    name: str
    role: Role
    trust: int = 0

    def __post_init__(self) -> None:
        validate_id(self.name, "identity name")
        if not 0 <= self.trust <= 10:
            raise ConfigError(f"identity {self.name!r}: trust {self.trust} is outside 0-10")


Access = Literal["read", "write", "readwrite"]


@dataclass(frozen=True)
class Rule:
    """One Mosquitto ``topic`` line: ``topic ACCESS FILTER``."""

    access: Access
    filter: str


def _instance(topic: Topic[Any], cluster: str, scope: Scope, identity: str) -> str:
    if scope is Scope.ANY:
        return topic.filter(cluster)
    if len(topic.params) != 1:
        raise ConfigError(f"topic {topic.pattern!r}: '{scope.value}' needs exactly one parameter")
    return topic.topic(cluster, **{topic.params[0]: "broker" if scope is Scope.BROKER else identity})


def rules_for(identity: Identity, cluster: str) -> tuple[Rule, ...]:
    """The topic rules of ``identity`` in ``cluster``, in registry order."""
    grants = GRANTS[identity.role]
    rules: list[Rule] = []
    if identity.role in READ_ALL:
        rules.append(Rule("read", f"{ROOT}/{cluster}/#"))
    for topic in REGISTRY.values():
        grant = grants.get(topic)
        if grant is None:
            continue
        write = _instance(topic, cluster, grant.publish, identity.name) if grant.publish else None
        read = _instance(topic, cluster, grant.subscribe, identity.name) if grant.subscribe else None
        if write is not None and write == read:
            rules.append(Rule("readwrite", write))
            continue
        if write is not None:
            rules.append(Rule("write", write))
        if read is not None:
            rules.append(Rule("read", read))
    return tuple(rules)


def render_acl(identities: Iterable[Identity], cluster: str) -> str:
    """The Mosquitto ``acl_file`` text: one ``user`` block per identity, nothing for
    anonymous clients (who cannot connect anyway)."""
    validate_id(cluster, "cluster id")
    lines = [
        "# Generated by edgesplit (shared/security/acl.py) from the topic registry; do not edit:",
        "# `edgesplit creds add-node` and `creds init` rewrite it. Everything not listed is denied.",
        f"# cluster {cluster}",
    ]
    seen: set[str] = set()
    for identity in sorted(identities, key=lambda i: i.name):
        if identity.name in seen:
            raise ConfigError(f"identity {identity.name!r} is listed twice")
        seen.add(identity.name)
        rules = [f"topic {rule.access} {rule.filter}" for rule in rules_for(identity, cluster)]
        for username in (identity.name, subject_username(identity.name)):  # control, data listener
            lines += ["", f"# {identity.role.value}, trust {identity.trust}", f"user {username}", *rules]
    return "\n".join(lines) + "\n"
