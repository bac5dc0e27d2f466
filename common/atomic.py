"""Atomic writes, and folders only their maker may replace: a reader sees the old file or the new one, never half
of either, and no command deletes what it did not make.

Every output folder a silorec command writes carries a small marker
(MARKER: which command made it, and silorec's version). `--force` replaces a
folder only if it carries one; an output may neither be, hold nor lie inside
one of its command's inputs.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from common.errors import SilorecError

MARKER = ".silorec-output"  # JSON: the command that made the folder and silorec's version


class OutputError(SilorecError):
    """An output folder that the command may not write or replace."""


def mark(folder: Path, made_by: str) -> None:
    """Say in `folder` that `made_by` (a silorec command) made it, so that a later --force may replace it."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = version("silorec")
    except PackageNotFoundError:  # run from a checkout that was never installed
        release = "unknown"
    write_json(Path(folder) / MARKER, {"made_by": made_by, "version": release})


def is_ours(folder: Path) -> bool:
    """Whether silorec made `folder` (it carries the marker)."""
    return (Path(folder) / MARKER).is_file()


def check_replaceable(folder: Path) -> None:
    """OutputError unless `folder` is absent, empty, or made by silorec: nothing else may be replaced or deleted."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(
            f"{folder} is a file, not an output folder silorec made: refusing to replace it; choose another --out"
        )
    if folder.is_dir() and any(folder.iterdir()) and not is_ours(folder):
        raise OutputError(
            f"{folder} holds files silorec did not write (no {MARKER}): refusing to replace or delete it; "
            "choose another --out"
        )


def remove_ours(folder: Path) -> None:
    """Delete `folder` if silorec made it (OutputError otherwise; nothing to do if it is absent)."""
    check_replaceable(folder)
    if Path(folder).exists():
        shutil.rmtree(folder)


def start_folder(out: Path, made_by: str, *, force: bool = False) -> None:
    """Make `out` a fresh output folder of `made_by`: FileExistsError if it holds anything, unless `force`, which
    deletes it first if silorec made it (OutputError otherwise)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not force:
            raise FileExistsError(f"{out} is not empty; choose another --out or pass --force to replace it")
        remove_ours(out)
    out.mkdir(parents=True, exist_ok=True)
    mark(out, made_by)


def check_apart(out: Path, inputs: dict[str, Path]) -> None:
    """OutputError if the output `out` is, holds or lies inside one of the `inputs` (option name → path)."""
    where = Path(out).resolve()
    for name, path in inputs.items():
        source = Path(path).resolve()
        if where == source:
            relation = "the same folder as"
        elif source in where.parents:
            relation = "inside"
        elif where in source.parents:
            relation = "a folder holding"
        else:
            continue
        raise OutputError(f"the output {out} is {relation} {name} {path}: an output must be apart from every input")


def write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a synced temporary file renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_json(path: Path, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically."""
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


@contextmanager
def directory(path: Path, *, replace: bool = False, made_by: str = "silorec") -> Iterator[Path]:
    """Yield a scratch folder that becomes `path` (marked as made by `made_by`) only if the block succeeds.

    Without `replace`, an existing, non-empty `path` is an error; with it, an
    old folder silorec made is swapped out only after the new one is complete,
    and any other is refused (OutputError).
    """
    path = Path(path)
    if path.is_dir() and not any(path.iterdir()):
        path.rmdir()  # an empty folder holds nothing to lose
    if path.exists() and not replace:
        raise FileExistsError(f"{path} already exists; choose another --out or pass --force to replace it")
    check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        yield scratch
        mark(scratch, made_by)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(scratch, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(scratch, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
