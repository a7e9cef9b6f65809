"""Settings shared by every edgesplit process (pydantic-settings, env prefix EDGESPLIT_).

Precedence is CLI > environment > defaults: build settings with `load_settings`,
passing the command-line values that were given (``None`` means "not given").
Every service's settings class extends `BusSettings`.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import unquote, urlsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.errors import ConfigError, InvalidId
from shared.ids import validate_id

DEFAULT_BROKER_URL = "mqtt://127.0.0.1:1883"
_DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


@dataclass(frozen=True)
class BrokerAddress:
    """A parsed broker URL: ``mqtt://[user:pass@]host:port`` (``mqtts://`` for TLS)."""

    scheme: Literal["mqtt", "mqtts"]
    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @property
    def tls(self) -> bool:
        return self.scheme == "mqtts"

    def redacted(self) -> str:
        """The URL without its password, for logs and error messages."""
        user = f"{self.username}:***@" if self.username else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{user}{host}:{self.port}"


def parse_broker_url(url: str) -> BrokerAddress:
    """Parse a broker URL; raise ConfigError naming what is wrong with it."""
    hint = "expected mqtt://[user:pass@]host:port or mqtts://... (TLS)"
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as error:
        raise ConfigError(f"invalid broker URL {url!r}: {error}; {hint}") from None
    if parts.scheme not in _DEFAULT_PORTS:
        raise ConfigError(f"invalid broker URL {url!r}: scheme must be mqtt or mqtts; {hint}")
    if not parts.hostname:
        raise ConfigError(f"invalid broker URL {url!r}: no host; {hint}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"invalid broker URL {url!r}: unexpected path or query; {hint}")
    if port == 0:
        raise ConfigError(f"invalid broker URL {url!r}: port 0; {hint}")
    return BrokerAddress(
        scheme=parts.scheme,  # type: ignore[arg-type]  # checked above
        host=parts.hostname,
        port=port or _DEFAULT_PORTS[parts.scheme],
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
    )


DEFAULT_MAX_MESSAGE_AGE_S = 30.0
"""`BusSettings.max_message_age_s` when not set (and `ControlGate`'s default)."""


class BusSettings(BaseSettings):
    """What every process needs to reach the broker. Frozen; units in field names."""

    model_config = SettingsConfigDict(
        env_prefix="EDGESPLIT_", frozen=True, extra="forbid", allow_inf_nan=False
    )
    """Every duration, rate and factor must be finite: ``inf`` or ``nan`` in the
    environment or on the command line is a ConfigError naming the setting."""

    broker_url: str = DEFAULT_BROKER_URL
    data_broker_url: str | None = None
    """The data plane's broker (activation frames), when it is not ``broker_url``: a
    site broker near the workers while control crosses to a regional one
    (docs/DEPLOY.md). Every process of a cluster must use the same pair."""
    cluster: str = "default"
    client_id: str | None = None
    """MQTT client id prefix and message origin; a random one when not set."""
    protocol: Literal["5", "3.1.1", "auto"] = "auto"
    """MQTT version: "auto" tries 5 and falls back to 3.1.1."""
    keepalive_s: int = Field(default=2, ge=1, le=65535)
    connect_timeout_s: float = Field(default=5.0, gt=0)
    publish_timeout_s: float = Field(default=5.0, gt=0)
    reconnect_initial_s: float = Field(default=0.1, gt=0)
    reconnect_max_s: float = Field(default=2.0, gt=0)
    """Cap of the reconnect backoff: edge links drop often; come back within seconds."""
    max_message_age_s: float = Field(default=DEFAULT_MAX_MESSAGE_AGE_S, gt=0)
    """Receivers refuse a signed NodeDown, NodeJoined, EmulationCommand or live
    DecisionRecorded issued longer ago than this (``{Kind}_stale``): the replay fence that
    survives a receiver's restart. Assumes the hosts' clocks agree to well within it
    (NTP, or GPS time on V2X units); docs/SECURITY.md."""
    tls_ca_file: Path | None = None
    """CA bundle for mqtts:// (the system's when not set)."""
    tls_cert_file: Path | None = None
    """Client certificate (PEM) for mqtts://: the secure profile's identity (its CN)."""
    tls_key_file: Path | None = None
    """The client certificate's private key (PEM); set together with tls_cert_file."""
    models_dir: Path = Path("~/.cache/edgesplit/models").expanduser()
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    """Serve Prometheus metrics on http://metrics_host:metrics_port/metrics (shared/metrics.py);
    None: no metrics endpoint. `edgesplit up` gives each process a free port of its own."""
    metrics_host: str = "127.0.0.1"
    plan_signing_key: str | None = Field(default=None, repr=False)
    """The cluster's control key (shared/security/signing.py); `up` generates one. Unset:
    the secure profile's services refuse to start; the open profile warns and uses the
    public development key."""
    plan_signing_key_file: Path | None = None
    identities_file: Path | None = None
    """The operator's identity registry (STATE/identities.toml): the trust of each node for
    placement comes from it, not from the node's own status (shared/security/trust.py)."""
    role_keys_dir: Path | None = None
    """The signing roles' public keys (STATE/keys): when set, control messages count only
    when signed by the role allowed for their kind (shared/security/role_keys.py)."""
    role_key_file: Path | None = None
    """This process's role private key (STATE/keys/private/{role}.key): it signs the
    control messages it publishes with it instead of the cluster HMAC key."""
    replay_memory_dir: Path | None = None
    """Where a receiver writes down the control messages without an epoch it accepted, so
    that after a restart it refuses replays of them (shared/security/replay_memory.py);
    `edgesplit up` sets RUN/replay. None: memory of the running process only."""
    """A file holding the control key (STATE/signing.key, RUN/signing.key)."""

    @field_validator("broker_url", "data_broker_url")
    @classmethod
    def _valid_broker_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            parse_broker_url(value)
        except ConfigError as error:
            raise ValueError(str(error)) from None
        return value

    @field_validator("cluster", "client_id")
    @classmethod
    def _valid_id(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return validate_id(value)
        except InvalidId as error:
            raise ValueError(str(error)) from None

    @field_validator("models_dir")
    @classmethod
    def _expand_user(cls, value: Path) -> Path:
        return value.expanduser()

    @model_validator(mode="after")
    def _backoff_order(self) -> BusSettings:
        if self.reconnect_max_s < self.reconnect_initial_s:
            raise ValueError("reconnect_max_s must be >= reconnect_initial_s")
        return self

    @model_validator(mode="after")
    def _client_certificate(self) -> BusSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file must be set together")
        if self.tls_cert_file is not None and not self.broker.tls:
            raise ValueError("a client certificate (tls_cert_file) needs an mqtts:// broker URL")
        for name in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name}: no such file {path}")
        return self

    @property
    def broker(self) -> BrokerAddress:
        return parse_broker_url(self.broker_url)

    def broker_for(self, plane: Literal["control", "data"]) -> BrokerAddress:
        """The broker of ``plane``: ``data_broker_url`` for data when set, else ``broker_url``."""
        if plane == "data" and self.data_broker_url is not None:
            return parse_broker_url(self.data_broker_url)
        return self.broker


def client_tls_context(settings: BusSettings, address: BrokerAddress | None = None) -> ssl.SSLContext | None:
    """The TLS context for ``address`` (``settings``' broker by default; None for
    mqtt://): the CA file (the system's bundle when not set) and the client certificate
    when one is set. Raises ConfigError when a file cannot be read or the key does not match."""
    address = address or settings.broker
    if not address.tls:
        return None
    try:
        context = ssl.create_default_context(
            cafile=str(settings.tls_ca_file) if settings.tls_ca_file else None
        )
        if settings.tls_cert_file is not None and settings.tls_key_file is not None:
            context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(f"TLS files for {address.redacted()} unusable: {error}") from None
    return context


SettingsT = TypeVar("SettingsT", bound=BaseSettings)


def load_settings(
    cls: type[SettingsT], cli_overrides: Mapping[str, Any] | None = None
) -> SettingsT:
    """Build ``cls`` from CLI overrides > EDGESPLIT_* environment > defaults.

    Overrides whose value is ``None`` (an option not given) are ignored.
    Raises ConfigError with one line per invalid field.
    """
    given = {key: value for key, value in (cli_overrides or {}).items() if value is not None}
    try:
        return cls(**given)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in item['loc']) or 'settings'}: {item['msg']}"
            for item in error.errors()
        )
        raise ConfigError(f"invalid settings for {cls.__name__}: {problems}") from None


def parse_host_port(text: str, option: str = "--http") -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8000`` for IPv6) -> (host, port), port 0-65535.

    Raises ConfigError naming ``option``.
    """
    host, colon, port_text = text.rpartition(":")
    host = host.strip("[]")
    if not colon or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{option} must be HOST:PORT (e.g. 127.0.0.1:8000), got {text!r}")
    return host, int(port_text)
