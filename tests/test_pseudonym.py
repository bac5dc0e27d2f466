from __future__ import annotations

import hashlib
import hmac
import stat

from common.pseudonym import KEY_FILE, STATE_DIR, key_for, pseudonym, pseudonyms


def test_a_silo_gets_one_private_key_and_stable_pseudonyms(tmp_path):
    key = key_for(tmp_path / "a")
    path = tmp_path / "a" / STATE_DIR / KEY_FILE
    assert len(key) == 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert key_for(tmp_path / "a") == key  # made once, then read
    assert key_for(tmp_path / "b") != key
    assert pseudonym(key, "196") == hmac.new(key, b"196", hashlib.sha256).hexdigest()[:20]
    assert pseudonyms(key, ["196", "197"]) == [pseudonym(key, "196"), pseudonym(key, "197")]
    assert pseudonym(key, "196") != pseudonym(key_for(tmp_path / "b"), "196")
