"""Read, validate and write a silo: one merchant's interaction log and item catalog.

A silo is a folder holding `interactions` (user_id, item_id, timestamp[, event])
and `items` (item_id, title[, category, brand, description]), each as `.csv` or
`.parquet`, or as RecBole atomic files (`*.inter`, `*.item`). An optional
`users` file carries user attributes (user_id, ...). Everything is validated on
load; every error names the file, the line or row, and the field.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from common.errors import (
    BadTimestampError,
    DuplicateItemError,
    EmptyFieldError,
    EmptyLogError,
    MissingColumnError,
    MissingFileError,
    SiloFormatError,
    UnknownItemError,
)
from common.paths import STATE_DIR  # noqa: F401  (re-exported: where a silo keeps silorec's state)

ITEM_TEXT_FIELDS = ("title", "category", "brand", "description")
MULTILINE_FIELDS = ("description", "category", "brand")  # free text that may hold a quoted line break
CATEGORY_SEPARATOR = "|"

_REQUIRED = {
    "interactions": ("user_id", "item_id", "timestamp"),
    "items": ("item_id", "title"),
    "users": ("user_id",),
}
_ATOMIC_SUFFIX = {"interactions": ".inter", "items": ".item", "users": ".user"}
# RecBole data sets name some of our fields differently.
_ATOMIC_ALIASES = {
    "movie_title": "title",
    "categories": "category",
    "class": "category",
    "genre": "category",
}
_INT = re.compile(r"^[+-]?\d+$")
_YEAR = re.compile(r"^\s*[+-]?(\d{4,})-")
_FLOAT = re.compile(r"^[+-]?(\d+\.\d*|\.\d+|\d+(\.\d*)?[eE][+-]?\d+)$")
_NS_PER_S = 1_000_000_000
_MAX_EPOCH_S = np.iinfo(np.int64).max // _NS_PER_S


@dataclass(frozen=True)
class Table:
    """A file's rows as strings (or native Parquet values), with where each row came from."""

    path: Path
    frame: pd.DataFrame
    positions: np.ndarray  # 1-based line (text) or row (Parquet) of each record
    unit: str  # "line" or "row"

    def where(self, i: int) -> str:
        return f"{self.unit} {int(self.positions[i])}"


@dataclass(frozen=True)
class Silo:
    """A validated silo.

    `items` is the catalog in file order; its position is the item's index.
    `interactions` has user_id, item_id, item (catalog index), timestamp
    (int64 nanoseconds since the epoch) and event, in file order.
    """

    root: Path
    items: pd.DataFrame
    interactions: pd.DataFrame
    users: pd.DataFrame | None = None

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def n_items(self) -> int:
        return len(self.items)


def load_silo(root: Path | str) -> Silo:
    """Load and validate the silo in folder `root`; raise a SiloFormatError subclass on bad input."""
    root = Path(root)
    if not root.is_dir():
        raise MissingFileError(
            root, "not a folder", hint="point at the silo folder holding interactions and items files"
        )
    items_table = _read_kind(root, "items", required=True)
    inter_table = _read_kind(root, "interactions", required=True)
    users_table = _read_kind(root, "users", required=False)
    items = _validate_items(items_table)
    interactions = _validate_interactions(inter_table, items)
    users = _validate_users(users_table) if users_table is not None else None
    return Silo(root=root, items=items, interactions=interactions, users=users)


def write_silo(
    root: Path,
    items: pd.DataFrame,
    interactions: pd.DataFrame,
    users: pd.DataFrame | None = None,
) -> None:
    """Write frames shaped like a Silo's as `items.csv`, `interactions.csv` (and `users.csv`)."""
    root.mkdir(parents=True, exist_ok=True)
    cols = ["item_id"] + [c for c in ITEM_TEXT_FIELDS if c in items.columns]
    cols += [c for c in items.columns if c not in cols]
    items[cols].to_csv(root / "items.csv", index=False)
    out = interactions[["user_id", "item_id"]].copy()
    out["timestamp"] = format_timestamps(interactions["timestamp"].to_numpy())
    if "event" in interactions.columns and (interactions["event"] != "").any():
        out["event"] = interactions["event"]
    out.to_csv(root / "interactions.csv", index=False)
    if users is not None:
        users.to_csv(root / "users.csv", index=False)


def format_timestamps(ns: np.ndarray) -> list[str] | np.ndarray:
    """Render int64 nanosecond timestamps as epoch seconds where exact, else ISO 8601."""
    ns = np.asarray(ns, dtype=np.int64)
    if (ns % _NS_PER_S == 0).all():
        return ns // _NS_PER_S
    return [pd.Timestamp(int(v), unit="ns", tz="UTC").isoformat() for v in ns]


# --- reading -----------------------------------------------------------------


def _find_file(root: Path, kind: str) -> Path | None:
    found = [root / f"{kind}{ext}" for ext in (".csv", ".parquet") if (root / f"{kind}{ext}").is_file()]
    found += sorted(p for p in root.glob(f"*{_ATOMIC_SUFFIX[kind]}") if p.is_file())
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise SiloFormatError(root, f"several {kind} files ({names})", hint="keep exactly one per silo")
    return found[0] if found else None


def _read_kind(root: Path, kind: str, *, required: bool) -> Table | None:
    path = _find_file(root, kind)
    if path is None:
        if not required:
            return None
        raise MissingFileError(
            root / f"{kind}.csv",
            f"no {kind} file",
            hint=f"add {kind}.csv, {kind}.parquet or a RecBole *{_ATOMIC_SUFFIX[kind]} file with columns "
            + ", ".join(_REQUIRED[kind]),
        )
    if path.suffix == ".parquet":
        table = _read_parquet(path)
    else:
        table = _read_text(path, atomic=path.suffix == _ATOMIC_SUFFIX[kind])
    missing = [c for c in _REQUIRED[kind] if c not in table.frame.columns]
    if missing:
        raise MissingColumnError(
            path,
            "column missing from the header (found: " + ", ".join(map(str, table.frame.columns)) + ")",
            location=f"{table.unit} 1" if table.unit == "line" else None,
            field=missing[0],
            hint=f"a {kind} file needs columns " + ", ".join(_REQUIRED[kind]),
        )
    return table


def _read_text(path: Path, *, atomic: bool) -> Table:
    delimiter = "\t" if atomic else ","
    quoting = csv.QUOTE_NONE if atomic else csv.QUOTE_MINIMAL
    rows: list[list[str]] = []
    positions: list[int] = []
    last_line = 1
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter=delimiter, quoting=quoting, strict=True)
            try:
                header = next(reader)
            except StopIteration:
                raise SiloFormatError(
                    path, "the file is empty", location="line 1", hint="write a header line first"
                ) from None
            header = [_column_name(h, atomic) for h in header]
            _check_header(path, header, "line 1")
            last_line = reader.line_num
            for row in reader:
                start = last_line + 1
                last_line = reader.line_num
                spans = [h for h, v in zip(header, row) if "\n" in v or "\r" in v]
                if [h for h in spans if h not in MULTILINE_FIELDS]:  # an id or a title never holds a line break
                    raise SiloFormatError(
                        path,
                        f"a quoted field runs from line {start} over {last_line - start + 1} lines",
                        location=f"line {start}",
                        field=spans[0],
                        hint="close the quote, or put each record on one line",
                    )
                if not row or (len(row) == 1 and row[0] == ""):
                    continue  # blank line
                if len(row) != len(header):
                    raise SiloFormatError(
                        path,
                        f"{len(row)} fields where the header has {len(header)}",
                        location=f"line {start}",
                        hint="check for a stray or missing " + ("tab" if atomic else "comma or quote"),
                    )
                rows.append(row)
                positions.append(start)
    except UnicodeDecodeError as e:
        raise SiloFormatError(
            path, f"not UTF-8 text ({e.reason} at byte {e.start})", hint="re-save the file as UTF-8"
        ) from None
    except csv.Error as e:
        if "unexpected end of data" in str(e):  # a quote opened in the record that starts here is never closed
            raise SiloFormatError(
                path,
                "a quote opens here and is never closed",
                location=f"line {last_line + 1}",
                hint="close the quote, or put each record on one line",
            ) from None
        raise SiloFormatError(
            path,
            f"unreadable CSV ({e})",
            location=f"line {reader.line_num}",
            hint="check for a stray quote inside a field",
        ) from None
    except OSError as e:
        raise SiloFormatError(
            path, f"cannot read the file ({e.strerror or e})", hint="check that it exists and is readable"
        ) from None
    frame = pd.DataFrame(rows, columns=header, dtype=object) if rows else pd.DataFrame(columns=header, dtype=object)
    return Table(path, frame, np.asarray(positions, dtype=np.int64), "line")


def _check_header(path: Path, header: list[str], location: str | None) -> None:
    seen: set[str] = set()
    for name in header:
        if name in seen:
            raise SiloFormatError(
                path,
                "appears twice in the header",
                location=location,
                field=name,
                hint="give every column its own name",
            )
        seen.add(name)


def _column_name(raw: str, atomic: bool) -> str:
    name = raw.strip()
    if atomic:
        name = name.split(":", 1)[0]
        name = _ATOMIC_ALIASES.get(name, name)
    return name


def _read_parquet(path: Path) -> Table:
    try:
        table = pq.read_table(path)
        _check_header(path, [str(c) for c in table.column_names], None)
        frame = table.to_pandas()
    except SiloFormatError:
        raise
    except OSError as e:
        raise SiloFormatError(
            path, f"cannot read the file ({e.strerror or e})", hint="check that it exists and is readable"
        ) from None
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise SiloFormatError(path, f"unreadable Parquet ({e})", hint="re-export the file") from None
    return Table(path, frame.reset_index(drop=True), np.arange(1, len(frame) + 1, dtype=np.int64), "row")


# --- validation --------------------------------------------------------------


def _strings(table: Table, column: str) -> pd.Series:
    """The column as stripped strings, with missing values as ''."""
    col = table.frame[column]
    return col.map(lambda v: "" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v).strip())


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _more(mask: np.ndarray, unit: str) -> str:
    extra = int(mask.sum()) - 1
    return f" ({extra} more {unit}{'s' if extra > 1 else ''} like it)" if extra > 0 else ""


def _require_nonempty(table: Table, values: pd.Series, field: str, hint: str) -> None:
    empty = (values == "").to_numpy()
    if empty.any():
        i = _first(empty)
        raise EmptyFieldError(
            table.path, "empty" + _more(empty, table.unit), location=table.where(i), field=field, hint=hint
        )


def _validate_items(table: Table) -> pd.DataFrame:
    ids = _strings(table, "item_id")
    _require_nonempty(table, ids, "item_id", "every item needs an id")
    dup = ids.duplicated(keep=False).to_numpy()
    if dup.any():
        i = _first(dup)
        same = np.flatnonzero((ids == ids.iloc[i]).to_numpy())
        others = ", ".join(table.where(j) for j in same[1:4])
        raise DuplicateItemError(
            table.path,
            f"item id '{ids.iloc[i]}' appears again at {others}",
            location=table.where(i),
            field="item_id",
            hint="item ids must be unique in the catalog; merge or rename the duplicates",
        )
    out = pd.DataFrame({"item_id": ids.to_numpy()})
    for field in ITEM_TEXT_FIELDS:
        out[field] = _strings(table, field).to_numpy() if field in table.frame.columns else ""
    _require_nonempty(table, out["title"], "title", "every item needs a title: it is what the model reads")
    if table.path.suffix == _ATOMIC_SUFFIX["items"] and "category" in table.frame.columns:
        # RecBole token_seq: categories separated by spaces.
        out["category"] = out["category"].map(lambda s: CATEGORY_SEPARATOR.join(s.split()))
    extra = [c for c in table.frame.columns if c not in out.columns]
    for c in extra:
        out[c] = _strings(table, c).to_numpy()
    return out


def _validate_interactions(table: Table, items: pd.DataFrame) -> pd.DataFrame:
    if len(table.frame) == 0:
        raise EmptyLogError(table.path, "no interactions", hint="a silo needs at least one interaction to train on")
    users = _strings(table, "user_id")
    _require_nonempty(table, users, "user_id", "every interaction needs the user's id")
    item_ids = _strings(table, "item_id")
    _require_nonempty(table, item_ids, "item_id", "every interaction needs an item id")
    timestamps = _parse_timestamps(table)
    index = pd.Index(items["item_id"])
    item = index.get_indexer(item_ids)
    unknown = item < 0
    if unknown.any():
        i = _first(unknown)
        raise UnknownItemError(
            table.path,
            f"item '{item_ids.iloc[i]}' is not in the catalog" + _more(unknown, table.unit),
            location=table.where(i),
            field="item_id",
            hint="add the item to the items file or drop the interaction",
        )
    event = (
        _strings(table, "event").to_numpy() if "event" in table.frame.columns else np.full(len(item), "", dtype=object)
    )
    return pd.DataFrame(
        {
            "user_id": users.to_numpy(),
            "item_id": item_ids.to_numpy(),
            "item": item.astype(np.int64),
            "timestamp": timestamps,
            "event": event,
        }
    )


def _validate_users(table: Table) -> pd.DataFrame:
    ids = _strings(table, "user_id")
    _require_nonempty(table, ids, "user_id", "every user row needs the user's id")
    out = pd.DataFrame({c: _strings(table, c).to_numpy() for c in table.frame.columns})
    out["user_id"] = ids.to_numpy()
    return out


def _parse_timestamps(table: Table) -> np.ndarray:
    """Timestamps as exact int64 nanoseconds; numbers are epoch seconds, text may be ISO 8601."""
    col = table.frame["timestamp"]
    if pd.api.types.is_datetime64_any_dtype(col):  # a Parquet timestamp column
        if getattr(col.dt, "tz", None) is not None:
            col = col.dt.tz_convert("UTC").dt.tz_localize(None)
        try:
            out = col.astype("datetime64[ns]").to_numpy()
        except (OverflowError, ValueError, pd.errors.OutOfBoundsDatetime):
            years = col.dt.year.to_numpy()
            _reject(table, (years < 1678) | (years > 2261), col.astype(str).to_numpy(), why=OUT_OF_RANGE)
            raise
        _reject(table, np.isnat(out), np.asarray(["missing"] * len(out)))
        return out.astype(np.int64)
    values = _strings(table, "timestamp").to_numpy()
    out = np.zeros(len(values), dtype=np.int64)
    bad = np.zeros(len(values), dtype=bool)
    iso: list[int] = []
    for i, v in enumerate(values):
        if _INT.match(v) or _FLOAT.match(v):
            # integers stay exact: float64 would merge nearby epoch values
            seconds = int(v) if _INT.match(v) else float(v)
            if not abs(seconds) <= _MAX_EPOCH_S:  # also catches nan and inf
                bad[i] = True
            else:
                out[i] = seconds * _NS_PER_S if isinstance(seconds, int) else round(seconds * _NS_PER_S)
        else:
            iso.append(i)
    if iso:
        at = np.asarray(iso)
        # int64 nanoseconds reach only 1677-09-21 .. 2262-04-11: a date past them is out of range, not garbled
        years = np.array([int(m.group(1)) if (m := _YEAR.match(v)) else 0 for v in values[at]])
        outside = np.zeros(len(values), dtype=bool)
        outside[at[(years > 2261) | ((years > 0) & (years < 1678))]] = True
        _reject(table, outside, values, why=OUT_OF_RANGE)
        parsed = pd.to_datetime(pd.Series(values[at]), format="ISO8601", utc=True, errors="coerce")
        nat = parsed.isna().to_numpy()
        bad[at[nat]] = True
        ok = at[~nat]
        out[ok] = parsed[~nat].dt.tz_localize(None).astype("datetime64[ns]").astype(np.int64).to_numpy()
    _reject(table, bad, values)
    return out


OUT_OF_RANGE = "out of range: times must lie between 1678 and 2261"


def _reject(table: Table, bad: np.ndarray, values: np.ndarray, *, why: str = "") -> None:
    if bad.any():
        i = _first(bad)
        raise BadTimestampError(
            table.path,
            (f"{values[i]!r} is {why}" if why else f"cannot read {values[i]!r} as a time") + _more(bad, table.unit),
            location=table.where(i),
            field="timestamp",
            hint="use integer epoch seconds (not milliseconds) or an ISO 8601 date-time such as 2024-05-01T12:30:00Z",
        )
