"""Sealed updates: a merchant encrypts its update to the coordinator's key for the run.

seal = ephemeral X25519 key agreement with the recipient's public key,
HKDF-SHA256 (fixed context label) to an AES-256-GCM key, one encryption.
The sealed bytes are

    magic "SLRS" | version (1 byte) | ephemeral public key (32) | nonce (12) | ciphertext + tag (16)

and the header is authenticated together with the caller's associated data,
which names the run, round, node and message kind (`update_context`): an
update replayed into another round, or passed off as another node's, does
not open. A merchant may also sign what it sealed with an Ed25519 key that
the coordinator knows from enrolment. Only vetted primitives from
`cryptography`; nothing home-made.
"""

from __future__ import annotations

import json
import os

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from common.errors import SilorecError

MAGIC = b"SLRS"
VERSION = 1
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
HEADER_BYTES = len(MAGIC) + 1 + KEY_BYTES + NONCE_BYTES
CONTEXT_LABEL = b"silorec sealed update v1: X25519-HKDF-SHA256-AES-256-GCM"
# Where sealing shows in Flower messages (ConfigRecords):
KEY_RECORD = "seal"  # a public key: the run's (train message) or a merchant's (query reply)
SEALED_RECORD = "sealed"  # a train reply's sealed update
SEALED_GLOBAL_RECORD = "sealed-global"  # a train or evaluate message's global adapter, sealed to the merchant


class SealError(SilorecError):
    """A sealed message could not be opened."""


class NotSealedError(SealError):
    """The bytes do not start like a sealed message (or are shorter than its header and tag)."""


class UnknownVersionError(SealError):
    """Sealed with a format version this silorec does not know."""


class OpenError(SealError):
    """Authentication failed: wrong key, altered bytes, or associated data of another run, round, node or kind."""


def update_context(run_id: str, round: int, node_id: int, kind: str = "train-update") -> bytes:
    """The associated data that binds a sealed message to where it belongs (canonical JSON)."""
    return json.dumps(
        {"kind": kind, "node": int(node_id), "round": int(round), "run": str(run_id)},
        sort_keys=True,
        separators=(",", ":"),
    ).encode()


def generate_key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def public_bytes(key: X25519PrivateKey) -> bytes:
    """The raw 32-byte public key, as it travels in a train message."""
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def seal(plaintext: bytes, recipient_public_key: bytes, associated_data: bytes) -> bytes:
    """Encrypt `plaintext` so that only the holder of the recipient's private key can open it."""
    recipient = X25519PublicKey.from_public_bytes(bytes(recipient_public_key))
    ephemeral = X25519PrivateKey.generate()
    ephemeral_public = public_bytes(ephemeral)
    key = _derive(ephemeral.exchange(recipient), ephemeral_public, bytes(recipient_public_key))
    header = MAGIC + bytes([VERSION]) + ephemeral_public + os.urandom(NONCE_BYTES)
    return header + AESGCM(key).encrypt(header[-NONCE_BYTES:], plaintext, header + associated_data)


def open(sealed: bytes, private_key: X25519PrivateKey, associated_data: bytes) -> bytes:  # noqa: A001 - seal/open pair
    """The plaintext of `sealed`; raises a SealError subclass if it is not authentic for `associated_data`."""
    sealed = bytes(sealed)
    if len(sealed) < HEADER_BYTES + TAG_BYTES or not sealed.startswith(MAGIC):
        raise NotSealedError(f"not a sealed silorec message ({len(sealed)} bytes)")
    version = sealed[len(MAGIC)]
    if version != VERSION:
        raise UnknownVersionError(
            f"sealed with format version {version}; this silorec opens version {VERSION} — upgrade it"
        )
    header, body = sealed[:HEADER_BYTES], sealed[HEADER_BYTES:]
    ephemeral_public = header[len(MAGIC) + 1 : len(MAGIC) + 1 + KEY_BYTES]
    try:
        shared = private_key.exchange(X25519PublicKey.from_public_bytes(ephemeral_public))
    except ValueError:  # an all-zero shared secret: a low-order point, never made by `seal`
        raise OpenError("the sealed message's ephemeral key is invalid") from None
    key = _derive(shared, ephemeral_public, public_bytes(private_key))
    try:
        return AESGCM(key).decrypt(header[-NONCE_BYTES:], body, header + associated_data)
    except InvalidTag:
        raise OpenError(
            "the sealed message does not authenticate: wrong key, altered or truncated bytes, "
            "or sealed for another run, round, node or message kind"
        ) from None


def _derive(shared_secret: bytes, ephemeral_public: bytes, recipient_public: bytes) -> bytes:
    # Both public keys go into the KDF input so the key is bound to this exchange, as in HPKE/ECIES.
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=ephemeral_public + recipient_public, info=CONTEXT_LABEL
    ).derive(shared_secret)


def save_private_key(key: X25519PrivateKey, passphrase: bytes) -> bytes:
    """The private key as PKCS#8 PEM, encrypted with `passphrase` (cryptography's best available scheme)."""
    if not passphrase:
        raise ValueError("a private key is only written encrypted: give a non-empty passphrase")
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(passphrase)
    )


def load_private_key(pem: bytes, passphrase: bytes | None) -> X25519PrivateKey:
    """Inverse of `save_private_key` (or an unencrypted PEM with `passphrase` None); a wrong passphrase raises SealError."""
    hint = " — is the state key the one the run started with?" if passphrase else ""
    return _load_pem(pem, passphrase, X25519PrivateKey, SealError, "the sealing key", hint)


def _load_pem(pem: bytes, password: bytes | None, expected: type, error: type[SealError], what: str, hint: str = ""):
    try:
        key = serialization.load_pem_private_key(pem, password=password)
    except (ValueError, TypeError) as e:
        raise error(f"cannot read {what}: {e}{hint}") from None
    if not isinstance(key, expected):
        raise error(f"{what} is not a {expected.__name__.removesuffix('PrivateKey')} key")
    return key


# --- signatures: which enrolled merchant sealed an update --------------------------------

SIGNATURE_RECORD = "signature"  # a train reply's Ed25519 signature over the sealed update
SIGNATURE_LABEL = b"silorec signed update v1\0"


class SignatureError(SealError):
    """An update's signature is missing, malformed, or not by the key it names."""


def sign(key: Ed25519PrivateKey, sealed: bytes, associated_data: bytes) -> bytes:
    """An Ed25519 signature over the sealed bytes and their associated data."""
    return key.sign(SIGNATURE_LABEL + len(associated_data).to_bytes(4, "big") + associated_data + sealed)


def verify(public_key: bytes, signature: bytes, sealed: bytes, associated_data: bytes) -> None:
    """Raise SignatureError unless `signature` is `public_key`'s over `sealed` and `associated_data`."""
    try:
        Ed25519PublicKey.from_public_bytes(bytes(public_key)).verify(
            bytes(signature),
            SIGNATURE_LABEL + len(associated_data).to_bytes(4, "big") + associated_data + bytes(sealed),
        )
    except (InvalidSignature, ValueError):
        raise SignatureError("the update's signature does not verify with the merchant's enrolled key") from None


def signing_public_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_signing_key(pem: bytes) -> Ed25519PrivateKey:
    """A merchant's Ed25519 signing key from its (unencrypted) PKCS#8 PEM file."""
    return _load_pem(pem, None, Ed25519PrivateKey, SignatureError, "the signing key")
