"""Issue #20's pip-only start, as a user does it: the working tree copied (its
`git ls-files`, untracked files not ignored included) into a temp folder, a brand new
virtual environment, `pip install ./copy` (the constraints `make setup` uses; torch's
CPU wheel and the rest come from pip's configured find-links and indexes, as on these
machines and in CI; pip's own cache is the shared one, as a user's would be), then the
installed `edgesplit up` with no Mosquitto to be found and `edgesplit generate` against
it, whose tokens must equal `edgesplit generate --local` from the same environment.

The binary is hidden for real where the test may make a mount namespace (root, as CI
runs): `up` runs under `unshare --mount` with empty tmpfs over /usr/sbin and
/usr/local/sbin (where `find_mosquitto` looks besides PATH) and a PATH of the new
environment's bin and the system dirs that hold no mosquitto. Elsewhere it falls back to
EDGESPLIT_MOSQUITTO=none (what test_embedded_broker.py uses) and says so. Nothing runs
from the checkout: PYTHONPATH is dropped and every command runs in the temp folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shared.broker import mqtt_answers
from shared.ports import quiet_ports
from tests.integration.cluster import stop_up
from tests.integration.test_up import _wait_for_line

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1500)]
ROOT = Path(__file__).resolve().parents[2]
SYSTEM_DIRS = ("/usr/local/bin", "/usr/bin", "/bin")
HIDDEN_DIRS = ("/usr/sbin", "/usr/local/sbin")
INSTALL_TIMEOUT_S = 900


def _copy_working_tree(dest: Path) -> None:
    """The checkout's tracked and untracked-not-ignored files, symlinks kept as links."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, check=True, timeout=60).stdout  # fmt: skip
    for name in filter(None, listed.decode().split("\0")):
        source = ROOT / name
        if not source.exists() and not source.is_symlink():
            continue  # deleted in the working tree, not yet in the index
        if source.is_dir() and not source.is_symlink():
            continue  # a submodule or nested checkout: not part of the package
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target, follow_symlinks=False)


def _clean_env(tmp_path: Path, venv: Path) -> dict[str, str]:
    """The environment without anything that points at the checkout or its venv."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("EDGESPLIT_") and key not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}  # fmt: skip
    path = os.pathsep.join([str(venv / "bin"), *(d for d in SYSTEM_DIRS if not os.path.exists(f"{d}/mosquitto"))])
    assert shutil.which("mosquitto", path=path) is None, path
    env.update(PATH=path, EDGESPLIT_MODELS_DIR=str(tmp_path / "models"),
               EDGESPLIT_CLUSTER="fresh" + os.urandom(3).hex(), PIP_NO_INPUT="1")  # fmt: skip
    return env


def _hiding_prefix() -> list[str] | None:
    """``unshare`` arguments that run a command with HIDDEN_DIRS emptied, or None where
    this machine lets the test make no mount namespace."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    mounts = "; ".join(f"if [ -d {d} ]; then mount -t tmpfs tmpfs {d} || exit 97; fi" for d in HIDDEN_DIRS)
    prefix = [unshare, "--mount", "--propagation", "private", "/bin/sh", "-c", f'{mounts}; exec "$@"', "sh"]
    probe = subprocess.run([*prefix, "/bin/sh", "-c", "test ! -e /usr/sbin/mosquitto"], capture_output=True, timeout=30)
    return prefix if probe.returncode == 0 else None


def test_pip_install_then_up_without_mosquitto_then_generate(tmp_path: Path) -> None:
    copy, venv = tmp_path / "copy", tmp_path / "venv"
    _copy_working_tree(copy)
    python = shutil.which("python3.11") or sys.executable
    env = _clean_env(tmp_path, venv)
    started_s = time.monotonic()
    subprocess.run([python, "-m", "venv", str(venv)], check=True, timeout=120, cwd=tmp_path)
    install = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "-c", str(copy / "constraints.txt"), str(copy)],
        capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, cwd=tmp_path, env=env,
    )  # fmt: skip
    install_s = time.monotonic() - started_s
    print(f"fresh venv + pip install ./copy: {install_s:.1f} s", file=sys.stderr)
    assert install.returncode == 0, install.stderr[-4000:]
    installed = subprocess.run([str(venv / "bin" / "python"), "-c", "import services, torch; print(services.__file__)"],
                               capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)  # fmt: skip
    assert installed.stdout.startswith(str(venv)), installed  # the package, not the checkout

    prefix = _hiding_prefix()
    if prefix is None:
        env["EDGESPLIT_MOSQUITTO"] = "none"
        print("no mount namespace here: Mosquitto hidden with EDGESPLIT_MOSQUITTO=none", file=sys.stderr)
    edgesplit = str(venv / "bin" / "edgesplit")
    port = quiet_ports(2)  # the broker, and the gateway on the next port
    http_port = port + 1
    url = f"mqtt://127.0.0.1:{port}"
    out, err = tmp_path / "up.out", tmp_path / "up.err"
    up = subprocess.Popen([*(prefix or []), edgesplit, "up", "--broker", url, "--run-dir", str(tmp_path / "run"),
                           "--http", f"127.0.0.1:{http_port}"],
                          stdout=open(out, "wb"), stderr=open(err, "wb"), env=env, cwd=tmp_path,  # noqa: SIM115
                          start_new_session=True)  # fmt: skip
    try:
        up_started_s = time.monotonic()
        ready = _wait_for_line(up, out, "edgesplit ready", 400)
        print(f"up to 'edgesplit ready': {time.monotonic() - up_started_s:.1f} s", file=sys.stderr)
        said = err.read_text()
        assert "no Mosquitto is installed; started the embedded broker (amqtt)" in said, said
        assert "model tiny-llama" in ready, ready  # the default without the SmolLM2 package
        _wait_for_line(up, out, "edgesplit gateway", 60)
        generate = [edgesplit, "generate", "--max-new-tokens", "8", "--json", "the edge"]
        local = subprocess.run([*generate, "--local", "--model", str(tmp_path / "models" / "tiny-llama")],
                               capture_output=True, text=True, timeout=180, cwd=tmp_path, env=env)  # fmt: skip
        assert local.returncode == 0, local.stderr
        served = subprocess.run([*generate, "--broker", url], capture_output=True, text=True, timeout=180,
                                cwd=tmp_path, env=env)  # fmt: skip
        assert served.returncode == 0, served.stderr
        expected = json.loads(local.stdout.splitlines()[-1])["token_ids"]
        assert json.loads(served.stdout.splitlines()[-1])["token_ids"] == expected and len(expected) == 8
    finally:
        stop_up(up)
    assert "stopped everything it started" in err.read_text()
    assert not mqtt_answers("127.0.0.1", port), "the embedded broker outlived `up`"
