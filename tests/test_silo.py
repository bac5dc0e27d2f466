from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

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
from common.silo import load_silo, write_silo
from tests.conftest import write

ITEMS = "item_id,title,category\n1,Red pan,kitchen\n2,Blue rake,garden\n3,Old drum,music\n"
INTER = "user_id,item_id,timestamp\nu1,1,100\nu1,2,200\nu2,3,150\n"


def silo(tmp_path: Path, items: str = ITEMS, inter: str = INTER) -> Path:
    write(tmp_path / "s" / "items.csv", items)
    write(tmp_path / "s" / "interactions.csv", inter)
    return tmp_path / "s"


def test_valid_silo_loads_with_exact_integer_timestamps(tmp_path):
    s = load_silo(silo(tmp_path))
    assert list(s.items["item_id"]) == ["1", "2", "3"]
    assert list(s.interactions["item"]) == [0, 1, 2]
    assert s.interactions["timestamp"].dtype == np.int64
    assert list(s.interactions["timestamp"]) == [100 * 10**9, 200 * 10**9, 150 * 10**9]


def test_nearby_large_epochs_stay_distinct(tmp_path):
    # float32 would merge these; docs/eval.md requires exact comparison
    s = load_silo(silo(tmp_path, inter="user_id,item_id,timestamp\nu,1,881250949\nu,2,881250950\n"))
    a, b = s.interactions["timestamp"]
    assert b - a == 10**9


def test_iso_timestamps_are_read(tmp_path):
    s = load_silo(
        silo(tmp_path, inter="user_id,item_id,timestamp\nu,1,2024-05-01T12:00:00Z\nu,2,2024-05-01T12:00:01+00:00\n")
    )
    a, b = s.interactions["timestamp"]
    assert b - a == 10**9


def test_missing_items_file(tmp_path):
    write(tmp_path / "s" / "interactions.csv", INTER)
    with pytest.raises(MissingFileError) as e:
        load_silo(tmp_path / "s")
    assert "items.csv" in str(e.value)


def test_missing_interactions_file(tmp_path):
    write(tmp_path / "s" / "items.csv", ITEMS)
    with pytest.raises(MissingFileError, match="interactions"):
        load_silo(tmp_path / "s")


def test_missing_column_names_file_line_and_field(tmp_path):
    root = silo(tmp_path, inter="user_id,item,timestamp\nu1,1,100\n")
    with pytest.raises(MissingColumnError) as e:
        load_silo(root)
    assert str(root / "interactions.csv") in str(e.value)
    assert e.value.location == "line 1" and e.value.field == "item_id"


def test_unparseable_timestamp_names_line(tmp_path):
    root = silo(tmp_path, inter="user_id,item_id,timestamp\nu1,1,100\nu1,2,yesterday\nu2,3,nope\n")
    with pytest.raises(BadTimestampError) as e:
        load_silo(root)
    msg = str(e.value)
    assert str(root / "interactions.csv") in msg and "line 3" in msg and "'timestamp'" in msg
    assert "1 more line" in msg


def test_millisecond_epoch_is_rejected_with_hint(tmp_path):
    root = silo(tmp_path, inter="user_id,item_id,timestamp\nu1,1,1700000000000000\n")
    with pytest.raises(BadTimestampError, match="line 2.*milliseconds"):
        load_silo(root)


def test_empty_title_names_line(tmp_path):
    root = silo(tmp_path, items='item_id,title\n1,Red pan\n2,"  "\n3,Old drum\n')
    with pytest.raises(EmptyFieldError) as e:
        load_silo(root)
    assert e.value.path == root / "items.csv" and e.value.location == "line 3" and e.value.field == "title"


def test_unknown_item_names_line(tmp_path):
    root = silo(tmp_path, inter="user_id,item_id,timestamp\nu1,1,100\nu1,9,200\n")
    with pytest.raises(UnknownItemError) as e:
        load_silo(root)
    assert "interactions.csv, line 3: field 'item_id': item '9' is not in the catalog" in str(e.value)


def test_duplicate_item_ids_name_both_lines(tmp_path):
    root = silo(tmp_path, items="item_id,title\n1,Red pan\n2,Blue rake\n1,Red pan again\n")
    with pytest.raises(DuplicateItemError) as e:
        load_silo(root)
    assert e.value.location == "line 2" and "line 4" in str(e.value)


def test_empty_log(tmp_path):
    root = silo(tmp_path, inter="user_id,item_id,timestamp\n")
    with pytest.raises(EmptyLogError, match="interactions.csv"):
        load_silo(root)


def test_empty_user_id(tmp_path):
    root = silo(tmp_path, inter="user_id,item_id,timestamp\nu1,1,100\n,2,200\n")
    with pytest.raises(EmptyFieldError, match="line 3: field 'user_id'"):
        load_silo(root)


def test_wrong_field_count(tmp_path):
    root = silo(tmp_path, inter="user_id,item_id,timestamp\nu1,1,100,extra\n")
    with pytest.raises(SiloFormatError, match="line 2: 4 fields where the header has 3"):
        load_silo(root)


def test_line_numbers_count_blank_lines_and_multiline_fields(tmp_path):
    items = 'item_id,title,description\n1,Red pan,"two\nlines"\n\n2,Blue rake,x\n2,dup,y\n'
    with pytest.raises(DuplicateItemError) as e:
        load_silo(silo(tmp_path, items=items))
    assert e.value.location == "line 5" and "line 6" in str(e.value)


def test_parquet_errors_name_the_row(tmp_path):
    root = tmp_path / "p"
    root.mkdir()
    pd.DataFrame({"item_id": ["a", "b"], "title": ["x", "y"]}).to_parquet(root / "items.parquet")
    pd.DataFrame({"user_id": ["u", "u"], "item_id": ["a", "zz"], "timestamp": [1, 2]}).to_parquet(
        root / "interactions.parquet"
    )
    with pytest.raises(UnknownItemError) as e:
        load_silo(root)
    assert e.value.location == "row 2" and e.value.path.name == "interactions.parquet"


def test_parquet_datetime_column(tmp_path):
    root = tmp_path / "p"
    root.mkdir()
    pd.DataFrame({"item_id": ["a"], "title": ["x"]}).to_parquet(root / "items.parquet")
    ts = pd.to_datetime(["2024-01-01T00:00:00Z", "2024-01-01T00:00:02Z"])
    pd.DataFrame({"user_id": ["u", "u"], "item_id": ["a", "a"], "timestamp": ts}).to_parquet(
        root / "interactions.parquet"
    )
    s = load_silo(root)
    assert np.diff(s.interactions["timestamp"].to_numpy()).tolist() == [2 * 10**9]


def test_recbole_atomic_files(tmp_path):
    root = tmp_path / "ml"
    write(root / "ml.item", "item_id:token\tmovie_title:token_seq\tclass:token_seq\n1\tToy Story\tAnimation Comedy\n")
    write(root / "ml.inter", "user_id:token\titem_id:token\trating:float\ttimestamp:float\n7\t1\t5\t881250949\n")
    s = load_silo(root)
    assert s.items.loc[0, "title"] == "Toy Story" and s.items.loc[0, "category"] == "Animation|Comedy"
    assert s.interactions.loc[0, "timestamp"] == 881250949 * 10**9


def test_atomic_bad_timestamp_names_line(tmp_path):
    root = tmp_path / "ml"
    write(root / "ml.item", "item_id:token\tmovie_title:token_seq\n1\tToy Story\n")
    write(root / "ml.inter", "user_id:token\titem_id:token\ttimestamp:float\n7\t1\t1\n7\t1\tx\n")
    with pytest.raises(BadTimestampError, match=r"ml\.inter, line 3"):
        load_silo(root)


def test_two_interaction_files_are_ambiguous(tmp_path):
    root = silo(tmp_path)
    write(root / "old.inter", "user_id:token\titem_id:token\ttimestamp:float\n")
    with pytest.raises(SiloFormatError, match="several interactions files"):
        load_silo(root)


def test_write_then_load_round_trips(tmp_path, synthetic_silo):
    s = load_silo(synthetic_silo)
    write_silo(tmp_path / "copy", s.items, s.interactions, s.users)
    t = load_silo(tmp_path / "copy")
    pd.testing.assert_frame_equal(s.interactions, t.interactions)
    assert list(s.items["title"]) == list(t.items["title"])


def test_parquet_synthetic_silo_matches_csv(tmp_path):
    from simulations.synthetic import SyntheticSpec, make_synthetic_silo

    a = load_silo(make_synthetic_silo(tmp_path / "a", SyntheticSpec(seed=3)))
    b = load_silo(make_synthetic_silo(tmp_path / "b", SyntheticSpec(seed=3), fmt="parquet"))
    pd.testing.assert_frame_equal(a.interactions, b.interactions)


@pytest.mark.parametrize(
    "items, match",
    [
        ('item_id,title\n1,"Red pan\n2,Blue rake\n3,Old drum\n', "line 2: a quote opens here and is never closed"),
        (
            'item_id,title\n1,"Red pan\n2,Blue rake\n3,"\n',
            "line 2: field 'title': a quoted field runs from line 2 over 3 lines",
        ),
        ('item_id,title\n1,"Red" pan\n', "line 2: unreadable CSV"),
        ("item_id,title,title\n1,Red pan,x\n", "line 1: field 'title': appears twice in the header"),
        ("item_id,title\n1,Red pan\n2\n", "line 3: 1 fields where the header has 2"),
    ],
)
def test_a_csv_is_read_strictly_and_an_error_names_its_line(tmp_path, items, match):
    with pytest.raises(SiloFormatError, match=match):
        load_silo(silo(tmp_path, items=items))


def test_dates_beyond_what_nanoseconds_hold_and_unreadable_files_are_errors_not_tracebacks(tmp_path, monkeypatch):
    for when in ("2300-01-01T00:00:00Z", "1600-06-01"):
        with pytest.raises(BadTimestampError, match="out of range"):
            load_silo(silo(tmp_path, inter=f"user_id,item_id,timestamp\nu1,1,{when}\n"))
    root = silo(tmp_path)
    real = open

    def denied(path, *args, **kwargs):
        if str(path).endswith("items.csv"):
            raise PermissionError(13, "Permission denied")
        return real(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", denied)
    with pytest.raises(SiloFormatError, match="items.csv: cannot read the file \\(Permission denied\\)"):
        load_silo(root)


def test_check_data_counts_exact_repeats_and_warns_of_unlikely_dates(tmp_path):
    from common.summary import summarize

    inter = "user_id,item_id,timestamp\nu1,1,-5\nu1,1,-5\nu2,3,4102444800\nu2,2,150\n"
    s = summarize(load_silo(silo(tmp_path, inter=inter)))
    assert s.duplicates == 1 and s.before_1970 == 2 and s.in_future == 1
    assert len(s.warnings()) == 2 and "exact repeats    1" in "\n".join(s.lines())
