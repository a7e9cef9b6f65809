"""`edgesplit up` end to end: starts its own broker, workers and plan; serves; Ctrl-C stops all."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shared.broker import free_port, mqtt_answers

pytestmark = pytest.mark.integration
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


def test_up_serves_and_stops_everything_on_ctrl_c(tmp_path: Path) -> None:
    port = free_port()
    url = f"mqtt://127.0.0.1:{port}"
    env = {**os.environ, "EDGESPLIT_MODELS_DIR": str(tmp_path / "models"), "EDGESPLIT_CLUSTER": "uptest"}
    up = subprocess.Popen(
        [*EDGESPLIT, "up", "--model", "tiny-llama", "--broker", url, "--run-dir", str(tmp_path / "run")],
        stdout=open(tmp_path / "up.out", "wb"), stderr=open(tmp_path / "up.err", "wb"), env=env,  # noqa: SIM115
        start_new_session=True,
    )  # fmt: skip
    try:
        ready = _wait_for_line(up, tmp_path / "up.out", "edgesplit ready", 120)
        first = re.search(r"epoch \d+: car\[0,(\d+)\)", ready)
        assert first is not None and int(first.group(1)) >= 2  # private blocks on the trusted entry
        counted = re.search(r"on (\d) of 3 nodes( \((.*) standing by\))?,", ready)
        assert counted is not None, ready
        layout = ready.split(": ", 2)[2]
        serving = {node for node in ("car", "rsu", "mec") if f"{node}[" in layout}
        assert int(counted.group(1)) == len(serving)
        assert set((counted.group(3) or "").split(", ")) - {""} == {"car", "rsu", "mec"} - serving
        err = (tmp_path / "up.err").read_text()
        assert f"started Mosquitto on port {port}" in err
        generated = subprocess.run(
            [*EDGESPLIT, "generate", "--broker", url, "--prompt", "hello edge", "--max-new-tokens", "6", "--json"],
            capture_output=True, text=True, timeout=60, env=env,
        )  # fmt: skip
        assert generated.returncode == 0, generated.stderr
        assert len(json.loads(generated.stdout.splitlines()[-1])["token_ids"]) == 6
        status = subprocess.run([*EDGESPLIT, "status", "--json", "--broker", url],
                                capture_output=True, text=True, timeout=30, env=env)  # fmt: skip
        state = json.loads(status.stdout)
        assert state["plan"]["epoch"] >= 1 and state["plan"]["entry_node"] == "car"
        assert {n["node"] for n in state["nodes"] if n["state"] == "online"} >= {"car", "rsu", "mec"}
        held = {n["node"]: n["segments"] for n in state["nodes"]}
        for segment in state["plan"]["segments"]:  # every node holds what the plan gives it
            assert held[segment["node"]] == [segment]
        assert held["car"][0]["start"] == 0 and held["car"][0]["end"] >= 2  # private blocks
        assert any(d["outcome"] == "committed" for d in state["decisions"])  # the orchestrator's plan
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            raise
    assert "stopped everything it started" in (tmp_path / "up.err").read_text()
    assert not mqtt_answers("127.0.0.1", port)
    leftovers = subprocess.run(["pgrep", "-f", f"services.worker.*{port}"], capture_output=True, text=True)
    assert leftovers.stdout.strip() == ""
