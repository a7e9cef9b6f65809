"""Start a local Mosquitto with the secure profile of a state folder (tests, `up --secure`)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from shared.broker import LocalBroker, free_port
from shared.errors import BrokerUnavailable
from shared.security.broker_audit import BrokerAudit, audited_config
from shared.security.creds import DATA_PORT_OFFSET, StateDir, render_broker_config


def connack_arrives(host: str, port: int, timeout_s: float = 0.5) -> bool:
    """True when something at host:port answers an anonymous MQTT 3.1.1 CONNECT with a
    CONNACK, whatever its code: a secure broker refuses it (code 5) yet is up."""
    connect = bytes([0x10, 0x16, 0x00, 0x04, *b"MQTT", 0x04, 0x02, 0x00, 0x05, 0x00, 0x0A,
                     *b"edgesplitp"])  # fmt: skip
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.settimeout(timeout_s)
            sock.sendall(connect)
            reply = sock.recv(4)
    except OSError:
        return False
    return len(reply) == 4 and reply[0] == 0x20


@dataclass
class SecureBroker(LocalBroker):
    """Mosquitto with STATE's certificates, password file and ACL. ``port`` is the TLS
    control listener (client certificates), ``port`` + 1 the TLS data listener;
    ``password_port`` the loopback password listener."""

    state: StateDir | None = None
    password_port: int = 0
    audit: BrokerAudit | None = None
    """When set, Mosquitto logs everything into a pipe that ``audit`` counts its refusals
    from (shared/security/broker_audit.py); only the lines worth keeping reach the log."""

    @property
    def url(self) -> str:
        return f"mqtts://127.0.0.1:{self.port}"

    @property
    def data_port(self) -> int:
        return self.port + DATA_PORT_OFFSET

    @property
    def data_url(self) -> str:
        return f"mqtts://127.0.0.1:{self.data_port}"

    @property
    def password_url(self) -> str:
        return f"mqtt://127.0.0.1:{self.password_port}"

    def render_config(self) -> str:
        assert self.state is not None, "SecureBroker needs a state folder"
        config = render_broker_config(self.state, self.port, self.password_port, self.data_dir)
        return audited_config(config) if self.audit is not None else config

    def _spawn(self, command: list[str], log_file: Path) -> subprocess.Popen[bytes]:
        if self.audit is None:
            return super()._spawn(command, log_file)
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        assert process.stdout is not None
        log = open(log_file, "ab", buffering=0)  # noqa: SIM115 - closed when the pipe ends

        def keep(line: bytes) -> None:
            log.write(line)

        reader = self.audit.follow(process.stdout, keep)

        def close_when_done() -> None:
            reader.join()
            log.close()

        threading.Thread(target=close_when_done, name="broker-log", daemon=True).start()
        return process

    def answers(self) -> bool:
        return connack_arrives("127.0.0.1", self.password_port)

    def start(self, ready_timeout_s: float = 10.0) -> SecureBroker:
        super().start(ready_timeout_s)
        if self.audit is not None:
            self.audit.forget_readiness_probe()
        return self


def free_pair() -> int:
    """A free port whose next port is free too (the control and the data listener)."""
    for _ in range(100):
        port = free_port()
        if port < 65535:
            with contextlib.suppress(OSError), socket.socket() as probe:
                probe.bind(("127.0.0.1", port + DATA_PORT_OFFSET))
                return port
    raise BrokerUnavailable("no two consecutive free ports on 127.0.0.1 for the secure broker")


def start_secure_broker(state: StateDir, tls_port: int | None = None,
                        password_port: int | None = None, data_dir: Path | None = None,
                        audit: BrokerAudit | None = None) -> SecureBroker:  # fmt: skip
    """Start Mosquitto with ``state``'s secure profile on the given ports (free ones by
    default), its refusals counted by ``audit`` when given; returns once it answers.
    Raises BrokerUnavailable."""
    own = data_dir is None
    directory = data_dir or Path(tempfile.mkdtemp(prefix="edgesplit-secure-mosquitto-"))
    tls = tls_port or free_pair()
    password = password_port or free_port()
    while password in (tls, tls + DATA_PORT_OFFSET):
        password = free_port()
    broker = SecureBroker(port=tls, data_dir=directory, _own_dir=own, state=state,
                          password_port=password, audit=audit)  # fmt: skip
    broker.start()
    return broker
