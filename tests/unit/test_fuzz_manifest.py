"""Fuzzing the shard manifest reader (shared/model/shard_files.py ``ShardFiles``, which
reads manifest.json through shared/model/manifest.py ``parse_manifest`` and the model
config reader): arbitrary bytes, real manifests of tiny gpt2, llama and bert stores
mutated byte by byte, their decoded trees edited (wrong types, missing or surplus keys,
edge numbers, other file names, config fields) and written back as JSON, and hostile
shapes (deep nesting, huge numbers in the config).

Property: ``ShardFiles`` returns or raises CheckpointError or another ModelError
(UnsafeCheckpointError, UnsupportedArchitecture), never anything else; what it accepts
is a consistent manifest: one block per layer of its config, in order, each file a
plain name listed with the block's digest, costs finite and non-negative.
Settings: tests/unit/fuzz_profiles.py (10,000 examples with ``CI`` set)."""

from __future__ import annotations

import json
import math
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.errors import ModelError
from shared.model.manifest import MANIFEST_FILE
from shared.model.names import PICKLE_SUFFIXES
from shared.model.shard_files import ShardFiles
from shared.model.shard_write import write_shards
from shared.model.tiny import write_tiny_checkpoint
from tests.unit.fuzz_profiles import FUZZ
from tests.unit.fuzz_support import mutate_bytes, mutate_tree, trees

_PLAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@pytest.fixture(scope="module")
def manifests() -> tuple[bytes, ...]:
    """manifest.json of a tiny gpt2, llama and bert shard store (2 blocks each)."""
    with tempfile.TemporaryDirectory(prefix="fuzz-manifests-") as name:
        folder = Path(name)
        texts = []
        for architecture in ("gpt2", "llama", "bert"):
            model = write_tiny_checkpoint(architecture, folder / architecture, layers=2, seed=1)
            texts.append(write_shards(model, folder / f"{architecture}-store").read_bytes())
        return tuple(texts)


@pytest.fixture(scope="module")
def folder() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="fuzz-manifest-") as name:
        yield Path(name)


def _hostile(data: st.DataObject, valid: bytes) -> bytes:
    """Shapes random edits rarely reach: nesting past a parser's limit, numbers past a
    float's range or Python's digit limit in the config, config fields of another type."""
    kind = data.draw(st.sampled_from(["nest", "number", "config"]), label="hostile")
    if kind == "nest":
        size = data.draw(st.integers(1, 3000), label="size")
        return b'{"config": ' + b"[" * size + b"]" * size + b"}"
    tree = json.loads(valid)
    key = data.draw(
        st.sampled_from(sorted(tree["config"]) + ["rope_scaling", "rope_parameters", "n_head",
                                                  "num_attention_heads", "sliding_window"]),
        label="config key",
    )  # fmt: skip
    if kind == "number":
        number = data.draw(
            st.sampled_from(["0", "-1", "1e400", "-1e400", "1" + "0" * 400, "9" * 4400]), label="n"
        )
        rest = json.dumps({k: v for k, v in tree["config"].items() if k != key})
        tree["config"] = "@CONFIG@"
        return json.dumps(tree).replace('"@CONFIG@"', f'{rest[:-1]}, "{key}": {number}}}').encode()
    tree["config"][key] = data.draw(
        st.sampled_from([[], [1, 2], "default", {"type": "linear"}, {"rope_type": None}, None,
                         True, 0, 0.0, "0"]),
        label="config value",
    )  # fmt: skip
    return json.dumps(tree).encode()


def _read_checked(folder: Path, content: bytes) -> None:
    (folder / MANIFEST_FILE).write_bytes(content)
    try:
        files = ShardFiles(folder)
    except ModelError:
        return
    manifest, config = files.manifest, files.config
    assert manifest.num_blocks == len(manifest.blocks) == config.num_layers >= 1
    for position, block in enumerate(manifest.blocks):
        assert block.index == position
        digest = manifest.files[block.file]
        assert (digest.bytes, digest.sha256) == (block.bytes, block.sha256)
        assert block.tensor_names
        numbers = (block.flops_per_token, block.activation_bytes_per_token, block.kv_bytes_per_token)
        assert all(math.isfinite(v) and v >= 0 for v in numbers)
    assert math.isfinite(manifest.head_flops_per_token) and manifest.head_flops_per_token >= 0
    for name in manifest.files:
        assert _PLAIN.fullmatch(name) and not name.lower().endswith(PICKLE_SUFFIXES)
    assert {manifest.entry.file, manifest.tokenizer_file} <= set(manifest.files)
    assert math.isfinite(config.norm_eps) and config.norm_eps > 0
    assert config.hidden_size > 0 and config.num_heads > 0 and config.head_dim > 0


@FUZZ
@given(st.data())
def test_fuzz_shard_manifest(
    folder: Path, manifests: tuple[bytes, ...], data: st.DataObject
) -> None:
    """One of: random bytes, a real manifest with byte edits, with tree edits, or a
    hostile shape; ShardFiles raises only ModelError subclasses."""
    source = data.draw(st.sampled_from(["bytes", "edit", "tree", "hostile"]), label="source")
    valid = data.draw(st.sampled_from(manifests), label="manifest")
    if source == "bytes":
        content = data.draw(st.binary(max_size=200), label="bytes")
    elif source == "edit":
        content = mutate_bytes(data, valid)
    elif source == "tree":
        edited = mutate_tree(data, json.loads(valid), trees(allow_bytes=False, tuples=False))
        content = json.dumps(edited).encode("utf-8", "surrogatepass")
    else:
        content = _hostile(data, valid)
    _read_checked(folder, content)


# --- regressions: what the fuzzing found ---------------------------------------------------


@pytest.mark.parametrize(
    ("architecture", "key", "number", "named"),
    [
        ("gpt2", "n_head", "0", "num_heads must be positive"),  # was ZeroDivisionError
        ("bert", "num_attention_heads", "0", "num_heads must be positive"),  # same
        ("bert", "pad_token_id", "1e400", "token ids must be integers"),  # was OverflowError
        ("gpt2", "eos_token_id", "1.5", "token ids must be integers"),  # was truncated to 1
        ("gpt2", "layer_norm_epsilon", "0", "norm epsilon must be a finite number > 0"),
        ("llama", "rms_norm_eps", "1" + "0" * 400, "missing or bad field"),  # was OverflowError
        ("llama", "rope_scaling", "[1, 2]", "rope_scaling and rope_parameters"),  # AttributeError
        ("llama", "rope_theta", "0", "rope_theta must be a finite number > 0"),
    ],
)
def test_bad_config_numbers_are_checkpoint_errors(
    manifests: tuple[bytes, ...], tmp_path: Path, architecture: str, key: str, number: str,
    named: str,
) -> None:  # fmt: skip
    from shared.errors import CheckpointError

    valid = manifests[("gpt2", "llama", "bert").index(architecture)]
    tree = json.loads(valid)
    rest = json.dumps({k: v for k, v in tree["config"].items() if k != key})
    tree["config"] = "@CONFIG@"
    text = json.dumps(tree).replace('"@CONFIG@"', f'{rest[:-1]}, "{key}": {number}}}')
    (tmp_path / MANIFEST_FILE).write_text(text)
    with pytest.raises(CheckpointError, match=f"field config: .*{re.escape(named)}"):
        ShardFiles(tmp_path)
