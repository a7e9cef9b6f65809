"""Helpers of tests/integration/test_containers.py for the gateway and the secure stack:
a completion through the gateway's HTTP API, and raw MQTT CONNECTs that show whether the
broker lets a client in (CONNACK 0) or not."""

from __future__ import annotations

import json
import socket
import ssl
import struct
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any


def complete(url: str, model: str, prompt: str, max_tokens: int, api_key: str | None = None,
             timeout_s: float = 120.0) -> tuple[int, dict[str, Any]]:  # fmt: skip
    """POST ``url``/v1/completions (greedy); (HTTP status, the JSON body)."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).encode()
    headers = {"Content-Type": "application/json"}
    if api_key is not None:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(f"{url}/v1/completions", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as answer:  # noqa: S310 - a test's own URL
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def read_api_key(env_file: Path) -> str:
    """The key of `creds compose`'s gateway.env (EDGESPLIT_GATEWAY_API_KEY=...)."""
    name, _, value = env_file.read_text().strip().partition("=")
    assert name == "EDGESPLIT_GATEWAY_API_KEY" and value, env_file
    return value


def _connect_packet(client_id: str) -> bytes:
    """An MQTT 3.1.1 CONNECT: clean session, keepalive 30 s, no username, no password."""
    payload = struct.pack("!H", len(client_id)) + client_id.encode()
    variable = b"\x00\x04MQTT\x04\x02" + struct.pack("!H", 30)
    remaining = len(variable) + len(payload)
    assert remaining < 128
    return bytes([0x10, remaining]) + variable + payload


def mqtt_connect(port: int, *, ca_file: Path | None = None, cert: tuple[Path, Path] | None = None,
                 timeout_s: float = 10.0) -> str:  # fmt: skip
    """Send a CONNECT to 127.0.0.1:``port`` (plain, or TLS trusting ``ca_file``, with
    ``cert`` as client certificate when given) and say what came back: ``"accepted"``
    (CONNACK 0), ``"refused: ..."`` (another CONNACK code, a TLS alert, or the broker
    closing the connection)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
    try:
        stream: socket.socket = raw
        if ca_file is not None:
            context = ssl.create_default_context(cafile=str(ca_file))
            if cert is not None:
                context.load_cert_chain(str(cert[0]), str(cert[1]))
            stream = context.wrap_socket(raw, server_hostname="localhost")
        stream.sendall(_connect_packet("anonymous-probe"))
        answer = b""
        while len(answer) < 4:
            chunk = stream.recv(4 - len(answer))
            if not chunk:
                return f"refused: connection closed after {answer!r}"
            answer += chunk
    except ssl.SSLError as error:
        return f"refused: TLS {error.reason or error}"
    except (ConnectionResetError, BrokenPipeError) as error:
        return f"refused: {error}"
    finally:
        raw.close()
    if answer[:2] == b"\x20\x02" and answer[3] == 0:
        return "accepted"
    return f"refused: CONNACK {answer.hex()}"
