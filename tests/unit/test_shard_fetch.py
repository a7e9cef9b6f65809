"""Shards over HTTP: fetch, verify, cache, resume, refuse tampered files; the server."""

from __future__ import annotations

import http.server
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from services.cli.main import main as edgesplit
from services.cli.serve_shards import ShardServer
from services.worker.shard_source import HttpShardStore
from shared.errors import ConfigError, ManifestMismatch, ShardFetchError, ShardVerificationError
from shared.model.shard import ShardStore, forget_verified, write_shards
from shared.model.shard_fetch import FetchOptions, fetch_file, fetch_manifest
from shared.model.tiny import write_tiny_checkpoint

FAST = FetchOptions(timeout_s=5.0, attempts=3)


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fetch")
    write_shards(write_tiny_checkpoint("llama", root / "model", layers=3, seed=4), root / "store")
    return root / "store"


@pytest.fixture
def served(store_dir: Path) -> Iterator[str]:
    server = ShardServer(store_dir)
    try:
        yield server.start()
    finally:
        server.close()


@pytest.fixture(autouse=True)
def _fresh_verification_cache() -> Iterator[None]:
    forget_verified()
    yield
    forget_verified()


class _Flaky(http.server.BaseHTTPRequestHandler):
    """Serves ``files``; the first GET of each file is cut after ``cut_bytes`` bytes
    (Content-Length says the whole file), later ones honour ``Range: bytes=N-``."""

    files: dict[str, bytes] = {}
    cut_bytes = 0
    seen: list[tuple[str, str]] = []
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802
        name = self.path.lstrip("/")
        data = self.files[name]
        wanted = self.headers.get("Range", "")
        self.seen.append((name, wanted))
        first = sum(1 for n, _ in self.seen if n == name) == 1
        start = int(wanted.removeprefix("bytes=").rstrip("-")) if wanted else 0
        self.send_response(206 if wanted else 200)
        if wanted:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if first and self.cut_bytes and name != "manifest.json":
            self.wfile.write(body[: self.cut_bytes])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def flaky(store_dir: Path) -> Iterator[type[_Flaky]]:
    handler = type("Handler", (_Flaky,), {
        "files": {p.name: p.read_bytes() for p in store_dir.iterdir()}, "seen": [], "cut_bytes": 1000})  # fmt: skip
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    handler.url = f"http://127.0.0.1:{server.server_address[1]}/"  # type: ignore[attr-defined]
    try:
        yield handler
    finally:
        server.shutdown()
        server.server_close()


def test_fetched_store_serves_the_same_tensors_and_caches_them(store_dir: Path, served: str, tmp_path: Path) -> None:
    local = ShardStore(store_dir)
    remote = HttpShardStore(served, tmp_path / "cache", local.manifest_sha256, FAST)
    assert remote.shard_dir == tmp_path / "cache" / local.manifest_sha256
    assert remote.fetched == []  # nothing but the manifest until something is loaded
    for index in range(local.manifest.num_blocks):
        for name, tensor in local.block_tensors(index).items():
            assert torch.equal(tensor, remote.block_tensors(index)[name])
    assert remote.tokenizer_path.read_bytes() == local.tokenizer_path.read_bytes()
    remote.fetch_all()
    assert sorted(remote.fetched) == sorted(local.manifest.files)
    # A second store over the same cache downloads nothing.
    again = HttpShardStore(served, tmp_path / "cache", None, FAST)
    assert again.fetch_all() and again.fetched == []


def test_a_download_cut_short_resumes_with_a_range_request(flaky: type[_Flaky], store_dir: Path, tmp_path: Path) -> None:
    folder = fetch_manifest(flaky.url, tmp_path, None, FAST)  # type: ignore[attr-defined]
    store = ShardStore(folder)
    name = store.manifest.blocks[1].file
    path = fetch_file(flaky.url, folder, name, store.manifest.files[name], FAST)  # type: ignore[attr-defined]
    assert path.read_bytes() == (store_dir / name).read_bytes()
    assert [r for n, r in flaky.seen if n == name] == ["", "bytes=1000-"]
    assert not (folder / (name + ".part")).exists()


def test_a_partial_file_left_by_a_dead_process_is_resumed(flaky: type[_Flaky], store_dir: Path, tmp_path: Path) -> None:
    flaky.cut_bytes = 0
    folder = fetch_manifest(flaky.url, tmp_path, None, FAST)  # type: ignore[attr-defined]
    store = ShardStore(folder)
    name = store.manifest.blocks[0].file
    (folder / (name + ".part")).write_bytes((store_dir / name).read_bytes()[:777])
    fetch_file(flaky.url, folder, name, store.manifest.files[name], FAST)  # type: ignore[attr-defined]
    assert [r for n, r in flaky.seen if n == name] == ["bytes=777-"]
    assert (folder / name).read_bytes() == (store_dir / name).read_bytes()


def test_a_tampered_file_is_refused_naming_it_and_deleted(flaky: type[_Flaky], tmp_path: Path) -> None:
    flaky.cut_bytes = 0
    folder = fetch_manifest(flaky.url, tmp_path, None, FAST)  # type: ignore[attr-defined]
    store = ShardStore(folder)
    name = store.manifest.blocks[2].file
    tampered = bytearray(flaky.files[name])
    tampered[-50] ^= 0x01
    flaky.files = {**flaky.files, name: bytes(tampered)}
    with pytest.raises(ShardVerificationError, match=rf"{name} from http://.*/{name}: .* sha256 .*refused and deleted"):
        fetch_file(flaky.url, folder, name, store.manifest.files[name], FAST)  # type: ignore[attr-defined]
    assert not (folder / name).exists() and not (folder / (name + ".part")).exists()
    remote = HttpShardStore(flaky.url, tmp_path, None, FAST)  # type: ignore[attr-defined]
    with pytest.raises(ShardVerificationError, match=name):
        remote.block_tensors(2)


def test_a_cached_file_changed_on_disk_is_fetched_again(store_dir: Path, served: str, tmp_path: Path) -> None:
    remote = HttpShardStore(served, tmp_path, None, FAST)
    remote.fetch_all()
    name = remote.manifest.blocks[0].file
    (remote.shard_dir / name).write_bytes(b"x" * remote.manifest.files[name].bytes)
    forget_verified()
    fetch_file(served, remote.shard_dir, name, remote.manifest.files[name], FAST)
    assert (remote.shard_dir / name).read_bytes() == (store_dir / name).read_bytes()


def test_pinned_manifest_and_bad_urls_are_typed_errors(served: str, tmp_path: Path) -> None:
    with pytest.raises(ManifestMismatch, match="manifest.json: sha256 .* does not match the pinned " + "a" * 64):
        HttpShardStore(served, tmp_path, "a" * 64, FAST)
    assert not any(tmp_path.iterdir())  # nothing cached for a refused manifest
    with pytest.raises(ShardFetchError, match="HTTP 404"):
        fetch_manifest(served + "nothing-here/", tmp_path, None, FAST)
    with pytest.raises(ShardFetchError, match="cannot fetch"):
        fetch_manifest("http://127.0.0.1:9/", tmp_path, None, FetchOptions(timeout_s=2, attempts=1))
    with pytest.raises(ConfigError, match="http:// or https://"):
        fetch_manifest("file:///etc/", tmp_path, None, FAST)


def test_server_serves_listed_files_only_and_answers_ranges(store_dir: Path, served: str) -> None:
    for path in ("secret.txt", "../store/manifest.json", "", "%2e%2e/manifest.json"):
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(served + path, timeout=5)  # noqa: S310
        assert caught.value.code == 404, path
    request = urllib.request.Request(served + "manifest.json", headers={"Range": "bytes=10-19"})
    with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
        assert response.status == 206 and response.read() == (store_dir / "manifest.json").read_bytes()[10:20]
    beyond = urllib.request.Request(served + "manifest.json", headers={"Range": "bytes=99999999-"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(beyond, timeout=5)  # noqa: S310
    assert caught.value.code == 416


def test_serve_shards_bad_arguments_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        edgesplit(["serve-shards"])
    assert caught.value.code == 2
    assert edgesplit(["serve-shards", str(tmp_path), "--port", "70000"]) == 2
    assert edgesplit(["serve-shards", str(tmp_path)]) == 1  # no manifest: one line, typed
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("edgesplit: ") and "manifest" in lines[-1]


def test_a_shard_server_that_starts_late_is_waited_for(store_dir: Path, tmp_path: Path) -> None:
    from shared.broker import free_port

    port = free_port()
    server = ShardServer(store_dir, port=port)
    starter = threading.Timer(0.5, server.start)
    starter.start()
    try:
        folder = fetch_manifest(f"http://127.0.0.1:{port}/", tmp_path, None, FetchOptions(timeout_s=2, attempts=3))
        assert (folder / "manifest.json").read_bytes() == (store_dir / "manifest.json").read_bytes()
    finally:
        starter.join()
        server.close()
