"""A development certificate authority for the secure profile.

`create_ca` makes a self-signed CA; `issue` signs a server certificate (names: DNS
names and IP addresses it answers on) or a client certificate whose common name is the
identity Mosquitto takes as the username (``use_identity_as_username true``). Keys are
EC P-256, written with mode 0600; nothing is ever overwritten (ConfigError instead).
This is a CA for development and tests: an operator with a real CA issues the same
shapes of certificate and points the state folder at them.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.errors import ConfigError

VALID_DAYS = 825
"""Lifetime of the certificates this CA issues (days)."""


@dataclass(frozen=True)
class CertPair:
    """A certificate and its private key, as files (PEM)."""

    cert_file: Path
    key_file: Path


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file readable by its owner only (0600); never overwrite."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"{path} already exists; not overwriting it") from None
    with os.fdopen(fd, "wb") as file:
        file.write(data)


def write_public(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file (0644); never overwrite."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise ConfigError(f"{path} already exists; not overwriting it") from None
    with os.fdopen(fd, "wb") as file:
        file.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


ORGANIZATION = "edgesplit"


def subject_username(common_name: str) -> str:
    """The username Mosquitto takes from a client certificate of this CA on a listener with
    ``use_subject_as_username`` (the subject in RFC 2253 form): the data-plane listener's
    name for the identity ``common_name``."""
    return f"CN={common_name},O={ORGANIZATION}"


def _name(common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])  # fmt: skip


def create_ca(directory: Path, name: str = "edgesplit development CA") -> CertPair:
    """A self-signed CA in ``directory`` (ca.crt, ca.key). Raises ConfigError if present."""
    directory.mkdir(parents=True, exist_ok=True)
    pair = CertPair(directory / "ca.crt", directory / "ca.key")
    if pair.cert_file.exists() or pair.key_file.exists():
        raise ConfigError(f"a CA already exists in {directory}; not overwriting it")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                          content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, encipher_only=False,
                          decipher_only=False),
            critical=True,
        )  # fmt: skip
        .sign(key, hashes.SHA256())
    )
    write_private(pair.key_file, _key_pem(key))
    write_public(pair.cert_file, cert.public_bytes(serialization.Encoding.PEM))
    return pair


def _load_ca(ca: CertPair) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate(ca.cert_file.read_bytes())
        key = serialization.load_pem_private_key(ca.key_file.read_bytes(), password=None)
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read the CA {ca.cert_file}: {error}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{ca.key_file}: the CA key is not an EC key")
    return cert, key


def issue(ca: CertPair, directory: Path, common_name: str, *, server_names: tuple[str, ...] = ()
          ) -> CertPair:  # fmt: skip
    """Sign a certificate for ``common_name`` into ``directory`` (NAME.crt, NAME.key).

    With ``server_names`` (host names and IP addresses) it is a TLS server certificate;
    without, a client certificate whose CN is the identity. Raises ConfigError when the
    files exist or the CA cannot be read.
    """
    directory.mkdir(parents=True, exist_ok=True)
    pair = CertPair(directory / f"{common_name}.crt", directory / f"{common_name}.key")
    if pair.cert_file.exists() or pair.key_file.exists():
        raise ConfigError(f"a certificate for {common_name!r} already exists in {directory}")
    ca_cert, ca_key = _load_ca(ca)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server_names else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if server_names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_general_name(name) for name in server_names]),
            critical=False,
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    write_private(pair.key_file, _key_pem(key))
    write_public(pair.cert_file, cert.public_bytes(serialization.Encoding.PEM))
    return pair


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def common_name(cert_file: Path) -> str:
    """The CN of a PEM certificate (the identity a client certificate carries)."""
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""
