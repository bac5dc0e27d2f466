from __future__ import annotations

from click.testing import CliRunner

from simulations.bench import Measure, ratio, table


def test_ratio_and_table_compare_within_one_batch_size():
    ms = [
        Measure("non-dp", 8, "cpu", 100.0, 0.08, 600, 500),
        Measure("dp", 8, "cpu", 85.0, 0.094, 650, 500),
        Measure("non-dp", 16, "cpu", 150.0, 0.1, 700, 500),
        Measure("dp", 16, "cpu", 90.0, 0.18, 800, 500),
    ]
    assert ratio(ms, 8) == 0.85 and ratio(ms, 16) == 0.6
    rows = table(ms).splitlines()
    assert rows[2].split()[-1] == "0.85" and rows[2].split()[-2] == "150"  # step MB: peak − setup


def test_bench_measures_every_step_in_its_own_process(tiny_bert, synthetic_silo, tmp_path):
    import json

    from simulations.cli import main as sim

    out = tmp_path / "bench.json"
    args = ["bench", "--data", str(synthetic_silo), "--base-model", str(tiny_bert), "--batch-sizes", "4"]
    done = CliRunner().invoke(sim, [*args, "--steps", "1", "--device", "cpu", "--out", str(out)])
    assert done.exit_code == 0, done.output
    assert done.output.strip().splitlines()[-1].startswith("DP/non-DP throughput ratio: ")
    measures = json.loads(out.read_text())["measures"]
    assert [(m["mode"], m["batch"]) for m in measures] == [
        ("non-dp", 4),
        ("dp", 4),
        ("ghost", 4),
    ]
    assert all(m["users_per_second"] > 0 and m["peak_mb"] >= m["setup_mb"] > 0 for m in measures)
    bad = CliRunner().invoke(sim, [*args, "--modes", "dp"])
    assert bad.exit_code == 2 and "non-dp" in bad.output
