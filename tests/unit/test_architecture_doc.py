"""docs/ARCHITECTURE.md keeps the map of the wire: every registered topic is in it."""

from __future__ import annotations

from pathlib import Path

from shared import topics
from shared.frame_headers import FRAME_KINDS

DOC = Path(__file__).resolve().parents[2] / "docs" / "ARCHITECTURE.md"


def test_every_topic_is_documented() -> None:
    text = DOC.read_text()
    missing = [pattern for pattern in topics.REGISTRY if f"`{pattern}`" not in text]
    assert not missing, f"topics missing from docs/ARCHITECTURE.md: {missing}"


def test_every_message_kind_is_documented() -> None:
    text = DOC.read_text()
    kinds = {kind.__name__ for topic in topics.REGISTRY.values() for kind in topic.kinds}
    missing = sorted(kind for kind in kinds if kind not in text)
    assert not missing, f"message kinds missing from docs/ARCHITECTURE.md: {missing}"


def test_every_frame_kind_is_documented() -> None:
    text = DOC.read_text()
    missing = sorted(kind for kind in FRAME_KINDS if f"| `{kind}` |" not in text)
    assert not missing, f"frame kinds missing from docs/ARCHITECTURE.md: {missing}"
