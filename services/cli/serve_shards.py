"""`edgesplit serve-shards DIR [--host H] [--port P]`: a shard folder over HTTP.

For small sites without a file server: workers started with ``--shards-url
http://H:P/`` fetch, verify and cache the files (shared/model/shard_fetch.py). Any
static file server serves an ``edgesplit shard`` folder just as well; this one serves
only ``manifest.json`` and the files it lists (no listings, no other files), answers
single HTTP Range requests (206) so downloads resume, and runs the stdlib
``ThreadingHTTPServer`` (one thread per connection). The manifest is read once at start:
re-run after re-sharding.
"""

from __future__ import annotations

import argparse
import http.server
import io
import logging
import re
import sys
import threading
import urllib.parse
from pathlib import Path
from typing import BinaryIO

from shared.errors import ConfigError
from shared.model.manifest import MANIFEST_FILE
from shared.model.shard_files import ShardFiles

log = logging.getLogger(__name__)

_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")
_CHUNK_BYTES = 1 << 20


class ShardServer:
    """An HTTP server of one shard folder, on a background thread. ``start()`` binds and
    returns the URL; ``close()`` stops it. Raises CheckpointError (no valid manifest),
    ConfigError (the address cannot be bound)."""

    def __init__(self, shard_dir: Path, host: str = "127.0.0.1", port: int = 0) -> None:
        self.shard_dir = Path(shard_dir)
        self.host, self.port = host, port
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = str(self._server.server_address[0]), self._server.server_address[1]
        return f"http://{host if ':' not in host else f'[{host}]'}:{port}/"

    def start(self) -> str:
        files = ShardFiles(self.shard_dir)
        served = frozenset({MANIFEST_FILE, *files.manifest.files})
        handler = type("Handler", (_Handler,), {"root": self.shard_dir, "served": served})
        try:
            self._server = http.server.ThreadingHTTPServer((self.host, self.port), handler)
        except OSError as error:
            raise ConfigError(f"cannot serve on {self.host}:{self.port}: {error.strerror}") from None
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="serve-shards", daemon=True)
        self._thread.start()
        return self.url

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)


class _Handler(http.server.BaseHTTPRequestHandler):
    root: Path
    served: frozenset[str]
    protocol_version = "HTTP/1.1"

    def do_HEAD(self) -> None:  # noqa: N802 - the stdlib's name
        self._answer(body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        name = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
        if name not in self.served:  # plain names from the manifest only: no traversal, no listing
            self.send_error(404, "not a file of this shard store")
            return
        path = self.root / name
        try:
            stream = path.open("rb")
        except OSError:
            self.send_error(404, "listed in the manifest but missing")
            return
        with stream:
            size = path.stat().st_size
            start, end = 0, size
            wanted = _RANGE.match(self.headers.get("Range", ""))
            if wanted:
                start = int(wanted.group(1))
                end = min(size, int(wanted.group(2)) + 1) if wanted.group(2) else size
                if start >= size or start >= end:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
            else:
                self.send_response(200)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(end - start))
            self.end_headers()
            if body:
                _copy(stream, self.wfile, start, end)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the stdlib's name
        log.info("%s %s", self.address_string(), format % args)


def _copy(stream: BinaryIO, out: io.BufferedIOBase, start: int, end: int) -> None:
    stream.seek(start)
    left = end - start
    try:
        while left > 0:
            chunk = stream.read(min(_CHUNK_BYTES, left))
            if not chunk:
                break
            out.write(chunk)
            left -= len(chunk)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the client went away; it resumes with a Range request


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``serve-shards`` command."""
    serve = subparsers.add_parser(
        "serve-shards", help="serve a shard folder over HTTP (workers: --shards-url)",
        description="Serves manifest.json and the files it lists, with HTTP Range (resumable). "
        "Workers started with --shards-url http://HOST:PORT/ fetch, verify and cache them.",
    )  # fmt: skip
    serve.add_argument("shard_dir", metavar="DIR", type=Path, help="folder written by `edgesplit shard`")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: all)")
    serve.add_argument("--port", type=int, default=8765, help="TCP port (default 8765; 0: any free one)")
    serve.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        print(f"edgesplit: error: --port {args.port} is not a TCP port (0-65535)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s serve-shards %(message)s")
    server = ShardServer(args.shard_dir, args.host, args.port)
    url = server.start()
    files = len(server_files(args.shard_dir))
    print(f"serving {files} files of {args.shard_dir} at {url} (workers: --shards-url {url})", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


def server_files(shard_dir: Path) -> tuple[str, ...]:
    """The files a server of ``shard_dir`` offers: manifest.json and those it lists."""
    return (MANIFEST_FILE, *sorted(ShardFiles(shard_dir).manifest.files))
