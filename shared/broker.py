"""Start and stop a local Mosquitto with the project's config (tests and `edgesplit up`)."""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from shared.errors import BrokerUnavailable

_CHECKOUT_CONFIG = Path(__file__).resolve().parent.parent / "deploy" / "mosquitto" / "mosquitto.conf"
CONFIG_TEMPLATE = (_CHECKOUT_CONFIG if _CHECKOUT_CONFIG.is_file()
                   else Path(__file__).resolve().parent / "packaged" / "mosquitto.conf")  # fmt: skip
"""deploy/mosquitto/mosquitto.conf, or in an installed package its copy in shared/packaged/."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def mqtt_answers(host: str, port: int, timeout_s: float = 1.0) -> bool:
    """True when an MQTT broker at host:port accepts a 3.1.1 CONNECT (CONNACK, code 0)."""
    connect = bytes(
        [0x10, 0x16, 0x00, 0x04]
        + list(b"MQTT")
        + [0x04, 0x02, 0x00, 0x05, 0x00, 0x0A]
        + list(b"edgesplitp")
    )
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.settimeout(timeout_s)
            sock.sendall(connect)
            reply = sock.recv(4)
            sock.sendall(bytes([0xE0, 0x00]))  # DISCONNECT
    except OSError:
        return False
    return len(reply) == 4 and reply[0] == 0x20 and reply[3] == 0


MOSQUITTO_ENV = "EDGESPLIT_MOSQUITTO"
"""The Mosquitto binary to run (a path), or ``none``: behave as on a machine without one
(`edgesplit up` then runs the embedded broker, shared/embedded_broker.py)."""


def find_mosquitto() -> str | None:
    chosen = os.environ.get(MOSQUITTO_ENV, "").strip()
    if chosen.lower() == "none":
        return None
    if chosen:
        return chosen if os.access(chosen, os.X_OK) else None
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.path.exists(p)),
        None,
    )


@dataclass
class LocalBroker:
    """A Mosquitto process started with deploy/mosquitto/mosquitto.conf."""

    port: int
    data_dir: Path
    process: subprocess.Popen[bytes] | None = None
    _own_dir: bool = field(default=False, repr=False)

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self, ready_timeout_s: float = 10.0) -> LocalBroker:
        binary = find_mosquitto()
        if binary is None:
            raise BrokerUnavailable(
                "mosquitto is not installed: run `make setup` (apt-get install -y mosquitto)"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self.render_config()
        config_path = self.data_dir / "mosquitto.conf"
        config_path.write_text(config)
        self.process = self._spawn([binary, "-c", str(config_path)], self.data_dir / "mosquitto.log")
        deadline = time.monotonic() + ready_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BrokerUnavailable(
                    f"mosquitto exited with status {self.process.returncode}; "
                    f"see {self.data_dir / 'mosquitto.log'}"
                )
            if self.answers():
                return self
            time.sleep(0.05)
        self.stop()
        raise BrokerUnavailable(f"mosquitto did not answer on port {self.port} in {ready_timeout_s} s")

    def _spawn(self, command: list[str], log_file: Path) -> subprocess.Popen[bytes]:
        """Start Mosquitto with its output appended to ``log_file`` (the secure profile's
        audit overrides it)."""
        with open(log_file, "ab") as log:
            return subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True)

    def render_config(self) -> str:
        """The Mosquitto config this broker runs with (the secure profile overrides it)."""
        return CONFIG_TEMPLATE.read_text().format(
            port=self.port,
            data_dir=self.data_dir,
            user=getpass.getuser(),
            bind_address="127.0.0.1",
        )

    def answers(self) -> bool:
        """True once the broker accepts connections (start's readiness check)."""
        return mqtt_answers("127.0.0.1", self.port, timeout_s=0.5)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send a signal to the broker (fault injection); does not wait."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)

    def stop(self, timeout_s: float = 5.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout_s)
        self.process = None

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> LocalBroker:
        return self if self.process is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_local_broker(port: int | None = None, data_dir: Path | None = None) -> LocalBroker:
    """Start Mosquitto on ``port`` (a free one by default); returns once it answers."""
    own = data_dir is None
    directory = data_dir or Path(tempfile.mkdtemp(prefix="edgesplit-mosquitto-"))
    broker = LocalBroker(port=port or free_port(), data_dir=directory, _own_dir=own)
    return broker.start()
