from __future__ import annotations

from click.testing import CliRunner

from client.cli import main as client
from simulations.cli import main as sim
from tests.conftest import write


def test_check_data_prints_summary(synthetic_silo):
    result = CliRunner().invoke(client, ["check-data", str(synthetic_silo)])
    assert result.exit_code == 0, result.output
    assert "users            60" in result.output and "evaluated users" in result.output


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
