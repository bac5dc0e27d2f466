"""A merchant's side of sealing: its own key pair, opening the global adapter, sealing its update.

The coordinator seals the global adapter to each merchant's public key, and
the merchant seals its update to the run's public key, so the relay between
them (Flower's SuperLink) only ever holds ciphertext. The merchant's key pair
lives in its state folder, beside the ledger, readable by the merchant alone.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from flwr.app import ConfigRecord, Message

from common import atomic, seal
from common.arrays import from_record, pack, unpack

if TYPE_CHECKING:
    from common.round import RoundConfig

KEY_FILE = "seal-key.pem"


def merchant_key(state_dir: Path) -> X25519PrivateKey:
    """This merchant's X25519 key, made on first use (mode 0600 in its state folder)."""
    path = Path(state_dir) / KEY_FILE
    if not path.is_file():
        key = seal.generate_key()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        atomic.write_bytes(path, pem)
        os.chmod(path, 0o600)
    try:
        return seal.load_private_key(path.read_bytes(), None)
    except seal.SealError as e:
        raise seal.SealError(f"{path}: {e}; delete it and a new one is made") from None


def key_record(key: X25519PrivateKey) -> ConfigRecord:
    """What a merchant tells the coordinator so it can seal the global adapter to it."""
    return ConfigRecord({"public-key": seal.public_bytes(key), "version": seal.VERSION})


def global_arrays(msg: Message, cfg: RoundConfig, node_id: int, key: X25519PrivateKey) -> dict[str, np.ndarray]:
    """The global adapter of a train or evaluate message: opened if sealed, as sent if not."""
    sealed = msg.content.config_records.get(seal.SEALED_GLOBAL_RECORD)
    if sealed is None:
        return from_record(msg.content["arrays"])
    context = seal.update_context(cfg.run_id, cfg.round, node_id, kind=f"global-{msg.metadata.message_type}")
    return unpack(seal.open(bytes(sealed["arrays"]), key, context))


def open_global(
    blob: bytes, cfg: RoundConfig, node_id: int, key: X25519PrivateKey, *, kind: str
) -> dict[str, np.ndarray]:
    """A global adapter sealed to this merchant outside a Message-API message (a SecAgg+ fit config)."""
    return unpack(seal.open(blob, key, seal.update_context(cfg.run_id, cfg.round, node_id, kind=kind)))


def seal_update(
    update: dict[str, np.ndarray],
    msg: Message,
    cfg: RoundConfig,
    node_id: int,
    signing_key: Ed25519PrivateKey | None = None,
    *,
    kind: str = "train-update",
) -> tuple[dict[str, ConfigRecord], float]:
    """The reply records of the update sealed to the run's public key (sent in `msg`), and the seconds sealing took.

    With `signing_key` (the merchant's enrolled Ed25519 key) the sealed bytes
    are also signed. `kind` names what is sealed in its associated data (a
    train update, or a popularity table).
    """
    t0 = time.perf_counter()
    context = seal.update_context(cfg.run_id, cfg.round, node_id, kind=kind)
    blob = seal.seal(pack(update), bytes(msg.content[seal.KEY_RECORD]["public-key"]), context)
    records = {seal.SEALED_RECORD: ConfigRecord({"update": blob})}
    if signing_key is not None:
        records[seal.SIGNATURE_RECORD] = ConfigRecord(
            {"public-key": seal.signing_public_bytes(signing_key), "signature": seal.sign(signing_key, blob, context)}
        )
    return records, time.perf_counter() - t0


def signing_key(path: str | Path | None) -> Ed25519PrivateKey | None:
    """The merchant's enrolled Ed25519 signing key (node config `signing-key`), if it has one."""
    if not path:
        return None
    try:
        return seal.load_signing_key(Path(str(path)).read_bytes())
    except OSError as e:
        raise seal.SignatureError(f"signing-key {path}: {e.strerror}") from None
