"""Shard stores over HTTP: fetch, verify against the manifest, cache, resume.

Any static file server can serve an ``edgesplit shard`` folder as it is
(``edgesplit serve-shards DIR`` is one). ``fetch_manifest`` downloads ``manifest.json``
(at most 64 MiB), checks it against a pinned sha256 when one is given and caches it in
``CACHE/<manifest sha256>/``, so stores of different checkpoints never mix.
``fetch_file`` downloads one file the manifest lists into that folder: into
``NAME.part`` first, resuming a partial download with an HTTP Range request (a server
that ignores Range answers 200 and the download starts over), hashing as it goes; the
file is renamed into place only when its size and sha256 match the manifest. A
mismatch deletes the partial file and raises ShardVerificationError naming the file and
the URL. Several processes may share one cache: each file is fetched under an
exclusive lock on ``NAME.lock``.

Everything here blocks (urllib): call it on a worker thread, never on the event loop.
No torch: the control services may use it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import logging
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from shared.errors import ConfigError, ManifestMismatch, ShardFetchError, ShardVerificationError
from shared.model.manifest import MANIFEST_FILE, MANIFEST_MAX_BYTES, FileDigest

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class FetchOptions:
    """How files are fetched. ``timeout_s``: per socket operation; ``attempts``: tries
    per file, each resuming where the last stopped."""

    timeout_s: float = 30.0
    attempts: int = 3


DEFAULT_FETCH = FetchOptions()


def check_url(url: str) -> str:
    """``url`` with a trailing slash; ConfigError unless it is http(s)://host/..."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ConfigError(f"shard URL {url!r}: must be http:// or https:// with a host")
    return url if url.endswith("/") else url + "/"


def fetch_manifest(url: str, cache_root: Path, pinned_sha256: str | None = None,
                   options: FetchOptions = DEFAULT_FETCH) -> Path:  # fmt: skip
    """Download ``url``/manifest.json into ``cache_root/<its sha256>/``; return that folder.
    An unreachable server is tried ``options.attempts`` times, 1, 2, ... s apart.

    Raises ConfigError for a bad URL, ShardFetchError when the server cannot be read or
    the manifest passes 64 MiB, ManifestMismatch when ``pinned_sha256`` is given and the
    manifest has another digest (nothing is cached then)."""
    base = check_url(url)
    source = base + MANIFEST_FILE
    for attempt in range(1, options.attempts + 1):
        try:
            with _open(source, None, options) as response:
                raw = response.read(MANIFEST_MAX_BYTES + 1)
            break
        except _Unreachable as error:  # a server still starting (compose, boot order): wait
            if attempt == options.attempts:
                raise
            log.warning("%s (attempt %d); retrying in %d s", error, attempt, attempt)
            time.sleep(attempt)
    if len(raw) > MANIFEST_MAX_BYTES:
        raise ShardFetchError(f"{source}: manifest larger than {MANIFEST_MAX_BYTES} bytes")
    digest = hashlib.sha256(raw).hexdigest()
    if pinned_sha256 and digest != pinned_sha256:
        raise ManifestMismatch(f"{source}: sha256 {digest} does not match the pinned {pinned_sha256}")
    folder = Path(cache_root) / digest
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / MANIFEST_FILE
    if not target.is_file() or target.read_bytes() != raw:
        staging = folder / (MANIFEST_FILE + f".{os.getpid()}.tmp")
        staging.write_bytes(raw)
        os.replace(staging, target)
    return folder


def fetch_file(url: str, folder: Path, name: str, expected: FileDigest,
               options: FetchOptions = DEFAULT_FETCH) -> Path:  # fmt: skip
    """``folder/name`` with the manifest's size and sha256, downloaded from ``url``/name
    if it is not already there (resuming ``name.part``). Returns the path.

    Raises ShardVerificationError (naming the file and URL) when the served bytes do not
    match ``expected``, ShardFetchError when the server fails ``options.attempts`` times."""
    target = Path(folder) / name
    source = check_url(url) + urllib.parse.quote(name)
    with _locked(target.with_name(name + ".lock")):
        if _matches(target, expected):
            return target
        target.unlink(missing_ok=True)
        partial = target.with_name(name + ".part")
        for attempt in range(1, options.attempts + 1):
            try:
                _download(source, partial, expected, options)
                break
            except ShardFetchError as error:
                if attempt == options.attempts:
                    raise
                log.warning("%s: attempt %d failed (%s); resuming", source, attempt, error)
        _verify(partial, expected, source)
        os.replace(partial, target)
    return target


def _download(source: str, partial: Path, expected: FileDigest, options: FetchOptions) -> None:
    """Append to ``partial`` until it holds ``expected.bytes`` bytes (or fewer on an early
    end: the caller retries). Raises ShardFetchError; never writes past the size."""
    have = partial.stat().st_size if partial.exists() else 0
    if have > expected.bytes:
        partial.unlink()
        have = 0
    if have == expected.bytes:
        return
    with _open(source, have or None, options) as response:
        if have and response.status != 206:  # the server ignored Range: start over
            have = 0
        elif have and not str(response.headers.get("Content-Range", "")).startswith(f"bytes {have}-"):
            raise ShardFetchError(f"{source}: Content-Range {response.headers.get('Content-Range')!r} "
                                  f"does not start at byte {have}")  # fmt: skip
        with partial.open("r+b" if have else "wb") as out:
            out.seek(have)
            out.truncate()
            try:
                while have < expected.bytes:
                    chunk = response.read(min(CHUNK_BYTES, expected.bytes - have))
                    if not chunk:
                        break
                    out.write(chunk)
                    have += len(chunk)
            except (OSError, http.client.HTTPException) as error:
                raise ShardFetchError(f"{source}: download stopped at byte {have}: {error}") from None
    if have < expected.bytes:
        raise ShardFetchError(f"{source}: download stopped at byte {have} of {expected.bytes}")


def _verify(partial: Path, expected: FileDigest, source: str) -> None:
    size, actual = _digest(partial)
    if size != expected.bytes or actual != expected.sha256:
        partial.unlink(missing_ok=True)
        raise ShardVerificationError(
            f"{partial.name.removesuffix('.part')} from {source}: {size} bytes with sha256 {actual}, "
            f"the manifest says {expected.bytes} bytes with sha256 {expected.sha256}; refused and deleted"
        )


def _matches(path: Path, expected: FileDigest) -> bool:
    """True when ``path`` exists with the expected size and sha256 (a cached file)."""
    try:
        if path.stat().st_size != expected.bytes:
            return False
    except OSError:
        return False
    return _digest(path)[1] == expected.sha256


def _digest(path: Path) -> tuple[int, str]:
    with path.open("rb") as stream:
        digest = hashlib.file_digest(stream, "sha256")
    return path.stat().st_size, digest.hexdigest()


class _Unreachable(ShardFetchError):
    """No HTTP answer at all (refused, timed out, reset): worth another try."""


@contextlib.contextmanager
def _open(source: str, start: int | None, options: FetchOptions) -> Iterator[http.client.HTTPResponse]:
    """The response to GET ``source`` (from byte ``start`` when given)."""
    headers = {"Range": f"bytes={start}-"} if start else {}
    request = urllib.request.Request(source, headers=headers)  # noqa: S310 - check_url allows http(s) only
    try:
        response = urllib.request.urlopen(request, timeout=options.timeout_s)  # noqa: S310
    except urllib.error.HTTPError as error:
        raise ShardFetchError(f"{source}: HTTP {error.code} {error.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
        reason = getattr(error, "reason", error)
        raise _Unreachable(f"{source}: cannot fetch ({reason})") from None
    with response:
        yield response


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """An exclusive lock shared by every process using this cache folder."""
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
