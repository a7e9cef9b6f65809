"""Where a worker's shards come from: a local folder or an HTTP server.

``HttpShardStore`` is a ``ShardStore`` over ``CACHE/<manifest sha256>/``: the manifest is
fetched at start (checked against ``manifest_sha256`` when the setting pins one), and
each file the first time something loads it (shared/model/shard_fetch.py: verified
against the manifest's sha256, cached, resumed). A plan's pin is then checked against
the same manifest (``check_manifest_pin``), so a worker never serves another
checkpoint's weights, wherever they came from. Every method blocks: workers call them
on a thread (``asyncio.to_thread``), never on the event loop.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from services.worker.settings import WorkerSettings
from shared.errors import ConfigError
from shared.model.shard import ShardStore
from shared.model.shard_fetch import DEFAULT_FETCH, FetchOptions, fetch_file, fetch_manifest
from shared.model.shard_files import remember_verified


class HttpShardStore(ShardStore):
    """A ShardStore whose files are downloaded from ``url`` into ``cache_root`` on first use.

    Raises (construction) ConfigError for a bad URL, ShardFetchError when the manifest
    cannot be fetched, ManifestMismatch when it is not ``pinned_sha256``; (loading)
    ShardVerificationError naming a file whose served bytes do not match the manifest,
    ShardFetchError when a file cannot be fetched."""

    def __init__(self, url: str, cache_root: Path, pinned_sha256: str | None = None,
                 options: FetchOptions = DEFAULT_FETCH) -> None:  # fmt: skip
        self.url, self.options = url, options
        super().__init__(fetch_manifest(url, cache_root, pinned_sha256, options), pinned_sha256)
        self._fetch_lock = threading.Lock()
        self.fetched: list[str] = []
        """Files downloaded by this process, in order (the rest were in the cache)."""

    def fetch(self, name: str) -> Path:
        """``name`` in the local cache, downloaded and verified if it was not there."""
        path = self.shard_dir / name
        if self._verified_before(name):
            return path
        with self._fetch_lock:  # one download at a time per store; others wait for it
            existed = path.exists()
            fetch_file(self.url, self.shard_dir, name, self.manifest.files[name], self.options)
            remember_verified(path, self.manifest.files[name].sha256)
            if not existed:
                self.fetched.append(name)
        return path

    def fetch_all(self) -> tuple[str, ...]:
        """Download (or find cached) every file the manifest lists; returns their names."""
        for name in sorted(self.manifest.files):
            self.fetch(name)
        return tuple(sorted(self.manifest.files))

    def _verified_path(self, name: str) -> Path:
        self.fetch(name)
        return super()._verified_path(name)

    def _load(self, name: str, tensor_names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        self.fetch(name)
        return super()._load(name, tensor_names)


def open_store(settings: WorkerSettings) -> ShardStore:
    """The worker's shard store: ``shards_url`` (cached under ``shard_cache_dir``) or
    ``shards_dir``. Blocks (reads, maybe downloads): call it on a thread."""
    options = FetchOptions(timeout_s=settings.shard_fetch_timeout_s, attempts=settings.shard_fetch_attempts)
    if settings.shards_url:
        return HttpShardStore(settings.shards_url, settings.shard_cache_dir, settings.manifest_sha256 or None, options)
    if settings.shards_dir is None:
        raise ConfigError("a worker needs --shards DIR or --shards-url URL")
    return ShardStore(settings.shards_dir, settings.manifest_sha256 or None)
