"""The cluster's control key, and the gate every receiver of control messages passes.

Control messages that change the cluster (plans, epoch commands, the ledger, rollout
requests, decisions, the privacy policy, emulation commands, NodeDown / NodeJoined)
carry a ``signature``: HMAC-SHA256 over the canonical encoding of the message
(shared.messages.base.sign) with one **cluster key per state or run folder**.
`edgesplit up` generates it (`ensure_key_file`) and passes it to every process it starts
as ``EDGESPLIT_PLAN_SIGNING_KEY_FILE``; the bus signs what it publishes with it.

No default key: a process on the secure profile (an ``mqtts://`` broker) without a key
refuses to start (`require_control_key`, one line). On the open laptop profile a process
without a key uses the public development key and logs a warning once.

`ControlGate` is what a receiver asks before acting on a control message: the signature
must check out and, for plans and epoch commands, the epoch must not be below the
highest epoch the receiver has committed (a replay); the kinds without an epoch
(NodeDown, NodeJoined, EmulationCommand, DecisionRecorded) must have been issued within
``max_message_age_s`` (`timely`) and be newer than what the receiver saw (`current`).
Every refusal is counted under ``{Kind}_{why}`` (`REFUSALS`); a worker shows them in its NodeStatus, so
`edgesplit status` lists them.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from shared.config import DEFAULT_MAX_MESSAGE_AGE_S, BusSettings
from shared.errors import ConfigError
from shared.messages.base import Message, is_signed_kind, signature_ok
from shared.security.replay_memory import ReplayMemory, memory_file
from shared.security.role_keys import RoleVerifier, load_signer, role_verifier
from shared.topics import DECISION_SLOTS

log = logging.getLogger(__name__)

DEV_SIGNING_KEY = "edgesplit-dev-key"
"""Public, in the source: only ever used on the open profile, with a warning."""
KEY_FILE = "signing.key"
"""The key's file name in a state folder (`up --secure`) or run folder (`up`)."""
MIN_KEY_CHARS = 16
START_MARGIN_S = 2.0
"""How far a publisher's clock may be behind a receiver's before the receiver's start
fence (`receiver_fences`) takes the publisher's first messages for replays."""
REFUSALS = ("unsigned", "forged", "role", "replayed", "stale", "private", "implausible", "takenover")
"""Why a control message is refused: the suffix of its counter ``{Kind}_{why}``."""
_warned_dev_key = False


def configured_key(settings: BusSettings) -> str | None:
    """The key given by settings (``plan_signing_key``, else the contents of
    ``plan_signing_key_file``), or None. ConfigError for an unreadable or short key."""
    key = settings.plan_signing_key
    source = "plan_signing_key"
    if key is None and settings.plan_signing_key_file is not None:
        source = str(settings.plan_signing_key_file)
        try:
            key = settings.plan_signing_key_file.read_text().strip()
        except OSError as error:
            raise ConfigError(f"control signing key file unreadable: {error}") from None
    if key is None and not settings.broker.tls:
        local = local_key_file(settings)
        if local.is_file():  # the open profile's key `up` keeps for this broker and cluster
            source = str(local)
            try:
                key = local.read_text().strip()
            except OSError as error:
                raise ConfigError(f"control signing key file unreadable: {error}") from None
    if key is None:
        return None
    if len(key) < MIN_KEY_CHARS and key != DEV_SIGNING_KEY:
        raise ConfigError(f"control signing key from {source} is shorter than {MIN_KEY_CHARS} characters")
    return key


def control_key(settings: BusSettings) -> str | None:
    """The key this process signs and verifies with: the configured one; on the open
    profile the public development key (warned once); None on the secure profile."""
    key = configured_key(settings)
    if key is not None or settings.broker.tls:
        return key
    global _warned_dev_key
    if not _warned_dev_key:
        _warned_dev_key = True
        log.warning("no control signing key set (EDGESPLIT_PLAN_SIGNING_KEY[_FILE]): control messages "
                    "are signed with the PUBLIC development key; anyone on the broker can forge them")  # fmt: skip
    return DEV_SIGNING_KEY


def require_control_key(settings: BusSettings, service: str) -> str:
    """`control_key`, or ConfigError (one line) for a service on the secure profile."""
    key = control_key(settings)
    if key is None:
        raise ConfigError(
            f"{service} refuses to start: the secure profile ({settings.broker.redacted()}) needs the "
            "cluster's control signing key (EDGESPLIT_PLAN_SIGNING_KEY_FILE=STATE/signing.key, as "
            "`edgesplit up --secure` passes it)"
        )
    return key


def require_signing_key(settings: BusSettings, service: str) -> None:
    """For a control service that only signs (the monitor, the orchestrator): its role
    key (checked now: ConfigError for a bad file) when it has one, else `require_control_key`.
    With a role key it needs no cluster key (that one derives frame keys, which only the
    workers and the broadcaster use)."""
    if settings.role_key_file is not None:
        load_signer(settings.role_key_file)
        return
    require_control_key(settings, service)


def receiver_fences(gate: ControlGate, settings: BusSettings | None) -> ControlGate:
    """``gate`` of a receiver process that starts now: it refuses a live message without
    an epoch issued before it started (`ControlGate.started_at_s`: no genuine one can
    reach a new subscription), and, with ``settings.replay_memory_dir``, remembers what
    it accepts there (one file per cluster and owner), so that after a restart it refuses
    what it accepted before."""
    gate.started_at_s = gate.clock()
    if settings is not None and settings.replay_memory_dir is not None:
        path = memory_file(settings.replay_memory_dir, settings.cluster, gate.owner)
        gate.memory = ReplayMemory(path, gate.max_age_s)
    return gate


def receiver_gate(settings: BusSettings, owner: str) -> ControlGate | None:
    """A gate for a process that only receives control messages (a client checking plans):
    the roles' public keys when given (the secure profile), else the cluster key when one
    is configured explicitly (``plan_signing_key[_file]``), else None: on the open profile
    without a key there is nothing to check with. ConfigError for unreadable keys."""
    verifier = role_verifier(settings)
    if verifier is not None:
        return receiver_fences(ControlGate("", owner, verifier=verifier, max_age_s=settings.max_message_age_s),
                               None)  # fmt: skip
    if settings.plan_signing_key is not None or settings.plan_signing_key_file is not None:
        key = configured_key(settings)
        gate = ControlGate(key, owner, max_age_s=settings.max_message_age_s) if key is not None else None
        return receiver_fences(gate, None) if gate is not None else None
    return None


def local_key_file(settings: BusSettings) -> Path:
    """Where `edgesplit up` (open profile) keeps the control key of a broker and cluster,
    under the user's cache folder (beside the models), so that the same user's other
    commands (`edgesplit emulate` in another terminal) sign with it without being told."""
    address = settings.broker
    name = re.sub(r"[^A-Za-z0-9._-]", "_", f"{address.host}-{address.port}-{settings.cluster}")
    return settings.models_dir.parent / "keys" / f"{name}.key"


def ensure_key_file(folder: Path, name: str = KEY_FILE) -> Path:
    """``folder``/``name`` (signing.key), created (0600, 256 random bits) when absent;
    reused otherwise."""
    path = folder / name
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(32) + "\n")
    return path


class ControlGate:
    """Checks control messages for one receiver and counts what it refuses."""

    def __init__(self, key: str, owner: str, counters: Counter[str] | None = None,
                 verifier: RoleVerifier | None = None, max_age_s: float = DEFAULT_MAX_MESSAGE_AGE_S,
                 clock: Callable[[], float] = time.time) -> None:  # fmt: skip
        self.key, self.owner = key, owner
        self.max_age_s, self.clock = max_age_s, clock
        """`timely` accepts issue times within ``max_age_s`` of ``clock()`` (Unix s)."""
        self.verifier = verifier
        """The roles' public keys (role_keys.py): when set, only the role allowed for a kind
        may sign it, and ``key`` (the cluster HMAC key) signs no control message."""
        self.counters: Counter[str] = counters if counters is not None else Counter()
        self.highest_committed = 0
        """The highest epoch this receiver committed; older plans and commands are replays."""
        self._node_event_s: dict[str, float] = {}
        """Per node, the newest ``at_s`` of a NodeDown or NodeJoined accepted."""
        self._decision_revisions: dict[int, int] = {}
        """Per decision id within the retained window, the highest revision of its record seen."""
        self._highest_decision: int | None = None
        """The highest decision id whose record this receiver accepted."""
        self.memory: ReplayMemory | None = None
        """What this receiver's earlier runs accepted (replay_memory.py; `receiver_fences`)."""
        self.started_at_s: float | None = None
        """When this receiver process started (`receiver_fences`): a live message without an
        epoch issued more than `START_MARGIN_S` before is a replay (None: not checked)."""

    def signed(self, message: Message) -> bool:
        """True when ``message`` carries a valid signature; counts and logs a refusal."""
        if not is_signed_kind(message):
            return True
        if self.verifier is not None:
            refused = self.verifier.why_refused(message)
            if refused is not None:
                detail = {"role": "signed by another role's key", "unsigned": "no signature"}
                self.refuse(message, refused, detail.get(refused, "bad signature"))
            return refused is None
        if signature_ok(message, self.key):
            return True
        why = "forged" if getattr(message, "signature", "") else "unsigned"
        self.refuse(message, why, "bad signature" if why == "forged" else "no signature")
        return False

    def fresh(self, message: Message, epoch: int) -> bool:
        """True unless ``epoch`` is below the highest committed one (a replay)."""
        if epoch >= self.highest_committed:
            return True
        self.refuse(message, "replayed", f"epoch {epoch} < committed {self.highest_committed}")
        return False

    def timely(self, message: Message) -> bool:
        """The freshness bound, which survives the receiver's restart: a message with an
        ``issued_at_s`` (stamped by the publishing bus) issued more than ``max_age_s``
        before now, or more than ``max_age_s`` ahead of now (a signer whose clock is off),
        is refused as ``stale``. Other kinds pass."""
        issued = getattr(message, "issued_at_s", None)
        if issued is None:
            return True
        age_s = self.clock() - float(issued)
        if abs(age_s) <= self.max_age_s:
            return True
        when = f"issued {age_s:.1f} s ago" if age_s > 0 else f"issued {-age_s:.1f} s in the future"
        self.refuse(message, "stale", f"{when}; max_message_age_s is {self.max_age_s:g}")
        return False

    def current(self, message: Message, retained: bool = False) -> bool:
        """Replay fencing of the kinds that carry no epoch: `timely` first (except for a
        DecisionRecorded delivered ``retained``, which is read as retained state and
        fenced by its ids only), then the receiver's memory of what it accepted.

        An EmulationCommand is then fenced by its ``command_id`` (the worker's emulation.py).
        A NodeDown or NodeJoined older (``at_s``) than the newest of either accepted for
        the same node is a replay (an old NodeDown sent again after the node came back
        would fail its passes); the same event again (a QoS 1 redelivery) says what is
        already known and passes. A DecisionRecorded is fenced by `decision_current`.
        With a replay memory (``memory``) a live message of these kinds that an earlier run
        of this receiver accepted is refused as ``replayed``, and each one accepted is
        written down. Other kinds pass."""
        if message.kind == "DecisionRecorded" and retained:
            return self.decision_current(message, retained)
        if not self.timely(message):
            return False
        issued = getattr(message, "issued_at_s", None)
        if (issued is not None and self.started_at_s is not None
                and float(issued) < self.started_at_s - START_MARGIN_S):  # fmt: skip
            self.refuse(message, "replayed", "issued before this receiver started")
            return False
        remembered = self.memory is not None and issued is not None
        if remembered and self.memory is not None and self.memory.seen_before(message):
            self.refuse(message, "replayed", "accepted by this receiver before it restarted")
            return False
        accepted = self._fenced(message)
        if accepted and remembered and self.memory is not None:
            self.memory.remember(message)
        return accepted

    def _fenced(self, message: Message) -> bool:
        """`current`'s memory fences of this run (after the freshness bound)."""
        if message.kind == "DecisionRecorded":
            return self.decision_current(message, retained=False)
        if message.kind not in ("NodeDown", "NodeJoined"):
            return True
        node, at_s = str(getattr(message, "node", "")), float(getattr(message, "at_s", 0.0))
        newest = self._node_event_s.get(node)
        if newest is not None and at_s < newest:
            self.refuse(message, "replayed", f"{message.kind} of {node} older than the newest event of it")
            return False
        self._node_event_s[node] = at_s
        return True

    def decision_current(self, record: Message, retained: bool = False) -> bool:
        """Replay fencing of decision records by (``decision_id``, ``revision``), not by
        time: the orchestrator republishes an older decision's record (its rollout outcome,
        its realised effect) after newer decisions, each time with a higher revision.

        Refused as ``replayed``: a record of a decision more than DECISION_SLOTS below the
        highest seen (its slot has been reused: no genuine record of it is published any
        more), one whose revision is below the highest seen for its decision, and one whose
        revision equals it when delivered live. The same revision delivered ``retained``
        (a resubscription after a reconnect) passes: it says what is already known."""
        decision_id, revision = int(getattr(record, "decision_id", 0)), int(getattr(record, "revision", 0))
        highest = self._highest_decision
        if highest is not None and decision_id <= highest - DECISION_SLOTS:
            self.refuse(record, "replayed", f"decision {decision_id} is {DECISION_SLOTS} or more below "
                        f"the newest seen ({highest}): its slot was reused")  # fmt: skip
            return False
        seen = self._decision_revisions.get(decision_id)
        if seen is not None and (revision < seen or (revision == seen and not retained)):
            self.refuse(record, "replayed", f"decision {decision_id} revision {revision}, seen {seen}")
            return False
        self._decision_revisions[decision_id] = revision
        if highest is None or decision_id > highest:
            self._highest_decision = decision_id
            floor = decision_id - DECISION_SLOTS
            for stale in [d for d in self._decision_revisions if d <= floor]:
                del self._decision_revisions[stale]  # bounded: only the window is kept
        return True

    def accept(self, message: Message, epoch: int | None = None) -> bool:
        """Signed and (with ``epoch``) not a replay."""
        return self.signed(message) and (epoch is None or self.fresh(message, epoch))

    def committed(self, epoch: int) -> None:
        self.highest_committed = max(self.highest_committed, epoch)

    def refuse(self, message: Message, why: str, detail: str) -> None:
        name = f"{message.kind}_{why}"
        self.counters[name] += 1
        if self.counters[name] == 1 or self.counters[name] % 100 == 0:  # bounded logging
            log.warning("%s: refused %s (%s; %d so far)", self.owner, message.kind, detail,
                        self.counters[name])  # fmt: skip

    def refusals(self) -> dict[str, int]:
        """Every refusal counter, for status."""
        return {name: count for name, count in sorted(self.counters.items())
                if name.rsplit("_", 1)[-1] in REFUSALS}  # fmt: skip
