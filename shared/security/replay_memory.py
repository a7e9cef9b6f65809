"""A receiver's memory of the control messages it accepted, kept across its restarts
(docs/SECURITY.md, "Freshness").

The kinds without an epoch (NodeDown, NodeJoined, EmulationCommand, live
DecisionRecorded) are fenced by what a receiver remembers and by their age
(``max_message_age_s``). A receiver that restarted within that age of a message has no
memory of it, so a recorded copy replayed then would be accepted once. With a replay
memory file (``replay_memory_dir``, which `edgesplit up` sets to the run folder's
``replay/``) the receiver writes down each such message it accepts: the SHA-256 of its
signature (every publication is signed over its own ``issued_at_s``, so each has its own
signature) with its issue time. A restarted receiver reads the file and refuses a message
its previous run accepted as ``{Kind}_replayed``. Entries older than the freshness bound
are dropped: the bound refuses those anyway.

Only what an earlier run of this receiver accepted is refused this way: within one run
the receiver's own fences decide, and a QoS 1 redelivery of a genuine message is what
they expect. The file is written atomically (a new file, then a rename), 0600.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from shared.messages.base import Message

log = logging.getLogger(__name__)

SLACK_S = 5.0
"""Entries are kept this much longer than the freshness bound (clocks a little apart)."""


def memory_file(directory: Path, cluster: str, owner: str) -> Path:
    """The file of receiver ``owner`` in ``cluster`` (one per process identity)."""
    return directory / f"{cluster}-{owner}.json"


def fingerprint(message: Message) -> str | None:
    """The SHA-256 of a message's signature (None for an unsigned one: nothing to remember)."""
    signature = str(getattr(message, "signature", "") or "")
    return hashlib.sha256(signature.encode()).hexdigest() if signature else None


class ReplayMemory:
    """What this receiver's earlier runs accepted (`seen_before`), and what this run
    accepts (`remember`), in ``path``. ``max_age_s``: the freshness bound."""

    def __init__(self, path: Path, max_age_s: float, clock: Callable[[], float] = time.time) -> None:
        self.path, self.max_age_s, self.clock = path, max_age_s, clock
        self._kept: dict[str, float] = self._load()
        self.previous = frozenset(self._kept)
        """Fingerprints accepted by an earlier run of this receiver (still within the bound)."""

    def _load(self) -> dict[str, float]:
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as error:  # unreadable: start empty, say so once
            log.warning("replay memory %s unreadable (%s): starting without it", self.path, error)
            return {}
        if not isinstance(raw, dict):
            return {}
        now = self.clock()
        return {str(key): float(at) for key, at in raw.items()
                if isinstance(at, int | float) and now - float(at) <= self.max_age_s + SLACK_S}  # fmt: skip

    def seen_before(self, message: Message) -> bool:
        """True when an earlier run of this receiver accepted this very publication."""
        key = fingerprint(message)
        return key is not None and key in self.previous

    def remember(self, message: Message) -> None:
        """Write down that this run accepted ``message`` (dropping entries past the bound)."""
        key = fingerprint(message)
        if key is None or key in self._kept:
            return
        now = self.clock()
        self._kept = {k: at for k, at in self._kept.items() if now - at <= self.max_age_s + SLACK_S}
        self._kept[key] = float(getattr(message, "issued_at_s", 0.0) or now)
        self._write()

    def _write(self) -> None:
        temporary = self.path.with_suffix(f".{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(descriptor, "w") as out:
                json.dump(self._kept, out)
            os.replace(temporary, self.path)
        except OSError as error:  # a full or read-only disk must not stop the receiver
            log.warning("replay memory %s not written (%s)", self.path, error)
            with contextlib.suppress(OSError):
                temporary.unlink()
