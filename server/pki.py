"""The federation's keys: a CA and the SuperLink's TLS certificate, and merchants' node keys.

Made with `cryptography` alone. Private keys are written 0600 and atomically;
nothing existing is overwritten unless asked.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common import atomic
from common.errors import SilorecError

DEFAULT_HOSTS = ("localhost", "127.0.0.1")
CA_DAYS = 3650
SERVER_DAYS = 825  # the longest server-certificate lifetime browsers and most TLS stacks still accept
REGISTRY = "enrolled.json"
SIGNING_REGISTRY = "signing.json"  # merchant → Ed25519 public key (hex), the ServerApp's `signing-keys`
_MERCHANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class PkiError(SilorecError):
    """Keys or certificates cannot be made, read or written as asked."""


@dataclass(frozen=True)
class ServerPki:
    """Where `make_server_pki` wrote the CA and the SuperLink's certificate."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class Enrolment:
    """One merchant's node key pair and its entry in the registry."""

    merchant: str
    private_key: Path
    public_key: Path
    registry: Path
    signing_key: Path  # Ed25519: the merchant signs its sealed updates with it (NAME.sign.key)
    signing_registry: Path


def make_server_pki(out: Path, hosts: Sequence[str] = DEFAULT_HOSTS, *, force: bool = False) -> ServerPki:
    """Write ca.pem/ca.key and server.pem/server.key (signed by the CA, SANs = `hosts`) into `out`."""
    out = Path(out)
    paths = ServerPki(out / "ca.pem", out / "ca.key", out / "server.pem", out / "server.key")
    _refuse_existing([paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key], force)
    if not hosts:
        raise PkiError("no --host given: name at least one host name or IP address the SuperLink is reached at")
    for host in hosts:
        check_host(host)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "silorec"),
            x509.NameAttribute(NameOID.COMMON_NAME, "silorec federation CA"),
        ]
    )
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))  # tolerate small clock skew between hosts
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "silorec"),
                    x509.NameAttribute(NameOID.COMMON_NAME, hosts[0]),
                ]
            )
        )
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=SERVER_DAYS))
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=False,
                crl_sign=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write_private(paths.ca_key, _pem_key(ca_key))
    _write_public(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(paths.server_key, _pem_key(server_key))
    _write_public(paths.server_cert, server_cert.public_bytes(serialization.Encoding.PEM))
    return paths


def enroll_merchant(out: Path, merchant: str, *, force: bool = False) -> Enrolment:
    """Make `merchant`'s SuperNode key pair (OpenSSH, EC P-384) in `out` and record its public key in the registry."""
    if not _MERCHANT_NAME.match(merchant):
        raise PkiError(f"merchant name {merchant!r} is not usable as a file name: use letters, digits, '.', '_' or '-'")
    out = Path(out)
    enrolment = Enrolment(
        merchant,
        out / f"{merchant}.key",
        out / f"{merchant}.pub",
        out / REGISTRY,
        out / f"{merchant}.sign.key",
        out / SIGNING_REGISTRY,
    )
    registry = read_registry(out)
    if not force:
        _refuse_existing([enrolment.private_key, enrolment.public_key, enrolment.signing_key], force)
        if merchant in registry:
            raise PkiError(f"{merchant} is already enrolled in {enrolment.registry}; pass --force to give it a new key")
    key = ec.generate_private_key(ec.SECP384R1())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    _write_private(enrolment.private_key, private)
    _write_public(enrolment.public_key, public + f" silorec-{merchant}\n".encode())
    signing = ed25519.Ed25519PrivateKey.generate()
    _write_private(
        enrolment.signing_key,
        signing.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )
    signers = json.loads(enrolment.signing_registry.read_text()) if enrolment.signing_registry.is_file() else {}
    signers[merchant] = (
        signing.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()
    )
    atomic.write_json(enrolment.signing_registry, dict(sorted(signers.items())))
    registry[merchant] = public.decode()
    atomic.write_json(enrolment.registry, dict(sorted(registry.items())))
    return enrolment


def read_registry(folder: Path) -> dict[str, str]:
    """The enrolled merchants of `folder`: merchant name → OpenSSH public key line (empty if none yet)."""
    path = Path(folder) / REGISTRY
    if not path.exists():
        return {}
    try:
        registry = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PkiError(
            f"{path} is not a readable enrolment registry ({e}); restore it or re-enroll the merchants"
        ) from e
    if not isinstance(registry, dict) or not all(isinstance(v, str) for v in registry.values()):
        raise PkiError(f"{path} is not a merchant → public key mapping; restore it or re-enroll the merchants")
    for merchant, line in registry.items():
        try:
            serialization.load_ssh_public_key(line.encode())
        except (ValueError, UnsupportedAlgorithm) as e:
            raise PkiError(f"{path}: the public key of {merchant} is not an OpenSSH public key; re-enroll it") from e
    return registry


_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def check_host(host: str) -> None:
    """PkiError unless `host` is an IP address or a DNS name (labels of 1–63 letters, digits or '-', 253 at most)."""
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    name = host[:-1] if host.endswith(".") else host
    if not name or len(name) > 253 or not all(_LABEL.match(label) for label in name.split(".")):
        shown = host if len(host) <= 40 else host[:37] + "..."
        raise PkiError(
            f"--host {shown!r} is neither an IP address nor a DNS name (labels of 1-63 letters, digits or '-', "
            "253 characters in all)"
        )


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_private(path: Path, data: bytes) -> None:
    # mkstemp already creates files 0600; chmod again so a permissive umask or a replaced file cannot widen it
    atomic.write_bytes(path, data)
    os.chmod(path, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    atomic.write_bytes(path, data)
    os.chmod(path, 0o644)  # certificates and public keys are meant to be copied and read


def _refuse_existing(paths: Sequence[Path], force: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise PkiError(f"{', '.join(existing)} already exist(s); choose another --out or pass --force to replace")
