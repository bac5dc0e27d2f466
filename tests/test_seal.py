"""Sealing updates: a round trip, and every way a sealed message must fail to open."""

from __future__ import annotations

import numpy as np
import pytest

from common import seal
from common.arrays import pack, unpack

AD = seal.update_context("run-a", 3, 17)


@pytest.fixture(scope="module")
def key():
    return seal.generate_key()


@pytest.fixture(scope="module")
def sealed(key) -> bytes:
    return seal.seal(b"the adapter update", seal.public_bytes(key), AD)


def test_round_trip_and_the_ciphertext_hides_the_update(key):
    update = {
        "a.lora_A.weight": np.arange(96, dtype=np.float32).reshape(8, 12),
        "a.lora_B.weight": np.ones((12, 8), np.float32),
    }
    payload = pack(update)
    blob = seal.seal(payload, seal.public_bytes(key), AD)
    assert len(blob) == len(payload) + seal.HEADER_BYTES + seal.TAG_BYTES
    assert update["a.lora_A.weight"].tobytes()[:64] not in blob
    opened = unpack(seal.open(blob, key, AD))
    assert sorted(opened) == sorted(update) and all(np.array_equal(opened[k], update[k]) for k in update)
    # a fresh ephemeral key and nonce every time: the same update never seals to the same bytes
    assert seal.seal(payload, seal.public_bytes(key), AD) != blob


def test_wrong_key_fails(sealed):
    with pytest.raises(seal.OpenError):
        seal.open(sealed, seal.generate_key(), AD)


def test_every_flipped_bit_fails(key, sealed):
    for i in range(len(sealed)):
        for bit in (0, 7):
            flipped = bytearray(sealed)
            flipped[i] ^= 1 << bit
            with pytest.raises(seal.SealError):
                seal.open(bytes(flipped), key, AD)


def test_a_flipped_version_byte_is_reported_as_an_unknown_version(key, sealed):
    other = bytearray(sealed)
    other[len(seal.MAGIC)] = seal.VERSION + 1
    with pytest.raises(seal.UnknownVersionError, match="version 2"):
        seal.open(bytes(other), key, AD)


@pytest.mark.parametrize("keep", [0, 10, seal.HEADER_BYTES, seal.HEADER_BYTES + seal.TAG_BYTES, -1])
def test_truncated_fails(key, sealed, keep):
    with pytest.raises(seal.SealError):
        seal.open(sealed[:keep], key, AD)


@pytest.mark.parametrize(
    "context",
    [
        seal.update_context("run-a", 2, 17),  # replayed from another round
        seal.update_context("run-a", 3, 18),  # passed off as another node's
        seal.update_context("run-b", 3, 17),  # from another run
        seal.update_context("run-a", 3, 17, kind="evaluate"),  # another kind of message
    ],
)
def test_associated_data_of_another_round_node_run_or_kind_fails(key, sealed, context):
    with pytest.raises(seal.OpenError, match="another run, round, node"):
        seal.open(sealed, key, context)


def test_private_key_at_rest_is_encrypted_and_needs_its_passphrase(key):
    pem = seal.save_private_key(key, b"operator secret")
    assert b"ENCRYPTED" in pem
    assert seal.public_bytes(seal.load_private_key(pem, b"operator secret")) == seal.public_bytes(key)
    with pytest.raises(seal.SealError, match="state key"):
        seal.load_private_key(pem, b"wrong")
    with pytest.raises(ValueError):
        seal.save_private_key(key, b"")


def test_unpack_rejects_garbage():
    with pytest.raises(ValueError, match="safetensors"):
        unpack(b"\xff" * 40)


def test_a_signature_binds_the_sealed_bytes_and_their_context(sealed):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    public = seal.signing_public_bytes(key)
    signature = seal.sign(key, sealed, AD)
    seal.verify(public, signature, sealed, AD)
    with pytest.raises(seal.SignatureError):
        seal.verify(public, signature, sealed[:-1] + bytes([sealed[-1] ^ 1]), AD)
    with pytest.raises(seal.SignatureError):
        seal.verify(public, signature, sealed, seal.update_context("run-a", 4, 17))
    with pytest.raises(seal.SignatureError):
        seal.verify(seal.signing_public_bytes(Ed25519PrivateKey.generate()), signature, sealed, AD)
