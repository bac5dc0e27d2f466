"""The privacy-mode benchmark: federation vs silo vs central DP (and central non-private, MostPop) on one data set.

Each arm is run `draws` times as its own `silorec-sim` process (a fresh draw of
the DP noise each time), into OUT/<arm>-<draw>/; a run that finished before
is kept, so an interrupted benchmark resumes where it stopped. Then one table:
each arm's test and validation NDCG@10 (mean over draws), its wall time, and
the paired differences that decide the comparisons (federation − central DP,
federation − silo), each averaged over draws per user before users are
resampled; and, for federation runs, validation after the last round against
round 0 (the releases alone), and what a round costs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common import atomic
from common.errors import SilorecError
from simulations.federated import compare_runs

ARMS = ("federation", "silo", "central-dp", "central")


@dataclass(frozen=True)
class BenchmarkSpec:
    data: Path
    out: Path
    draws: int = 3
    arms: tuple[str, ...] = ("federation", "silo", "central-dp")
    merchants: int = 10
    epsilon: float = 8.0
    delta: float = 1e-4
    # extra command-line options per arm, e.g. {"federation": ["--rounds", "200"]}
    options: dict[str, list[str]] = field(default_factory=dict)
    draws_of: dict[str, int] = field(default_factory=dict)  # arms run another number of times than `draws`

    def runs(self, arm: str) -> list[int]:
        return list(range(1, self.draws_of.get(arm, self.draws) + 1))


def command(spec: BenchmarkSpec, arm: str, out: Path) -> list[str]:
    """The `silorec-sim` command line of one run of `arm`."""
    sim = [sys.executable, "-m", "simulations.cli"]
    dp = ["--epsilon", f"{spec.epsilon:g}", "--delta", f"{spec.delta:g}"]
    if arm in ("federation", "silo"):
        cmd = sim + [
            "run",
            "--data",
            str(spec.data),
            "--out",
            str(out),
            "--merchants",
            str(spec.merchants),
            "--scheme",
            "region",
            "--privacy",
            arm,
            *dp,
        ]
    elif arm == "central-dp":
        cmd = sim + ["central", "--data", str(spec.data), "--out", str(out), *dp]
    elif arm == "central":
        cmd = sim + ["central", "--data", str(spec.data), "--out", str(out), "--no-dp"]
    else:
        raise SilorecError(f"unknown benchmark arm {arm!r}; choose from {', '.join(ARMS)}")
    return cmd + list(spec.options.get(arm, []))


def run_benchmark(spec: BenchmarkSpec, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every arm's draws that have not finished yet, then summarise them all (OUT/benchmark.json)."""
    spec.out.mkdir(parents=True, exist_ok=True)
    walls = _load(spec.out / "walls.json")
    for arm in spec.arms:
        for draw in spec.runs(arm):
            out = spec.out / f"{arm}-{draw}"
            if (out / "metrics.json").is_file() and (out / "ranks.json").is_file():
                continue
            cmd = command(spec, arm, out) + (["--force"] if out.exists() else [])
            log(f"[{arm} {draw}/{len(spec.runs(arm))}] {' '.join(cmd[2:])}")
            t0 = time.perf_counter()
            with open(spec.out / f"{arm}-{draw}.log", "wb") as sink:
                done = subprocess.run(cmd, stdout=sink, stderr=subprocess.STDOUT)
            if done.returncode != 0:
                raise SilorecError(
                    f"{arm} draw {draw} failed (exit {done.returncode}); see {spec.out / f'{arm}-{draw}.log'}"
                )
            walls[out.name] = round(time.perf_counter() - t0, 1)
            atomic.write_json(spec.out / "walls.json", walls)
    summary = summarize(spec, walls)
    atomic.write_json(spec.out / "benchmark.json", summary)
    return summary


def summarize(spec: BenchmarkSpec, walls: dict[str, float]) -> dict[str, Any]:
    """Per arm: mean test/valid metrics over draws and wall time; the paired comparisons; federation's rounds."""
    runs = {arm: [spec.out / f"{arm}-{d}" for d in spec.runs(arm)] for arm in spec.arms}
    arms: dict[str, Any] = {}
    for arm, folders in runs.items():
        metrics = [json.loads((f / "metrics.json").read_text()) for f in folders]
        arms[arm] = {
            "test_ndcg@10": [m["test"]["ndcg@10"] for m in metrics],
            "test_hr@10": [m["test"]["hr@10"] for m in metrics],
            "valid_ndcg@10": [_valid(f, m) for f, m in zip(folders, metrics)],
            "epsilon": [_epsilon(m) for m in metrics],
            "wall_seconds": [walls.get(f.name) for f in folders],
        }
        if arm == "federation":
            arms[arm]["rounds"] = [_rounds(f) for f in folders]
        most_pop = metrics[0].get("most_pop", {}).get("test") or metrics[0].get("most_pop_local")
        if most_pop and "most_pop" not in arms:
            arms["MostPop"] = {"test_ndcg@10": [most_pop["ndcg@10"]], "test_hr@10": [most_pop["hr@10"]]}
    pairs = [
        (a, b)
        for a, b in (
            ("federation", "central-dp"),
            ("federation", "silo"),
            ("federation", "central"),
            ("central-dp", "silo"),
        )
        if a in runs and b in runs
    ]
    paired = {f"{a} − {b}": compare_runs(runs[a], runs[b]) for a, b in pairs}
    return {
        "data": str(spec.data),
        "draws": spec.draws,
        "epsilon": spec.epsilon,
        "delta": spec.delta,
        "arms": arms,
        "paired": paired,
    }


def table(summary: dict[str, Any]) -> list[str]:
    """The benchmark's figures as Markdown lines (what docs/results.md quotes)."""
    lines = [
        "| arm | test NDCG@10 (mean; each draw) | test HR@10 | valid NDCG@10 | ε | wall time per run |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for arm, a in summary["arms"].items():
        each = ", ".join(f"{x:.4f}" for x in a["test_ndcg@10"])
        eps = [e for e in a.get("epsilon", []) if e is not None]
        walls = [w for w in a.get("wall_seconds", []) if w]
        lines.append(
            f"| {arm} | {np.mean(a['test_ndcg@10']):.4f} ({each}) | {np.mean(a['test_hr@10']):.4f} | "
            + (f"{np.mean(a['valid_ndcg@10']):.4f}" if a.get("valid_ndcg@10") else "—")
            + " | "
            + (f"{max(eps):.2f}" if eps else ("—" if arm == "MostPop" else "non-private"))
            + " | "
            + (f"{np.mean(walls) / 60:.1f} min" if walls else "—")
            + " |"
        )
    lines += [
        "",
        "| paired difference of NDCG@10 | split | difference (95% CI) | users |",
        "| --- | --- | --- | ---: |",
    ]
    for name, by_split in summary["paired"].items():
        for split, d in by_split.items():
            lines.append(
                f"| {name} | {split} | {d['difference']:+.4f} ({d['low']:+.4f} … {d['high']:+.4f}) | {d['users']} |"
            )
    fed = summary["arms"].get("federation", {}).get("rounds")
    if fed:
        lines += [
            "",
            "| federation draw | valid NDCG@10, round 0 (releases) | after the last round | gain | round time | "
            "SecAgg+ outside the merchants' work | merchants' work (sum, max) |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for i, r in enumerate(fed, start=1):
            lines.append(
                f"| {i} | {r['valid_round0']:.4f} | {r['valid_last']:.4f} | {r['valid_last'] - r['valid_round0']:+.4f} "
                f"| "
                f"{r['round_seconds']:.1f} s | {r['secagg_seconds']:.1f} s | {r['merchant_seconds_sum']:.1f} s, "
                f"{r['merchant_seconds_max']:.1f} s |"
            )
    return lines


def _valid(folder: Path, metrics: dict[str, Any]) -> float:
    if "valid" in metrics:  # a central run
        return metrics["valid"]["ndcg@10"]
    return _history(folder)[-1]["valid"]["ndcg@10"]  # the learned model; the prior-weight scale is chosen on it


def _epsilon(metrics: dict[str, Any]) -> float | None:
    privacy = metrics.get("privacy") or {}
    return privacy.get("epsilon") or metrics.get("epsilon_max") or metrics.get("epsilon")


def _rounds(folder: Path) -> dict[str, float]:
    """Round 0 and last validation, and a round's mean cost: wall, SecAgg+ stages but the merchants' own work, and that work."""
    history = _history(folder)
    trained = [h for h in history[1:] if "valid" not in h and "secagg" in h]  # summed rounds without an evaluation
    stages = [h["secagg"].get("seconds", {}) for h in trained]
    merchants = list(merchant_seconds(folder / "silos", {h["round"] for h in trained}).values())
    total_stage = [sum(s.values()) for s in stages]
    return {
        "valid_round0": history[0]["valid"]["ndcg@10"],
        "valid_last": history[-1]["valid"]["ndcg@10"],
        "round_seconds": float(np.mean([h["seconds"] for h in trained])) if trained else float("nan"),
        # the collect stage waits for the merchants; in a simulation on c cores they share the cores
        "secagg_seconds": float(
            np.mean([t - s.get("collect_masked_vectors", 0.0) for t, s in zip(total_stage, stages)])
        )
        if stages
        else float("nan"),
        "merchant_seconds_sum": float(np.mean([sum(m) for m in merchants])) if merchants else float("nan"),
        "merchant_seconds_max": float(np.mean([max(m) for m in merchants])) if merchants else float("nan"),
    }


def merchant_seconds(silos: Path, rounds: set[int]) -> dict[int, list[float]]:
    """Each of `rounds`' compute seconds of every merchant, from the timing each keeps in its own state folder.

    The simulation holds every silo; a real merchant never sends these (they
    would tell the coordinator how many users it sampled).
    """
    seconds: dict[int, list[float]] = {}
    for log in sorted(silos.glob("*/.silorec-state/timing.jsonl")):
        for line in log.read_text().splitlines():
            entry = json.loads(line)
            if entry["round"] in rounds:
                seconds.setdefault(entry["round"], []).append(entry["seconds"])
    return seconds


def _history(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _load(path: Path) -> dict[str, float]:
    return json.loads(path.read_text()) if path.is_file() else {}


def parse_draws(pairs: Sequence[str]) -> dict[str, int]:
    """ "central=1" → {"central": 1}."""
    out = {}
    for pair in pairs:
        arm, sep, n = pair.partition("=")
        if not sep or arm not in ARMS or not n.isdigit() or int(n) < 1:
            raise SilorecError(f"--arm-draws {pair!r}: write ARM=N with ARM one of {', '.join(ARMS)} and N ≥ 1")
        out[arm] = int(n)
    return out


def parse_options(pairs: Sequence[str]) -> dict[str, list[str]]:
    """ "federation=--rounds 200" → {"federation": ["--rounds", "200"]} (repeatable per arm)."""
    out: dict[str, list[str]] = {}
    for pair in pairs:
        arm, sep, rest = pair.partition("=")
        if not sep or arm not in ARMS:
            raise SilorecError(f"--arm-options {pair!r}: write ARM=OPTIONS with ARM one of {', '.join(ARMS)}")
        out.setdefault(arm, []).extend(rest.split())
    return out
