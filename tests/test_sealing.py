"""The coordinator's sealing: the run key across restarts, and what a reply must carry."""

from __future__ import annotations

import json
import stat
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict

from common import seal
from common.arrays import pack, to_record
from server.sealing import KEY_FILE, Envelope, load_or_create_key, read_signers
from server.updates import UpdateRejected


def test_the_run_key_survives_a_restart_only_encrypted_with_the_state_key(tmp_path):
    key, kept = load_or_create_key(tmp_path, resuming=False, state_key=b"s3cret")
    assert not kept and stat.S_IMODE((tmp_path / KEY_FILE).stat().st_mode) == 0o600
    assert b"ENCRYPTED" in (tmp_path / KEY_FILE).read_bytes()
    again, kept = load_or_create_key(tmp_path, resuming=True, state_key=b"s3cret")
    assert kept and seal.public_bytes(again) == seal.public_bytes(key)
    with pytest.raises(seal.SealError, match="state key"):
        load_or_create_key(tmp_path, resuming=True, state_key=b"wrong")
    # without a state key nothing is written, and a restart gets a new key
    fresh, kept = load_or_create_key(tmp_path, resuming=True, state_key=None)
    assert not kept and not (tmp_path / KEY_FILE).exists() and seal.public_bytes(fresh) != seal.public_bytes(key)


def _reply(content: RecordDict, node: int) -> SimpleNamespace:
    # what Envelope.open reads of a reply (a real Message needs a running Flower task to be built)
    return SimpleNamespace(content=content, metadata=SimpleNamespace(src_node_id=node))


def test_envelope_opens_a_sealed_update_and_rejects_plaintext_or_a_foreign_node(tmp_path):
    key = seal.generate_key()
    envelope = Envelope("run-1", key)
    update = {"w": np.arange(6, dtype=np.float32)}
    blob = seal.seal(pack(update), seal.public_bytes(key), seal.update_context("run-1", 4, 7))
    opened, size = envelope.open(_reply(RecordDict({seal.SEALED_RECORD: ConfigRecord({"update": blob})}), 7), 4)
    assert np.array_equal(opened["w"], update["w"]) and size == len(blob)
    with pytest.raises(UpdateRejected, match="does not open"):
        envelope.open(_reply(RecordDict({seal.SEALED_RECORD: ConfigRecord({"update": blob})}), 8), 4)
    with pytest.raises(UpdateRejected, match="unsealed update"):
        envelope.open(_reply(RecordDict({"update": to_record(update)}), 7), 4)


def test_with_enrolled_signers_an_update_must_be_signed_by_one_merchant_from_one_node(tmp_path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key, shop_a, stranger = seal.generate_key(), Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    registry = tmp_path / "signing.json"
    registry.write_text(json.dumps({"shop-a": seal.signing_public_bytes(shop_a).hex()}))
    envelope = Envelope("run-1", key, signers=read_signers(registry))
    update = {"w": np.ones(4, np.float32)}

    def reply(node: int, signer=None) -> SimpleNamespace:
        context = seal.update_context("run-1", 2, node)
        blob = seal.seal(pack(update), seal.public_bytes(key), context)
        content = RecordDict({seal.SEALED_RECORD: ConfigRecord({"update": blob})})
        if signer is not None:
            content[seal.SIGNATURE_RECORD] = ConfigRecord(
                {"public-key": seal.signing_public_bytes(signer), "signature": seal.sign(signer, blob, context)}
            )
        return _reply(content, node)

    assert np.array_equal(envelope.open(reply(5, shop_a), 2)[0]["w"], update["w"])
    with pytest.raises(UpdateRejected, match="unsigned update"):
        envelope.open(reply(5), 2)
    with pytest.raises(UpdateRejected, match="no enrolled merchant"):
        envelope.open(reply(5, stranger), 2)
    with pytest.raises(UpdateRejected, match="one merchant, one node"):
        envelope.open(reply(6, shop_a), 2)
    forged = reply(5, shop_a)
    forged.content[seal.SIGNATURE_RECORD] = ConfigRecord(
        {"public-key": seal.signing_public_bytes(shop_a), "signature": seal.sign(stranger, b"x", b"y")}
    )
    with pytest.raises(UpdateRejected, match="does not verify"):
        envelope.open(forged, 2)


def test_a_merchant_keeps_one_owner_only_key_in_its_state_folder(tmp_path):
    from client.sealing import KEY_FILE as MERCHANT_KEY_FILE
    from client.sealing import merchant_key

    first = merchant_key(tmp_path)
    assert stat.S_IMODE((tmp_path / MERCHANT_KEY_FILE).stat().st_mode) == 0o600
    assert seal.public_bytes(merchant_key(tmp_path)) == seal.public_bytes(first)
    (tmp_path / MERCHANT_KEY_FILE).write_bytes(b"garbage")
    with pytest.raises(seal.SealError, match="delete it"):
        merchant_key(tmp_path)
