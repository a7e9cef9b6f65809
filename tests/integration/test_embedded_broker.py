"""`edgesplit up` on a machine without Mosquitto (EDGESPLIT_MOSQUITTO=none hides the
binary): it runs the embedded broker (amqtt), says its limits, and the system generates
the tokens of `edgesplit generate --local`. Real worker processes, a tiny checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared.broker import free_port, mqtt_answers
from tests.integration.cluster import stop_up
from tests.integration.test_up import _wait_for_line

pytestmark = [pytest.mark.integration, pytest.mark.slow]
EDGESPLIT = [sys.executable, "-m", "services.cli"]


def test_up_without_mosquitto_runs_the_embedded_broker_and_generates(tmp_path: Path) -> None:
    port = free_port()
    url = f"mqtt://127.0.0.1:{port}"
    env = {**os.environ, "EDGESPLIT_MODELS_DIR": str(tmp_path / "models"), "EDGESPLIT_CLUSTER": "emb" + os.urandom(3).hex(),
           "EDGESPLIT_MOSQUITTO": "none"}  # fmt: skip
    out, err = tmp_path / "up.out", tmp_path / "up.err"
    up = subprocess.Popen([*EDGESPLIT, "up", "--model", "tiny-llama", "--broker", url, "--run-dir", str(tmp_path / "run"),
                           "--http", "off", "--metrics", "off"],
                          stdout=open(out, "wb"), stderr=open(err, "wb"), env=env, start_new_session=True)  # noqa: SIM115  # fmt: skip
    try:
        _wait_for_line(up, out, "edgesplit ready", 300)
        said = err.read_text()
        assert "started the embedded broker (amqtt)" in said and "MQTT 3.1.1 only" in said, said
        assert "started Mosquitto" not in said
        assert not (tmp_path / "run" / "broker" / "mosquitto.log").exists()
        local = subprocess.run([*EDGESPLIT, "generate", "--local", "--model", str(tmp_path / "models" / "tiny-llama"),
                                "--max-new-tokens", "8", "--json", "the edge"],
                               capture_output=True, text=True, timeout=120, env=env)  # fmt: skip
        assert local.returncode == 0, local.stderr
        served = subprocess.run([*EDGESPLIT, "generate", "--broker", url, "--max-new-tokens", "8", "--json",
                                 "the edge"], capture_output=True, text=True, timeout=120, env=env)  # fmt: skip
        assert served.returncode == 0, served.stderr
        expected = json.loads(local.stdout.splitlines()[-1])["token_ids"]
        assert json.loads(served.stdout.splitlines()[-1])["token_ids"] == expected and len(expected) == 8
    finally:
        stop_up(up)
    assert not mqtt_answers("127.0.0.1", port), "the embedded broker outlived `up`"
