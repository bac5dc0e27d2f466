"""The federation's certificates and merchants' node keys (server/pki.py, `silorec-server certs|enroll`)."""

from __future__ import annotations

import ipaddress
import json
import stat

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key, load_ssh_public_key

from common import seal
from server.cli import main
from server.pki import PkiError, enroll_merchant, make_server_pki, read_registry
from server.sealing import read_signers


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_server_certificate_chains_to_the_ca_and_names_every_host(tmp_path):
    p = make_server_pki(tmp_path, ["coordinator.example", "10.0.0.7"])
    ca = x509.load_pem_x509_certificate(p.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(p.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the signature or issuer is wrong
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["coordinator.example"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.7")]
    key = load_pem_private_key(p.server_key.read_bytes(), None)
    assert key.public_key().public_numbers() == server.public_key().public_numbers()


def test_the_chain_verifies_with_x509_policy_for_the_default_hosts(tmp_path):
    p = make_server_pki(tmp_path)
    ca = x509.load_pem_x509_certificate(p.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(p.server_cert.read_bytes())
    store = x509.verification.Store([ca])
    for host in (x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))):
        verifier = x509.verification.PolicyBuilder().store(store).build_server_verifier(host)
        assert verifier.verify(server, [])[-1] == ca
    other = x509.verification.PolicyBuilder().store(store).build_server_verifier(x509.DNSName("elsewhere.example"))
    with pytest.raises(x509.verification.VerificationError):
        other.verify(server, [])


def test_private_keys_are_owner_only_and_certificates_readable(tmp_path):
    p = make_server_pki(tmp_path)
    assert _mode(p.ca_key) == 0o600 and _mode(p.server_key) == 0o600
    assert _mode(p.ca_cert) == 0o644 and _mode(p.server_cert) == 0o644
    e = enroll_merchant(tmp_path / "enrolled", "shop-a")
    assert _mode(e.private_key) == 0o600 and _mode(e.public_key) == 0o644


def test_existing_files_are_not_overwritten_without_force(tmp_path):
    p = make_server_pki(tmp_path)
    before = p.ca_key.read_bytes()
    with pytest.raises(PkiError, match="--force"):
        make_server_pki(tmp_path)
    assert p.ca_key.read_bytes() == before
    make_server_pki(tmp_path, force=True)
    assert p.ca_key.read_bytes() != before and _mode(p.ca_key) == 0o600
    enroll_merchant(tmp_path, "shop-a")
    with pytest.raises(PkiError):
        enroll_merchant(tmp_path, "shop-a")


def test_enrolment_writes_an_openssh_nist_key_pair_and_records_it(tmp_path):
    a = enroll_merchant(tmp_path, "shop-a")
    enroll_merchant(tmp_path, "shop-b")
    private = load_ssh_private_key(a.private_key.read_bytes(), None)
    public = load_ssh_public_key(a.public_key.read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name.startswith("secp")
    assert private.public_key().public_numbers() == public.public_numbers()
    registry = read_registry(tmp_path)
    assert set(registry) == {"shop-a", "shop-b"}
    assert load_ssh_public_key(registry["shop-a"].encode()).public_numbers() == public.public_numbers()
    # and an Ed25519 signing key, owner-only, whose public half the ServerApp's signing-keys registry holds
    signing = load_pem_private_key(a.signing_key.read_bytes(), None)
    assert stat.S_IMODE(a.signing_key.stat().st_mode) == 0o600
    signers = read_signers(a.signing_registry)
    assert set(signers.values()) == {"shop-a", "shop-b"} and signers[seal.signing_public_bytes(signing)] == "shop-a"


def test_a_bad_merchant_name_or_registry_is_a_clear_error(tmp_path):
    with pytest.raises(PkiError, match="file name"):
        enroll_merchant(tmp_path, "../escape")
    (tmp_path / "enrolled.json").write_text(json.dumps({"shop": "not a key"}))
    with pytest.raises(PkiError, match="re-enroll"):
        read_registry(tmp_path)


def test_commands_write_the_files_and_refuse_to_overwrite_in_one_line(tmp_path):
    runner = CliRunner()
    done = runner.invoke(
        main, ["certs", "--out", str(tmp_path / "pki"), "--host", "link.example", "--host", "127.0.0.1"]
    )
    assert done.exit_code == 0, done.output
    assert {f.name for f in (tmp_path / "pki").iterdir()} == {"ca.pem", "ca.key", "server.pem", "server.key"}
    again = runner.invoke(main, ["certs", "--out", str(tmp_path / "pki")])
    assert again.exit_code == 2 and "already exist" in again.output and "Traceback" not in again.output
    done = runner.invoke(main, ["enroll", "--out", str(tmp_path / "enrolled"), "--merchant", "shop-a"])
    assert done.exit_code == 0, done.output
    assert set(read_registry(tmp_path / "enrolled")) == {"shop-a"}


def test_start_without_certificates_names_the_missing_files(tmp_path):
    done = CliRunner().invoke(
        main, ["start", "--certs", str(tmp_path / "none"), "--enrolled", str(tmp_path), "--state", str(tmp_path / "s")]
    )
    assert done.exit_code == 2 and "ca.pem" in done.output and "silorec-server certs" in done.output


def test_a_host_that_is_neither_an_address_nor_a_name_is_one_line_before_anything_is_written(tmp_path):
    from click.testing import CliRunner

    from server.cli import main as server_main

    for host in ("", "h" * 300, "bad_host", "-lead.example.com"):
        done = CliRunner().invoke(server_main, ["certs", "--out", str(tmp_path / "pki"), "--host", host])
        assert done.exit_code == 2 and "neither an IP address nor a DNS name" in done.output, done.output
        assert len(done.output.strip().splitlines()) == 1 and not (tmp_path / "pki").exists()
