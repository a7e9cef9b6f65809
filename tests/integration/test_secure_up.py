"""`edgesplit up --secure` end to end, and the open-broker warning of the default `up`.

The secure stack starts its own Mosquitto with a state folder it creates, every worker
and service connects with its own certificate, and a client with the ``client``
identity's certificate generates; the same request without a certificate is refused.
The gateway runs there too, as the ``gateway`` identity, and wants the API key `up`
made in the state folder: a completion through it equals `generate --local`.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from shared.ports import quiet_ports
from shared.security.creds import StateDir, client_environment, load_registry
from tests.integration.cluster import stop_up

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]
EDGESPLIT = [sys.executable, "-m", "services.cli"]


def _wait_for_line(process: subprocess.Popen[bytes], out: Path, text: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in out.read_text(errors="replace").splitlines():
            if text in line:
                return line
        if process.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"no {text!r} within {timeout_s} s; stdout: {out.read_text()!r}")


def test_default_up_says_first_that_the_broker_is_open(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.toml")  # stops `up` right after its first line
    plain = subprocess.run([*EDGESPLIT, "up", "--topology", missing], capture_output=True,
                           text=True, timeout=60)  # fmt: skip
    first = plain.stderr.splitlines()[0]
    assert "OPEN" in first and "anonymous, no TLS" in first and "--secure" in first
    secure = subprocess.run([*EDGESPLIT, "up", "--secure", "--state", str(tmp_path / "s"),
                             "--topology", missing], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert "OPEN" not in secure.stderr and secure.returncode != 0


@pytest.mark.parametrize("extra", [["--static"], ["--broker", "mqtt://127.0.0.1:1883"],
                                   ["--broker", "mqtts://example.org:8883"]])  # fmt: skip
def test_up_secure_refuses_options_it_cannot_honour(extra: list[str], tmp_path: Path) -> None:
    done = subprocess.run([*EDGESPLIT, "up", "--secure", "--state", str(tmp_path / "s"), *extra],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert not (tmp_path / "s").exists()


def test_up_secure_serves_identified_clients_only_directly_and_through_the_gateway(tmp_path: Path) -> None:
    state, http_port = tmp_path / "state", quiet_ports()  # below the ephemeral range: `up` binds its metrics ports with bind(0)
    env = {**os.environ, "EDGESPLIT_MODELS_DIR": str(tmp_path / "models"), "EDGESPLIT_CLUSTER": "secup"}
    for key in [k for k in env if k.startswith(("EDGESPLIT_TLS", "EDGESPLIT_GATEWAY")) or k == "EDGESPLIT_BROKER_URL"]:
        del env[key]
    up = subprocess.Popen(
        [*EDGESPLIT, "up", "--secure", "--state", str(state), "--model", "tiny-llama",
         "--run-dir", str(tmp_path / "run"), "--http", f"127.0.0.1:{http_port}", "--metrics", "off"],
        stdout=open(tmp_path / "up.out", "wb"), stderr=open(tmp_path / "up.err", "wb"), env=env,  # noqa: SIM115
        start_new_session=True,
    )  # fmt: skip
    try:
        ready = _wait_for_line(up, tmp_path / "up.out", "edgesplit ready", 150)
        url = re.search(r"broker (mqtts://127\.0\.0\.1:\d+)", ready)
        assert url is not None, ready
        err = (tmp_path / "up.err").read_text()
        assert "OPEN" not in err and "created credentials" in err
        assert load_registry(StateDir(state)).cluster == "secup"
        client = {**env, **client_environment(StateDir(state), "client", url.group(1))}
        generated = subprocess.run(
            [*EDGESPLIT, "generate", "--prompt", "hello edge", "--max-new-tokens", "6", "--json"],
            capture_output=True, text=True, timeout=60, env=client,
        )  # fmt: skip
        assert generated.returncode == 0, generated.stderr
        assert len(json.loads(generated.stdout.splitlines()[-1])["token_ids"]) == 6
        # without a client certificate the TLS listener lets nobody in
        anonymous = {key: value for key, value in client.items()
                     if key not in ("EDGESPLIT_TLS_CERT_FILE", "EDGESPLIT_TLS_KEY_FILE")}  # fmt: skip
        refused = subprocess.run(
            [*EDGESPLIT, "generate", "--prompt", "hello", "--max-new-tokens", "2", "--json"],
            capture_output=True, text=True, timeout=60, env={**anonymous, "EDGESPLIT_CONNECT_TIMEOUT_S": "2"},
        )  # fmt: skip
        assert refused.returncode != 0 and "Traceback" not in refused.stderr
        assert "token_ids" not in refused.stdout
        _check_gateway(up, tmp_path, state, http_port, env)
    finally:
        stop_up(up)
    assert "stopped everything it started" in (tmp_path / "up.err").read_text()


def _check_gateway(up: subprocess.Popen[bytes], tmp_path: Path, state: Path, http_port: int,
                   env: dict[str, str]) -> None:  # fmt: skip
    """The gateway of `up --secure`: its own identity, a key required, tokens of --local."""
    line = _wait_for_line(up, tmp_path / "up.out", "edgesplit gateway", 60)
    key_file = state / "gateway-api-key"
    assert f"http://127.0.0.1:{http_port}/v1" in line and str(key_file) in line, line
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert load_registry(StateDir(state)).get("gateway") is not None
    key = key_file.read_text().strip()
    base = f"http://127.0.0.1:{http_port}/v1"
    for wrong in ("none", key + "x"):
        stranger = openai.OpenAI(base_url=base, api_key=wrong, max_retries=0, timeout=30)
        with pytest.raises(openai.AuthenticationError) as raised:
            stranger.models.list()
        assert raised.value.status_code == 401 and raised.value.code == "invalid_api_key"
    local = subprocess.run(
        [*EDGESPLIT, "generate", "--local", "--model", str(tmp_path / "models" / "tiny-llama"),
         "--prompt", "hello edge", "--max-new-tokens", "6", "--json"],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert local.returncode == 0, local.stderr
    expected = json.loads(local.stdout.splitlines()[-1])["token_ids"]
    api = openai.OpenAI(base_url=base, api_key=key, max_retries=0, timeout=120)
    model = api.models.list().data[0].id
    stream = api.completions.create(model=model, prompt="hello edge", max_tokens=6, temperature=0, stream=True)
    tokens = [token for chunk in stream for choice in chunk.choices
              for token in (choice.model_extra or {}).get("token_ids") or []]  # fmt: skip
    assert tokens == expected and len(tokens) == 6
