"""The coordinator's side of sealed updates: the run's key pair and opening merchants' replies.

Each run has its own X25519 key pair. The public key travels in every train
message; the private key stays in the ServerApp's process. To survive a
`--resume` it is written to the checkpoint only encrypted, with the
operator's state key; without one it is never written, and a resumed run
gets a new key pair and a new run id (so nothing sealed for the old run
opens in the new one).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from flwr.app import ConfigRecord, Message

from common import atomic, seal
from common.arrays import from_record, unpack
from server.updates import UpdateRejected

KEY_FILE = "seal-key.pem"
STATE_KEY_ENV = "SILOREC_STATE_KEY"


def load_or_create_key(ckpt_dir: Path, *, resuming: bool, state_key: bytes | None) -> tuple[X25519PrivateKey, bool]:
    """The run's private key and whether it is the one the run started with (False: a new one)."""
    path = Path(ckpt_dir) / KEY_FILE
    if resuming and state_key and path.is_file():
        return seal.load_private_key(path.read_bytes(), state_key), True
    key = seal.generate_key()
    if state_key:
        atomic.write_bytes(path, seal.save_private_key(key, state_key))
        os.chmod(path, 0o600)
    else:
        path.unlink(missing_ok=True)  # a key of an earlier start that nothing could decrypt now
    return key, False


@dataclass
class Envelope:
    """How updates travel in this run: sealed to `key` (the default) or, if `key` is None, in the clear."""

    run_id: str
    key: X25519PrivateKey | None
    open_seconds: float = 0.0  # time spent opening this round's updates (the cost of sealing, server side)

    def train_record(self) -> ConfigRecord | None:
        """What a train message carries so that the merchant can seal its reply."""
        if self.key is None:
            return None
        return ConfigRecord({"public-key": seal.public_bytes(self.key), "version": seal.VERSION})

    def has_update(self, reply: Message) -> bool:
        return seal.SEALED_RECORD in reply.content.config_records or "update" in reply.content.array_records

    def open(self, reply: Message, server_round: int) -> tuple[dict[str, np.ndarray], int]:
        """The update in `reply` and its size on the wire; UpdateRejected if it cannot be trusted."""
        sealed = reply.content.config_records.get(seal.SEALED_RECORD)
        if self.key is None:
            if sealed is not None:
                raise UpdateRejected("sealed update in a run without sealing")
            update = from_record(reply.content["update"])
            return update, int(sum(a.nbytes for a in update.values()))
        if sealed is None:
            raise UpdateRejected("unsealed update: this run accepts only updates sealed to its key")
        blob = bytes(sealed["update"])
        context = seal.update_context(self.run_id, server_round, reply.metadata.src_node_id)
        t0 = time.perf_counter()
        try:
            payload = seal.open(blob, self.key, context)
        except seal.SealError as e:
            raise UpdateRejected(f"sealed update does not open ({type(e).__name__}): {e}") from None
        finally:
            self.open_seconds += time.perf_counter() - t0
        try:
            return unpack(payload), len(blob)
        except ValueError as e:
            raise UpdateRejected(f"sealed update holds no tensors: {e}") from None
