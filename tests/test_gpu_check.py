"""`simulations/gpu_check.sh dry-run`: the GPU proof's three steps on the CPU, at their smallest, with this
environment. Its federation is a real deployment on 127.0.0.1 (`silorec-sim localhost`: a SuperLink, the
ServerApp and one SuperNode process per merchant), whose overhead report is checked here too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from simulations.localhost import overhead
from simulations.synthetic import SyntheticSpec, make_synthetic_silo

SCRIPT = Path(__file__).resolve().parents[1] / "simulations" / "gpu_check.sh"


def test_the_gpu_checks_dry_run_benches_trains_and_federates_on_the_cpu(tmp_path, tiny_bert):
    data = make_synthetic_silo(tmp_path / "data", SyntheticSpec(users=90, seed=4))
    env = os.environ | {
        "OUT": str(tmp_path / "out"),
        "GPU_CHECK_DATA": str(data),
        "GPU_CHECK_MODEL": str(tiny_bert),
        "GPU_CHECK_PYTHON": sys.executable,
    }
    done = subprocess.run([str(SCRIPT), "dry-run"], env=env, capture_output=True, text=True, timeout=1200)
    work = tmp_path / "out" / "gpu-check"
    logs = "\n".join(p.read_text(errors="replace")[-1500:] for p in sorted(work.glob("federation/logs/*.log")))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:] + logs
    out = done.stdout
    assert "DP/non-DP throughput ratio:" in out and "ghost/non-DP throughput ratio:" in out
    bench = json.loads((work / "bench.json").read_text())
    assert bench["device"] == "cpu" and {m["mode"] for m in bench["measures"]} == {"non-dp", "dp", "ghost"}
    central = json.loads((work / "central" / "metrics.json").read_text())
    assert central["epsilon"] <= 8 and "central: device" in out
    assert "federation: 3 rounds, 3 merchants" in out

    # the federation's overhead: rounds 1 and 2 only trained, round 3 also validated
    report = json.loads((work / "federation" / "overhead.json").read_text())
    assert [(r["round"], r["validated"]) for r in report["rounds"]] == [(1, False), (2, False), (3, True)]
    for r in report["rounds"][:2]:
        # a training round's wall time covers every merchant's own step, so it is at least the slowest one
        assert 0 < r["slowest_merchant_seconds"] <= r["seconds"] and r["ratio"] >= 1.0, r
        assert {"collect_masked_vectors", "unmask"} <= set(r["secagg_seconds"])
    ratios = [r["ratio"] for r in report["rounds"][:2]]
    assert report["median_ratio"] == pytest.approx(sum(ratios) / 2)
    assert len(report["sent"]) == 3 and all(s["messages"] > 0 and s["bytes"] > 0 for s in report["sent"].values())
    assert "median over training rounds" in out
    # recomputed from the files alone, the report is the same
    silos = {p.name: p for p in sorted((work / "federation" / "silos").iterdir()) if p.is_dir()}
    assert overhead(work / "federation" / "run", silos, work / "federation" / "sent")["rounds"] == report["rounds"]
