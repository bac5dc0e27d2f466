"""Keyed pseudonyms for what silorec keeps per user at rest: HMAC-SHA256 of the user id under a secret of the silo.

Per-user outputs (the ranks a run keeps for paired comparisons) name users by
pseudonym, never by id. The secret is made on first use in the silo's state
folder (mode 0600), so the runs of one silo pair up with each other while
their files, read anywhere else, name nobody.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

from common.silo import STATE_DIR

KEY_FILE = "pseudonym.key"


def key_for(silo_dir: Path) -> bytes:
    """The pseudonym key of the silo in `silo_dir` (SILO/.silorec-state/pseudonym.key), made on first use."""
    path = Path(silo_dir) / STATE_DIR / KEY_FILE
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:  # exclusive: two processes making the key at once keep the first one's
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(32))
                f.flush()
                os.fsync(f.fileno())
    key = path.read_bytes()
    if len(key) != 32:
        raise ValueError(f"{path}: not a pseudonym key (32 bytes); remove it to make a new one")
    return key


def pseudonym(key: bytes, user_id: str) -> str:
    """The user's pseudonym: the first 20 hex digits (80 bits) of HMAC-SHA256(key, id)."""
    return hmac.new(key, str(user_id).encode(), hashlib.sha256).hexdigest()[:20]


def pseudonyms(key: bytes, user_ids: Iterable[str]) -> list[str]:
    return [pseudonym(key, u) for u in user_ids]
