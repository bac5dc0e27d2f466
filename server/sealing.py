"""The coordinator's side of sealed updates: the run's key pair and opening merchants' replies.

Each run has its own X25519 key pair. The public key travels in every train
message; the private key stays in the ServerApp's process. To survive a
`--resume` it is written to the checkpoint only encrypted, with the
operator's state key; without one it is never written, and a resumed run
gets a new key pair and a new run id (so nothing sealed for the old run
opens in the new one).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import WARNING
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from common import atomic, seal
from common.arrays import from_record, pack, unpack
from common.errors import SilorecError
from common.logs import log
from server.settings import ServerSettings
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


def envelope_for(
    settings: ServerSettings, ckpt_dir: Path, resumed_run: str | None, *, state_key: bytes | None
) -> Envelope:
    """This run's envelope: its key pair (kept across a resume when the state key allows) and its run id."""
    run_id = resumed_run or uuid.uuid4().hex[:12]
    if not settings.seal_updates:
        if settings.signing_keys:
            raise SilorecError("signing-keys needs seal-updates = true: merchants sign the sealed update")
        log(WARNING, "sealing is OFF (seal-updates = false): updates travel and are stored in the clear")
        return Envelope(run_id, None)
    key, kept = load_or_create_key(ckpt_dir, resuming=resumed_run is not None, state_key=state_key)
    if resumed_run is not None and not kept:
        run_id = uuid.uuid4().hex[:12]  # nothing sealed for the old run must open in this one
        log(
            WARNING,
            "no state key to recover run %s's sealing key: continuing as run %s with a new key pair "
            "(set %s to keep the key across restarts)",
            resumed_run,
            run_id,
            STATE_KEY_ENV,
        )
    signers = read_signers(Path(settings.signing_keys)) if settings.signing_keys else None
    return Envelope(run_id, key, signers=signers)


@dataclass
class Envelope:
    """How adapters travel in this run: sealed (the default) or, if `key` is None, in the clear.

    Sealed, the global adapter goes to each merchant sealed to that merchant's
    public key (asked for once with a query message), and each merchant's
    update comes back sealed to the run's key `key`. With `signers` (the
    enrolled merchants' Ed25519 keys), every update must also be signed by one
    of them, and a merchant signs from one node only.
    """

    run_id: str
    key: X25519PrivateKey | None
    merchant_keys: dict[int, bytes] = field(default_factory=dict)  # node id → the merchant's public key
    signers: dict[bytes, str] | None = None  # enrolled Ed25519 public key → merchant; None: signatures not required
    signed_by: dict[int, str] = field(default_factory=dict)  # node id → the merchant whose key signed its updates
    open_seconds: float = 0.0  # time spent opening updates since the last reset (the server's cost of sealing)
    global_seal_seconds: float = 0.0  # time spent sealing the global adapter to merchants since the last reset

    def seal_messages(
        self, grid: Grid, messages: Iterable[Message], server_round: int, config: ConfigRecord
    ) -> list[Message]:
        """`messages` with their global adapter sealed to each merchant; a merchant with no key is left out."""
        messages = list(messages)
        if self.key is None:
            return messages
        self.ensure_keys(grid, [m.metadata.dst_node_id for m in messages], config)
        run_key = self.key_records()[seal.KEY_RECORD]
        payloads: dict[int, bytes] = {}  # serialised once per distinct adapter (a strategy sends one to all)
        sealed = []
        for message in messages:
            node = message.metadata.dst_node_id
            public = self.merchant_keys.get(node)
            if public is None:
                log(
                    WARNING,
                    "round %d: node %d gave no sealing key; it is left out (nothing is sent in the clear)",
                    server_round,
                    node,
                )
                continue
            arrays = message.content["arrays"]
            kind = message.metadata.message_type
            t0 = time.perf_counter()  # serialising counts too, as it does in the merchant's seal time
            if id(arrays) not in payloads:
                payloads[id(arrays)] = pack(from_record(arrays))
            payload = payloads[id(arrays)]
            blob = seal.seal(
                payload, public, seal.update_context(self.run_id, server_round, node, kind=f"global-{kind}")
            )
            self.global_seal_seconds += time.perf_counter() - t0
            # a fresh RecordDict: Flower's strategies share one content object among all their messages
            content = RecordDict(
                {
                    **dict(message.content.config_records),  # the round config, and any ask beside it
                    seal.SEALED_GLOBAL_RECORD: ConfigRecord({"arrays": blob}),
                    seal.KEY_RECORD: run_key,
                }
            )
            sealed.append(Message(content, dst_node_id=node, message_type=kind, group_id=message.metadata.group_id))
        return sealed

    def ensure_keys(self, grid: Grid, nodes: Iterable[int], config: ConfigRecord) -> None:
        """Ask every merchant of `nodes` whose sealing key this run does not know yet for it (one query each)."""
        unknown = sorted(set(nodes) - set(self.merchant_keys))
        if not unknown or self.key is None:
            return
        asks = [Message(RecordDict({"config": config}), dst_node_id=n, message_type=MessageType.QUERY) for n in unknown]
        for reply in grid.send_and_receive(asks):
            record = None if reply.has_error() else reply.content.config_records.get(seal.KEY_RECORD)
            if record is not None and len(bytes(record["public-key"])) == seal.KEY_BYTES:
                self.merchant_keys[reply.metadata.src_node_id] = bytes(record["public-key"])

    def has_update(self, reply: Message) -> bool:
        return seal.SEALED_RECORD in reply.content.config_records or "update" in reply.content.array_records

    def key_records(self) -> dict[str, ConfigRecord]:
        """The records that give a message the run's public key (none when the run does not seal)."""
        if self.key is None:
            return {}
        return {seal.KEY_RECORD: ConfigRecord({"public-key": seal.public_bytes(self.key), "version": seal.VERSION})}

    def open(
        self, reply: Message, server_round: int, *, kind: str = "train-update"
    ) -> tuple[dict[str, np.ndarray], int]:
        """The update in `reply` (or what else `kind` names) and its size on the wire; UpdateRejected if it cannot be trusted."""
        sealed = reply.content.config_records.get(seal.SEALED_RECORD)
        if self.key is None:
            if sealed is not None:
                raise UpdateRejected("sealed update in a run without sealing")
            update = from_record(reply.content["update"])
            return update, int(sum(a.nbytes for a in update.values()))
        if sealed is None:
            raise UpdateRejected("unsealed update: this run accepts only updates sealed to its key")
        blob = bytes(sealed["update"])
        node = reply.metadata.src_node_id
        context = seal.update_context(self.run_id, server_round, node, kind=kind)
        if self.signers is not None:
            self._check_signature(reply, node, blob, context)
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

    def _check_signature(self, reply: Message, node: int, blob: bytes, context: bytes) -> None:
        record = reply.content.config_records.get(seal.SIGNATURE_RECORD)
        if record is None:
            raise UpdateRejected("unsigned update: this run accepts only updates signed by an enrolled merchant")
        public = bytes(record["public-key"])
        merchant = self.signers.get(public) if self.signers is not None else None
        if merchant is None:
            raise UpdateRejected("update signed by a key that no enrolled merchant holds")
        try:
            seal.verify(public, bytes(record["signature"]), blob, context)
        except seal.SignatureError as e:
            raise UpdateRejected(f"{e} ({merchant})") from None
        holder = next((n for n, m in self.signed_by.items() if m == merchant and n != node), None)
        if holder is not None:
            raise UpdateRejected(f"{merchant}'s key already signs for node {holder}; one merchant, one node")
        self.signed_by[node] = merchant


def read_signers(path: Path) -> dict[bytes, str]:
    """The enrolled merchants' signing keys (signing.json of `silorec-server enroll`): public key → merchant."""
    try:
        registry = json.loads(Path(path).read_text())
        signers = {bytes.fromhex(public): merchant for merchant, public in registry.items()}
    except (OSError, ValueError, AttributeError, TypeError) as e:
        raise SilorecError(
            f"signing-keys {path}: not a readable merchant → Ed25519 public key registry ({e})"
        ) from None
    if any(len(k) != 32 for k in signers):
        raise SilorecError(f"signing-keys {path}: every key must be 32 bytes (hex); re-enroll the merchants")
    return signers
