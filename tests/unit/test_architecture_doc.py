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


def _defined_names() -> dict[str, set[str]]:
    """Every class, function, method and annotated field name under shared/ and services/,
    by file."""
    import ast

    root = DOC.parents[1]
    names: dict[str, set[str]] = {}
    for path in [*root.glob("shared/**/*.py"), *root.glob("services/**/*.py")]:
        tree = ast.parse(path.read_text())
        defs = {node.name for node in ast.walk(tree)
                if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)}  # fmt: skip
        fields = {node.target.id for node in ast.walk(tree)
                  if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)}  # fmt: skip
        names[str(path.relative_to(root))] = defs | fields | {path.stem}  # `logic.decide`
    return names


def test_the_walkthroughs_name_functions_that_exist() -> None:
    """Every `Name`, `Class.method` or `path.py: name` in the two walkthroughs at the top
    of the doc is defined in the code, so a rename cannot leave the doc behind."""
    import re

    text = DOC.read_text()
    section = text[text.index("### One request") : text.index("## Services")]
    defined = _defined_names()
    everywhere = set().union(*defined.values())
    missing = []
    for token in re.findall(r"`([^`]+)`", section):
        if token.endswith(".py"):
            if not any(name.endswith("/" + token) or name == token for name in defined):
                missing.append(token)
            continue
        path, _, names = token.rpartition(": ")
        names = re.sub(r"\(.*\)$", "", names)  # `_enqueue(Trigger)`
        if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", names):
            continue  # a topic, a command or a phrase
        pool = defined.get(path, set()) if path else everywhere
        if not all(part in pool for part in names.split(".")):
            missing.append(token)
    assert not missing, f"names in docs/ARCHITECTURE.md's walkthroughs not in the code: {missing}"
