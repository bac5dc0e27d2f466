"""How a simulation grows with its merchants: the same users split over 10, 100, 1,000 merchants.

Each size is one `silorec-sim run` in a subprocess, over a `dirichlet` split
of the same data (so the total users stay the same), sampled every
`INTERVAL` seconds for the resident memory of the driver and of everything
it started (Ray's processes and its ClientApp actors). What a round costs is
read from the run's metrics.jsonl. A line fitted to the rounds' seconds
against the merchants gives the per-merchant overhead: with the users held
fixed, whatever grows with the merchants is overhead.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common import atomic

INTERVAL = 0.5  # seconds between memory samples
SCALE_FILE = "scale.json"


@dataclass(frozen=True)
class ScaleSpec:
    data: Path
    out: Path
    merchants: Sequence[int] = (10, 100, 1000)
    rounds: int = 2
    options: Sequence[str] = field(default_factory=tuple)  # further `silorec-sim run` options


@dataclass
class Peak:
    """The largest resident memory seen, of the driver alone and of the driver's whole process tree."""

    driver_mb: float = 0.0
    tree_mb: float = 0.0
    processes: int = 0


def watch(pid: int, stop: threading.Event, peak: Peak) -> None:
    """Sample `pid` and its descendants until `stop`; keep the peaks in `peak`."""
    import psutil

    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    while not stop.wait(INTERVAL):
        try:
            driver = root.memory_info().rss
            tree = driver
            children = root.children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for child in children:
            try:
                tree += child.memory_info().rss
            except psutil.NoSuchProcess:
                continue
        peak.driver_mb = max(peak.driver_mb, driver / 2**20)
        peak.tree_mb = max(peak.tree_mb, tree / 2**20)
        peak.processes = max(peak.processes, 1 + len(children))


def run_size(spec: ScaleSpec, merchants: int) -> dict[str, Any]:
    """One run at `merchants` merchants: its peaks, its rounds' seconds and its wall time."""
    out = spec.out / f"merchants-{merchants}"
    cmd = [sys.executable, "-m", "simulations.cli", "run", "--data", str(spec.data), "--out", str(out)]
    cmd += ["--merchants", str(merchants), "--scheme", "dirichlet", "--rounds", str(spec.rounds), *spec.options]
    peak, stop = Peak(), threading.Event()
    started = time.perf_counter()
    with open(spec.out / f"merchants-{merchants}.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        sampler = threading.Thread(target=watch, args=(proc.pid, stop, peak), daemon=True)
        sampler.start()
        code = proc.wait()
        stop.set()
        sampler.join()
    wall = time.perf_counter() - started
    if code != 0:
        tail = (spec.out / f"merchants-{merchants}.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"the run with {merchants} merchants failed (exit {code}):\n{tail}")
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rounds = [line for line in lines if line.get("round", 0) > 0 and "seconds" in line]
    census = next((line.get("census") for line in lines if line.get("round") == 0), None) or {}
    return {
        "merchants": merchants,
        "took_part": census.get("merchants"),
        "users": census.get("users"),
        "driver_peak_mb": round(peak.driver_mb, 1),
        "tree_peak_mb": round(peak.tree_mb, 1),
        "processes": peak.processes,
        "round_seconds": [float(line["seconds"]) for line in rounds],
        "wall_seconds": round(wall, 1),
    }


def per_merchant_ms(sizes: Sequence[dict[str, Any]]) -> float | None:
    """The slope of a round's mean seconds against the merchants who took part, in ms a merchant."""
    points = [(s["took_part"] or s["merchants"], np.mean(s["round_seconds"])) for s in sizes if s["round_seconds"]]
    if len({x for x, _ in points}) < 2:
        return None
    x, y = np.array([p[0] for p in points], float), np.array([p[1] for p in points], float)
    return float(np.polyfit(x, y, 1)[0] * 1000)


def run_scale(spec: ScaleSpec, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    spec.out.mkdir(parents=True, exist_ok=True)
    sizes = []
    for merchants in spec.merchants:
        log(f"{merchants} merchants: running {spec.rounds} rounds...")
        sizes.append(run_size(spec, merchants))
        s = sizes[-1]
        log(
            f"  {s['took_part']} took part; driver peak {s['driver_peak_mb']:.0f} MB, all processes "
            f"{s['tree_peak_mb']:.0f} MB; rounds {', '.join(f'{x:.1f}' for x in s['round_seconds'])} s"
        )
    base = sizes[0]
    report = {
        "sizes": sizes,
        "per_merchant_ms": per_merchant_ms(sizes),
        "memory_ratio": round(sizes[-1]["tree_peak_mb"] / base["tree_peak_mb"], 3) if base["tree_peak_mb"] else None,
    }
    atomic.write_json(spec.out / SCALE_FILE, report)
    return report


def table(report: dict[str, Any]) -> str:
    lines = [
        f"{'merchants':>9}  {'took part':>9}  {'users':>6}  {'driver MB':>9}  {'all MB':>7}  {'procs':>5}  "
        f"{'s / round':>9}  {'wall s':>7}"
    ]
    for s in report["sizes"]:
        mean = np.mean(s["round_seconds"]) if s["round_seconds"] else float("nan")
        lines.append(
            f"{s['merchants']:>9}  {s['took_part'] or '-':>9}  {s['users'] or '-':>6}  {s['driver_peak_mb']:>9.0f}  "
            f"{s['tree_peak_mb']:>7.0f}  {s['processes']:>5}  {mean:>9.1f}  {s['wall_seconds']:>7.0f}"
        )
    if report["per_merchant_ms"] is not None:
        lines.append(f"per-merchant overhead: {report['per_merchant_ms']:.0f} ms a round (fitted, users held fixed)")
    if report["memory_ratio"] is not None:
        first, last = report["sizes"][0]["merchants"], report["sizes"][-1]["merchants"]
        lines.append(f"peak memory at {last} merchants / at {first}: {report['memory_ratio']:.2f}")
    return "\n".join(lines)
