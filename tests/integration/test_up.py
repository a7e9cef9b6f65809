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
from tests.integration.cluster import stop_up

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
    err = out.with_suffix(".err")  # the tests write up's stderr beside its stdout
    said = err.read_text(errors="replace")[-3000:] if err.exists() else "(not kept)"
    raise AssertionError(f"no {text!r} within {timeout_s} s (exit {process.poll()}); "
                         f"stdout: {out.read_text()!r}; stderr: {said!r}")  # fmt: skip


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
        stop_up(up)
    assert "stopped everything it started" in (tmp_path / "up.err").read_text()
    assert not mqtt_answers("127.0.0.1", port)
    leftovers = subprocess.run(["pgrep", "-f", f"services.worker.*{port}"], capture_output=True, text=True)
    assert leftovers.stdout.strip() == ""


def _descendants(pid: int) -> dict[int, str]:
    """Every process below ``pid``, by pid, with its start time (so a reused pid is not it)."""
    found: dict[int, str] = {}
    parents = [pid]
    while parents:
        listed = subprocess.run(["pgrep", "-P", ",".join(map(str, parents))], capture_output=True, text=True)
        parents = [int(child) for child in listed.stdout.split()]
        for child in parents:
            found[child] = _start_time(child) or ""
    return found


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, starttime


def _ignore_sigint() -> None:
    # What a shell does to a background job (`edgesplit up &`): the case that did not stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.flaky(reruns=0)  # a stop that needs a rerun is the bug itself: never rerun
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_up_stops_every_child_on_a_signal_to_its_pid_alone(tmp_path: Path, signum: signal.Signals) -> None:
    port = free_port()
    url = f"mqtt://127.0.0.1:{port}"
    env = {**os.environ, "EDGESPLIT_MODELS_DIR": str(tmp_path / "models"), "EDGESPLIT_CLUSTER": "upsignal"}
    up = subprocess.Popen(
        [*EDGESPLIT, "up", "--model", "tiny-llama", "--broker", url, "--run-dir", str(tmp_path / "run")],
        stdout=open(tmp_path / "up.out", "wb"), stderr=open(tmp_path / "up.err", "wb"), env=env,  # noqa: SIM115
        start_new_session=True, preexec_fn=_ignore_sigint,
    )  # fmt: skip
    children: dict[int, str] = {}
    try:
        _wait_for_line(up, tmp_path / "up.out", "edgesplit ready", 120)
        children = _descendants(up.pid)
        assert len(children) >= 8, children  # broker, 3 workers, 4 control services
        os.kill(up.pid, signum)  # the pid alone, not its process group
        up.wait(timeout=10)
    finally:
        if up.poll() is None:  # clean up after a failure: `up` and every child it started
            children = {**_descendants(up.pid), **children}
            os.killpg(up.pid, signal.SIGKILL)
            up.wait(timeout=10)
            for pid, started in children.items():
                if _start_time(pid) == started:
                    os.kill(pid, signal.SIGKILL)
    assert up.returncode == 0, (tmp_path / "up.err").read_text()
    deadline = time.monotonic() + 1.0  # `up` reaps its children itself; allow the kernel a moment
    while time.monotonic() < deadline and any(_start_time(p) == t for p, t in children.items()):
        time.sleep(0.05)
    alive = {p: t for p, t in children.items() if _start_time(p) == t}
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    assert alive == {}, f"still running after `up` exited: {alive}"
    assert "stopped everything it started" in (tmp_path / "up.err").read_text()
    assert not mqtt_answers("127.0.0.1", port)
