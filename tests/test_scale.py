"""The scale benchmark's parts: memory sampling of a process tree, and the per-merchant overhead's fit."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from simulations.scale import Peak, per_merchant_ms, table, watch


def test_the_sampler_sees_the_memory_of_a_child_of_the_watched_process():
    # the watched process holds little; the child it starts holds about 300 MB for two seconds
    child = "import time; x = bytearray(300 * 2**20); x[::4096] = b'1' * len(x[::4096]); time.sleep(2)"
    parent = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}])"
    proc = subprocess.Popen([sys.executable, "-c", parent])
    peak, stop = Peak(), threading.Event()
    sampler = threading.Thread(target=watch, args=(proc.pid, stop, peak))
    sampler.start()
    proc.wait()
    stop.set()
    sampler.join()
    assert peak.processes >= 2
    assert peak.tree_mb >= 300 > peak.driver_mb


def test_the_per_merchant_overhead_is_the_slope_of_round_seconds_against_merchants():
    sizes = [
        {"merchants": 10, "took_part": 10, "round_seconds": [5.0, 5.2]},  # mean 5.1
        {"merchants": 100, "took_part": 100, "round_seconds": [14.1]},
        {"merchants": 1000, "took_part": 990, "round_seconds": [103.1]},  # who took part, not who was asked
    ]
    assert per_merchant_ms(sizes) == pytest.approx(100.0, rel=1e-3)
    assert per_merchant_ms(sizes[:1]) is None  # one size has no slope
    rows = [s | {"users": 943, "driver_peak_mb": 900.0, "tree_peak_mb": 3000.0, "processes": 6} for s in sizes]
    text = table({"sizes": [r | {"wall_seconds": 60.0} for r in rows], "per_merchant_ms": 100.0, "memory_ratio": 1.0})
    assert "per-merchant overhead: 100 ms a round" in text and "at 1000 merchants / at 10: 1.00" in text
