"""Fuzzing the silo readers: whatever bytes, CSV shapes, Parquet schemas or timestamps a silo holds, loading it
ends as a valid silo or one SilorecError, never another exception."""

from __future__ import annotations

import string
import tempfile
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.errors import SilorecError
from common.silo import load_silo
from common.summary import summarize

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CELL = st.text(alphabet=string.printable + "éß€\u2028\x00\"';,\t", max_size=12)
TIMES = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.datetimes().map(lambda d: d.isoformat()),
    st.text(max_size=25),
)


def _load(files: dict[str, bytes]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, data in files.items():
            (root / name).write_bytes(data)
        try:
            summarize(load_silo(root))
        except SilorecError:
            pass


@FUZZ
@given(items=st.binary(max_size=300), interactions=st.binary(max_size=300))
def test_random_bytes(items, interactions):
    _load({"items.csv": items, "interactions.csv": interactions})


def _csv(header: list[str], rows: list[list[str]]) -> bytes:
    frame = pd.DataFrame(rows, columns=header) if rows else pd.DataFrame(columns=header)
    return frame.to_csv(index=False).encode()


@FUZZ
@given(
    extra=st.lists(st.sampled_from(["category", "brand", "event", "title", "x", ""]), max_size=3),
    rows=st.lists(st.tuples(CELL, CELL, TIMES), max_size=12),
    catalog=st.lists(st.tuples(CELL, CELL), max_size=8),
    ragged=st.booleans(),
)
def test_random_csv_shapes(extra, rows, catalog, ragged):
    items = _csv(["item_id", "title", *extra], [[i, t, *["x"] * len(extra)] for i, t in catalog])
    inter = _csv(["user_id", "item_id", "timestamp"], [[u, i, t] for u, i, t in rows])
    if ragged:
        inter += b"u,1\n"
    _load({"items.csv": items, "interactions.csv": inter})


@FUZZ
@given(
    ids=st.lists(st.one_of(st.integers(-5, 5), st.text(max_size=4), st.none()), min_size=1, max_size=6),
    stamps=st.lists(st.one_of(st.datetimes(), st.integers(-(2**62), 2**62), st.none()), min_size=1, max_size=6),
    titles=st.lists(st.one_of(st.text(max_size=6), st.none(), st.floats()), min_size=1, max_size=6),
)
def test_random_parquet_schemas(ids, stamps, titles):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        n = min(len(ids), len(stamps), len(titles))
        try:
            pq.write_table(
                pa.table({"item_id": pa.array(ids[:n]), "title": pa.array(titles[:n])}), root / "items.parquet"
            )
            pq.write_table(
                pa.table(
                    {"user_id": pa.array(ids[:n]), "item_id": pa.array(ids[:n]), "timestamp": pa.array(stamps[:n])}
                ),
                root / "interactions.parquet",
            )
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            return  # pyarrow itself refuses to write such a column
        try:
            summarize(load_silo(root))
        except SilorecError:
            pass
