"""MovieLens-100k demo data, taken from the RecBole wheel on PyPI and checked against pinned sums.

The package registry is the only place these machines may download from, and
`recbole==1.2.1` ships ML-100k as RecBole atomic files. The wheel is fetched
with `pip download --no-deps` (recbole itself is never installed), its three
files are checked against SHA-256 sums pinned here, and they are converted
into a silo folder.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

from common import atomic
from common.errors import DataFetchError
from common.silo import Silo, load_silo, write_silo
from common.summary import summarize

WHEEL_REQUIREMENT = "recbole==1.2.1"
WHEEL_NAME = "recbole-1.2.1-py3-none-any.whl"
MEMBER_DIR = "recbole/dataset_example/ml-100k/"
CHECKSUMS: Mapping[str, str] = {
    "ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
    "ml-100k.user": "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
}
SOURCE = f"{WHEEL_REQUIREMENT}:{MEMBER_DIR}"


def download_wheel(cache: Path) -> Path:
    """The RecBole wheel in `cache`, downloaded with pip if it is not there yet."""
    wheel = cache / WHEEL_NAME
    if wheel.is_file():
        return wheel
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", WHEEL_REQUIREMENT, "-d", str(cache)]
    result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0 or not wheel.is_file():
        tail = result.stdout.strip().splitlines()[-1:] or ["no output"]
        raise DataFetchError(f"`pip download {WHEEL_REQUIREMENT}` failed ({tail[0]}); check access to the package index or pass --wheel")
    return wheel


def extract_verified(wheel: Path, dest: Path, checksums: Mapping[str, str] = CHECKSUMS) -> None:
    """Copy the data set's files out of `wheel` into `dest`, refusing any whose SHA-256 differs."""
    try:
        with zipfile.ZipFile(wheel) as z:
            for name, expected in checksums.items():
                try:
                    data = z.read(MEMBER_DIR + name)
                except KeyError:
                    raise DataFetchError(f"{wheel}: has no {MEMBER_DIR + name}; is it the {WHEEL_REQUIREMENT} wheel?") from None
                actual = hashlib.sha256(data).hexdigest()
                if actual != expected:
                    raise DataFetchError(
                        f"{wheel}: {name} has SHA-256 {actual}, expected {expected}; "
                        "delete the cached wheel and fetch again"
                    )
                (dest / name).write_bytes(data)
    except zipfile.BadZipFile:
        raise DataFetchError(f"{wheel}: not a wheel (bad zip); delete it and fetch again") from None


def to_demo_silo(raw: Silo) -> tuple:
    """ML-100k atomic frames → silo frames: titles carry the year, genres become the category."""
    items = raw.items.copy()
    year = items.get("release_year", "")
    items["title"] = [f"{t} ({y})" if y else t for t, y in zip(items["title"], year)]
    items = items.rename(columns={"release_year": "year"})
    return items, raw.interactions, raw.users


def fetch_movielens_100k(
    out: Path,
    *,
    cache: Path,
    wheel: Path | None = None,
    force: bool = False,
    checksums: Mapping[str, str] = CHECKSUMS,
) -> Path:
    """Write the ML-100k silo to `out` (skipped if a verified copy is already there)."""
    meta_path = out / "silo.json"
    if meta_path.is_file() and not force and _already_fetched(meta_path, checksums):
        return out
    wheel = wheel or download_wheel(cache)
    with tempfile.TemporaryDirectory() as tmp:
        extract_verified(wheel, Path(tmp), checksums)
        raw = load_silo(tmp)
    items, interactions, users = to_demo_silo(raw)
    with atomic.directory(out, replace=True) as scratch:
        write_silo(scratch, items, interactions, users)
        s = summarize(load_silo(scratch))
        atomic.write_json(
            scratch / "silo.json",
            {"name": out.name, "users": s.users, "items": s.items, "interactions": s.interactions,
             "source": SOURCE, "sha256": dict(checksums)},
        )
    return out


def _already_fetched(meta_path: Path, checksums: Mapping[str, str]) -> bool:
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return False
    return meta.get("source") == SOURCE and meta.get("sha256") == dict(checksums)
