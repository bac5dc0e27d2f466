"""What leaves a silo, on the record: every message a merchant sends, kept byte for byte where asked, and a scan of
those bytes for the silo's users and interactions.

A merchant (or a test) sets SILOREC_RECORD_OUTGOING to a folder, or starts its
node with `silorec-client start --record-outgoing DIR`: `record_outgoing_mod`,
the ClientApp's outermost mod, then writes each reply as Flower serialises it
(its protobuf: content, metadata, error), after SecAgg+'s masking and the
sealing. `scan` searches those bytes for every user id of the silo and every
interaction as the silo's file stores it, and lists any tensor that travels
in the clear (a float array in an ArrayRecord). An auditor can run it on what
a node really sent, without trusting the code that sent it.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage

from common import atomic

RECORD_ENV = "SILOREC_RECORD_OUTGOING"
SUFFIX = ".msg"


def record_outgoing_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Pass `msg` on; if $SILOREC_RECORD_OUTGOING names a folder, write the reply's serialised bytes there."""
    reply = call_next(msg, context)
    folder = os.environ.get(RECORD_ENV)
    if folder:
        name = f"{context.node_id}-{msg.metadata.message_type}-{msg.metadata.group_id or '-'}-{secrets.token_hex(4)}"
        atomic.write_bytes(Path(folder) / (name.replace("/", "_") + SUFFIX), serialise(reply))
    return reply


def serialise(message: Message) -> bytes:
    return message_to_proto(message).SerializeToString()


@dataclass
class Scan:
    """What a scan of recorded messages found."""

    messages: int = 0
    bytes: int = 0
    users: int = 0  # user ids searched for
    interactions: int = 0  # interactions searched for, each as a line of the silo's interactions file
    found: list[str] = field(default_factory=list)  # "<message>: <what>", one per hit
    tensors: list[str] = field(default_factory=list)  # "<message>: <record>/<array> <dtype> <shape>"

    @property
    def clean(self) -> bool:
        return not self.found and not self.tensors

    def line(self) -> str:
        verdict = "clean" if self.clean else f"{len(self.found)} identifiers and {len(self.tensors)} tensors found"
        return (
            f"{self.messages} messages, {self.bytes:,} bytes; searched for {self.users} user ids and "
            f"{self.interactions} interactions: {verdict}"
        )


def needles(silo_dir: Path) -> tuple[list[bytes], list[bytes]]:
    """The silo's user ids and its interactions, as bytes, the way its files store them."""
    from common.silo import load_silo  # pandas: only a scan needs it, never the mod

    silo = load_silo(silo_dir)
    users = sorted({str(u) for u in silo.interactions["user_id"]})
    path = Path(silo_dir) / "interactions.csv"
    if path.is_file():
        lines = path.read_bytes().splitlines()[1:]  # the header names columns, not a user
    else:  # a Parquet silo: each interaction as the CSV line it would be
        frame = silo.interactions[["user_id", "item_id", "timestamp"]].astype(str)
        lines = [",".join(row).encode() for row in frame.itertuples(index=False)]
    return [u.encode() for u in users], [line.strip() for line in lines if line.strip()]


def clear_tensors(message: Message) -> list[str]:
    """The float arrays a message carries in the clear: what a plaintext update would be."""
    out = []
    if not message.has_content():
        return out
    for record_name, record in message.content.array_records.items():
        for array_name, array in record.items():
            values = array.numpy()
            if np.issubdtype(values.dtype, np.floating) and values.size:
                out.append(f"{record_name}/{array_name} {values.dtype} {tuple(values.shape)}")
    return out


def hits(data: bytes, needles: Iterable[bytes]) -> list[bytes]:
    """The `needles` that occur in `data`."""
    return [needle for needle in needles if needle in data]


def scan(files: Iterable[Path], silos: Sequence[Path]) -> Scan:
    """Search the recorded messages `files` for the users and interactions of `silos`, and for clear tensors."""
    users, interactions = [], []
    for silo in silos:
        u, i = needles(silo)
        users += u
        interactions += i
    result = Scan(users=len(users), interactions=len(interactions))
    searched = users + interactions
    for path in sorted(files):
        data = Path(path).read_bytes()
        result.messages += 1
        result.bytes += len(data)
        result.found += [f"{Path(path).name}: {n.decode(errors='replace')!r}" for n in hits(data, searched)]
        proto = ProtoMessage()
        proto.ParseFromString(data)
        result.tensors += [f"{Path(path).name}: {t}" for t in clear_tensors(message_from_proto(proto))]
    return result


def recorded(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob(f"*{SUFFIX}"))
