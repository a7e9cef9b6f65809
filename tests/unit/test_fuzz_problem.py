"""Fuzzing the planner problem loader (shared/planning/problem.py ``load_problem``, the
input of ``edgesplit plan PROBLEM.json``): arbitrary text and bytes, the example
problems mutated byte by byte, their decoded trees edited (wrong types, missing or
surplus keys, edge numbers, NaN and Infinity) and written back as JSON, and hostile
shapes (deep nesting, huge integers, overflowing floats).

Property: ``load_problem`` returns or raises ProblemFieldError, never anything else;
what it accepts keeps the problem's invariants (unique valid node ids, a known source,
links between two distinct known nodes, finite non-negative numbers), and the
evaluator can cost a placement of it without raising.
Settings: tests/unit/fuzz_profiles.py (10,000 examples with ``CI`` set)."""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.errors import ProblemFieldError
from shared.ids import validate_id
from shared.planning.problem import Placement, evaluate, load_problem
from tests.unit.fuzz_profiles import FUZZ
from tests.unit.fuzz_support import mutate_bytes, mutate_tree, trees

EXAMPLES = tuple(sorted((Path(__file__).parent.parent / "data" / "planner").glob("problem-*.json")))
TEXTS = tuple(path.read_bytes() for path in EXAMPLES)
TREES = tuple(json.loads(text) for text in TEXTS)


@pytest.fixture(scope="module")
def folder() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="fuzz-problem-") as name:
        yield Path(name)


def _hostile(data: st.DataObject) -> bytes:
    """Shapes random text rarely reaches: nesting past the parser's recursion limit,
    integers past Python's digit limit, floats that overflow to infinity."""
    kind = data.draw(st.sampled_from(["nest", "digits", "exponent", "sum"]), label="hostile")
    size = data.draw(st.integers(1, 3000) if kind == "nest" else st.integers(1, 6000), label="size")
    if kind == "nest":
        return b'{"layers": ' + b"[" * size + b"]" * size + b"}"
    tree = dict(TREES[0])
    if kind in ("digits", "exponent"):
        field = data.draw(st.sampled_from(["input_bytes", "context_tokens"]), label="field")
        rest = json.dumps({key: value for key, value in tree.items() if key != field})
        number = "9" * size if kind == "digits" else f"1e{size}"
        return f'{rest[:-1]}, "{field}": {number}}}'.encode()
    # Finite numbers whose sums overflow a float: one field of every layer or node.
    group, key = data.draw(st.sampled_from([("layers", "flops"), ("layers", "weight_bytes"),
                                            ("layers", "out_bytes"), ("nodes", "memory_bytes")]))
    value = data.draw(st.sampled_from([1e308, 1.7e308, 1e300]), label="value")
    tree[group] = [{**item, key: value} for item in tree[group]]  # type: ignore[dict-item]
    return json.dumps(tree).encode()


def _load_checked(folder: Path, content: bytes) -> None:
    path = folder / "problem.json"
    path.write_bytes(content)
    try:
        problem = load_problem(path)
    except ProblemFieldError:
        return
    ids = [node.id for node in problem.nodes]
    assert len(set(ids)) == len(ids) and problem.source in ids and problem.layers
    for node in problem.nodes:
        assert validate_id(node.id) == node.id
        assert all(math.isfinite(v) and v >= 0 for v in (node.memory_bytes, node.utilization))
        assert math.isfinite(node.flops_per_s) and node.flops_per_s > 0
    for layer in problem.layers:
        numbers = (layer.flops, layer.weight_bytes, layer.kv_bytes_per_token, layer.out_bytes)
        assert all(math.isfinite(v) and v >= 0 for v in numbers)
    for link in problem.links:
        assert link.src != link.dst and {link.src, link.dst} <= set(ids)
        assert math.isfinite(link.bandwidth_bytes_per_s) and link.bandwidth_bytes_per_s > 0
    assert len(problem.link_index()) == len(problem.links)
    whole = evaluate(problem, Placement.of((problem.source, 0, len(problem.layers))))
    assert whole.latency_s >= 0 and whole.bottleneck_s >= 0


@FUZZ
@given(st.data())
def test_fuzz_load_problem(folder: Path, data: st.DataObject) -> None:
    """One of: random text, random bytes, an example problem with byte edits, with tree
    edits, or a hostile shape; load_problem raises only ProblemFieldError."""
    source = data.draw(st.sampled_from(["text", "bytes", "edit", "tree", "hostile"]), label="source")
    index = data.draw(st.integers(0, len(TEXTS) - 1), label="example")
    if source == "text":
        content = data.draw(st.text(max_size=200), label="text").encode("utf-8", "surrogatepass")
    elif source == "bytes":
        content = data.draw(st.binary(max_size=200), label="bytes")
    elif source == "edit":
        content = mutate_bytes(data, TEXTS[index])
    elif source == "tree":
        edited = mutate_tree(data, TREES[index], trees(allow_bytes=False, tuples=False))
        content = json.dumps(edited).encode("utf-8", "surrogatepass")
    else:
        content = _hostile(data)
    _load_checked(folder, content)


# --- regressions: what the fuzzing found ---------------------------------------------------


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "problem.json"
    path.write_text(text)
    return path


def test_deep_nesting_and_huge_integers_are_field_errors(tmp_path: Path) -> None:
    """Were RecursionError and ValueError (Python's 4,300-digit limit) from json.loads."""
    with pytest.raises(ProblemFieldError, match="not valid JSON .*nest too deeply"):
        load_problem(_write(tmp_path, '{"layers": ' + "[" * 5000 + "]" * 5000 + "}"))
    with pytest.raises(ProblemFieldError, match="not valid JSON .*4300 digits"):
        load_problem(_write(tmp_path, '{"input_bytes": ' + "9" * 5000 + "}"))


def test_a_context_too_large_for_a_float_is_a_field_error(tmp_path: Path) -> None:
    """Was an OverflowError (int too large to convert to float) in the KV memory term."""
    text = json.dumps({**TREES[0], "context_tokens": 0}).replace(
        '"context_tokens": 0', '"context_tokens": ' + "9" * 400
    )
    with pytest.raises(ProblemFieldError, match="context_tokens: .*less than or equal to 9007199254740992"):
        load_problem(_write(tmp_path, text))


@pytest.mark.parametrize("objective", ["latency", "throughput"])
def test_finite_numbers_whose_sums_overflow_are_planned(
    tmp_path: Path, objective: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Layers of 1e308 FLOPs are a valid problem; evaluate and `edgesplit plan` died with
    OverflowError (intermediate overflow in fsum). Now a sum that overflows is infinite,
    like any other cost that cannot be met: two such layers still have a plan (each on
    its own node), eight have none, and both are answers."""
    from services.cli import main

    tree = {**TREES[0], "objective": objective}
    for count, feasible in ((2, True), (len(tree["layers"]), False)):
        tree["layers"] = [
            {**layer, "flops": 1e308} if index < count else layer
            for index, layer in enumerate(TREES[0]["layers"])
        ]
        path = _write(tmp_path, json.dumps(tree))
        problem = load_problem(path)
        whole = evaluate(problem, Placement.of((problem.source, 0, len(problem.layers))))
        assert whole.latency_s == math.inf and whole.bottleneck_s == math.inf
        assert main(["plan", str(path), "--json"]) == 0
        answer = json.loads(capsys.readouterr().out)
        assert answer["feasible"] is feasible, answer
        assert feasible or answer["reason"]
