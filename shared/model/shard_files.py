"""The verified files of a shard store, without torch.

``ShardFiles`` reads and validates ``manifest.json`` (written by
shared/model/shard_write.py) and checks each file the manifest lists against its size
and sha256 before anyone uses it. It is what the control services need: the
orchestrator and the split reviser plan from the manifest alone, so they must not pay
for torch (about 200 MB resident on an edge box; docs/PERFORMANCE.md). Workers use the
subclass ``shared.model.shard.ShardStore``, which adds the tensors.

A file once verified is remembered by (path, inode, size, mtime) for the life of the
process, so loading it again does not re-hash it; ``forget_verified`` clears that.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

from shared.errors import CheckpointError, ManifestMismatch, ShardVerificationError
from shared.model.config import ModelConfig, load_config
from shared.model.manifest import MANIFEST_FILE, MANIFEST_MAX_BYTES, ShardManifest, parse_manifest


class ShardFiles:
    """The manifest and verified files of a shard folder written by ``write_shards``.

    Raises CheckpointError for a missing, oversized or invalid manifest (naming the
    field), UnsafeCheckpointError if the manifest lists a pickle-based file, and (when
    ``expected_manifest_sha256`` is given) ShardVerificationError if manifest.json does
    not have that digest. Construction reads manifest.json only (at most 64 MiB).
    """

    def __init__(self, shard_dir: Path, expected_manifest_sha256: str | None = None) -> None:
        self.shard_dir = Path(shard_dir)
        path = self.shard_dir / MANIFEST_FILE
        try:
            with path.open("rb") as stream:
                raw = stream.read(MANIFEST_MAX_BYTES + 1)
        except OSError as error:
            raise CheckpointError(f"{path}: cannot read the shard manifest ({error.strerror})") from None
        if len(raw) > MANIFEST_MAX_BYTES:
            raise CheckpointError(f"{path}: manifest larger than {MANIFEST_MAX_BYTES} bytes")
        self.manifest_sha256 = hashlib.sha256(raw).hexdigest()
        if expected_manifest_sha256 is not None:
            self.check_manifest_pin(expected_manifest_sha256, "the expected")
        self.manifest: ShardManifest = parse_manifest(raw, origin=str(path))
        self._config = load_config(self.manifest.config)

    def check_manifest_pin(self, pinned_sha256: str, by: str = "the plan's") -> None:
        """Raise ManifestMismatch unless manifest.json has sha256 ``pinned_sha256``
        (an empty pin checks nothing: an older sender that pins no manifest)."""
        if pinned_sha256 and pinned_sha256 != self.manifest_sha256:
            raise ManifestMismatch(
                f"{self.shard_dir / MANIFEST_FILE}: sha256 {self.manifest_sha256} does not match "
                f"{by} {pinned_sha256} (shards of another checkpoint, cut or weight format)"
            )

    @property
    def config(self) -> ModelConfig:
        """The model's hyper-parameters (from the manifest's raw config)."""
        return self._config

    @property
    def tokenizer_path(self) -> Path:
        """tokenizer.json, verified against the manifest (ShardVerificationError if not)."""
        return self._verified_path(self.manifest.tokenizer_file)

    def block_files(self, start: int, end: int) -> tuple[Path, ...]:
        """Paths of the files of blocks ``[start, end)`` (not yet verified).
        Raises CheckpointError for a range outside the store."""
        if not 0 <= start <= end <= self.manifest.num_blocks:
            raise CheckpointError(
                f"{self.shard_dir}: blocks [{start}, {end}) outside [0, {self.manifest.num_blocks})"
            )
        return tuple(self.shard_dir / block.file for block in self.manifest.blocks[start:end])

    def verify_all(self) -> tuple[str, ...]:
        """Check every file the manifest lists; returns their names. Raises
        ShardVerificationError (or CheckpointError for a missing file) on the first
        mismatch."""
        for name in sorted(self.manifest.files):
            self._verified_path(name)
        return tuple(sorted(self.manifest.files))

    def _verified_before(self, name: str) -> bool:
        """True if this process hashed ``name`` and it has not changed since."""
        return _cached_digest(self.shard_dir / name) == self.manifest.files[name].sha256

    def _verified_path(self, name: str) -> Path:
        if not self._verified_before(name):
            self._read_verified(name)
        return self.shard_dir / name

    def _read_verified(self, name: str) -> bytes:
        """The bytes of ``name``, checked for size (before reading) and sha256."""
        path, expected = self.shard_dir / name, self.manifest.files[name]
        try:
            size = path.stat().st_size
            if size != expected.bytes:
                raise ShardVerificationError(
                    f"{path}: {size} bytes, the manifest says {expected.bytes} (sha256 {expected.sha256})"
                )
            data = path.read_bytes()
        except OSError as error:
            raise CheckpointError(f"{path}: cannot read shard file ({error.strerror})") from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected.sha256 or len(data) != expected.bytes:
            raise ShardVerificationError(
                f"{path}: sha256 {actual} does not match the manifest's {expected.sha256}"
            )
        _remember_digest(path, actual)
        return data


# --- verification cache -----------------------------------------------------------------

_VERIFIED: dict[tuple[str, int, int, int], str] = {}
_VERIFIED_LOCK = threading.Lock()


def _file_key(path: Path) -> tuple[str, int, int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return (str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)


def _cached_digest(path: Path) -> str | None:
    """The sha256 this process computed for ``path`` if it has not changed since."""
    key = _file_key(path)
    with _VERIFIED_LOCK:
        return None if key is None else _VERIFIED.get(key)


def _remember_digest(path: Path, sha256: str) -> None:
    key = _file_key(path)
    if key is not None:
        with _VERIFIED_LOCK:
            _VERIFIED[key] = sha256


def remember_verified(path: Path, sha256: str) -> None:
    """Record that ``path`` (as it is now) was hashed to ``sha256`` by this process: a
    downloader that verified a file spares the store a second pass."""
    _remember_digest(path, sha256)


def forget_verified() -> None:
    """Drop every remembered verification (the next load of each file re-hashes)."""
    with _VERIFIED_LOCK:
        _VERIFIED.clear()
