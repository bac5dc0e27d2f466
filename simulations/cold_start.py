"""Cold-start items: how well a model trained before a product existed recommends it once it is added.

The items first seen in the last `share` of the timeline are the "new"
products. Training sees a silo without them: not in the items file, no
interaction. The trained adapter is then served over the whole catalog, as
`SiloRecommender` serves a catalog that grew: a new item's vector is
computed from its text, its popularity prior is the median of the released
items' (`Recommender.unreleased_prior`) and its head is zero. It is scored on the test cases (each user's
last interaction, docs/eval.md) whose target is a new item, against MostPop and
ItemKNN fitted on the same training interactions, which give a never-seen item
no score (ties count against a model, so both rank it last: 0 by construction).

It is not a time cut: the old items' interactions after the cutoff stay in
training, as a shop's do when it adds a product to a running catalog. Only
the new products are unknown to training.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common import atomic
from common.errors import SilorecError
from common.metrics import ScoreFn, metrics_from_ranks, most_pop_scorer, ranks_of
from common.silo import Silo, load_silo, write_silo
from common.split import EvalCase, leave_one_out

REPORT = "cold_start.json"


def new_items(silo: Silo, share: float) -> np.ndarray:
    """Catalog indices of the items whose first interaction falls in the last `share` of the timeline."""
    if not 0 < share < 1:
        raise ValueError(f"share must be in (0, 1), not {share}")
    stamps = silo.interactions["timestamp"].to_numpy(dtype=np.int64)
    cutoff = np.quantile(stamps, 1 - share)
    first = silo.interactions.groupby("item")["timestamp"].min()
    return np.sort(first.index[first.to_numpy() >= cutoff].to_numpy(dtype=np.int64))


def write_without(silo: Silo, new: np.ndarray, folder: Path) -> None:
    """The silo as it was before the new products existed: without them and without their interactions."""
    is_new = np.zeros(silo.n_items, dtype=bool)
    is_new[new] = True
    items = silo.items[~is_new].reset_index(drop=True)
    interactions = silo.interactions[~is_new[silo.interactions["item"].to_numpy()]]
    write_silo(folder, items, interactions[["user_id", "item_id", "timestamp"]].reset_index(drop=True), silo.users)


def item_knn_scorer(train: Sequence[np.ndarray], n_items: int) -> ScoreFn:
    """ItemKNN: Σ over the history of the cosine between items' user vectors (training interactions, binary)."""
    users = np.repeat(np.arange(len(train)), [len(h) for h in train])
    items = np.concatenate(train) if train else np.zeros(0, dtype=np.int64)
    dense = torch.zeros(len(train), n_items)
    dense[torch.as_tensor(users), torch.as_tensor(items)] = 1.0
    norms = dense.sum(0).sqrt().clamp(min=1e-12)
    similarity = (dense.T @ dense) / norms[:, None] / norms[None, :]
    similarity.fill_diagonal_(0.0)

    def score(batch: list[EvalCase]) -> torch.Tensor:
        out = torch.zeros(len(batch), n_items)
        for r, case in enumerate(batch):
            if len(case.history):
                out[r] = similarity[torch.as_tensor(np.unique(case.history))].sum(0)
        return out

    return score


def cold_start_report(
    adapter_dir: Path, silo: Silo, before: Silo, new: np.ndarray, *, cache_dir: Path | None = None
) -> dict[str, Any]:
    """silorec, MostPop and ItemKNN on the test cases of `silo` whose target is new, and on the others.

    The baselines are fitted on exactly what the model trained on: the
    training histories of `before`, the silo without the new items.
    """
    from common.serve import load_for_silo, scorer

    split = leave_one_out(silo.interactions, silo.n_items)
    is_new = np.zeros(silo.n_items, dtype=bool)
    is_new[new] = True
    where = {item: i for i, item in enumerate(silo.items["item_id"])}
    to_full = np.array([where[item] for item in before.items["item_id"]], dtype=np.int64)
    trained = leave_one_out(before.interactions, before.n_items)
    train = [to_full[h] for h in trained.train]
    model = load_for_silo(adapter_dir, silo, cache_dir=cache_dir)
    scorers: dict[str, ScoreFn] = {
        "silorec": scorer(model),
        "MostPop": most_pop_scorer(replace(trained, train=train, n_items=silo.n_items)),
        "ItemKNN": item_knn_scorer(train, silo.n_items),
    }
    cases = {
        "new": [c for c in split.test if is_new[c.target]],
        "old": [c for c in split.test if not is_new[c.target]],
    }
    report: dict[str, Any] = {
        "new_items": int(len(new)),
        "catalog": silo.n_items,
        "test_targets": {k: len(v) for k, v in cases.items()},
        "random_hr@10": 10 / silo.n_items,
    }
    for which, group in cases.items():
        report[which] = {}
        for name, score in scorers.items():
            ranks = ranks_of(score, group)
            report[which][name] = metrics_from_ranks(ranks) | {
                "median_rank": float(np.median(ranks)) if len(ranks) else None
            }
    return report


def run_cold_start(
    data: Path,
    out: Path,
    *,
    share: float,
    options: Sequence[str],
    cache_dir: Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Hold out the new products, train `silorec-sim central` without them, and score them once added."""
    atomic.check_apart(out, {"--data": data})
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; choose another --out")
    silo = load_silo(data)
    new = new_items(silo, share)
    if not len(new):
        raise SilorecError(f"{data}: no item is first seen in the last {share:.0%} of the timeline")
    out.mkdir(parents=True, exist_ok=True)
    atomic.mark(out, "silorec-sim cold-start")
    before, run = out / "before", out / "run"
    write_without(silo, new, before)
    log(f"{len(new):,} of {silo.n_items:,} items are first seen in the last {share:.0%} of the timeline: held out")
    cmd = [sys.executable, "-m", "simulations.cli", "central", "--data", str(before), "--out", str(run), *options]
    log("training without them: " + " ".join(cmd[2:]))
    started = time.perf_counter()
    with open(out / "training.log", "wb") as sink:
        done = subprocess.run(cmd, stdout=sink, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SilorecError(f"training failed (exit {done.returncode}); see {out / 'training.log'}")
    report = cold_start_report(run / "adapter", silo, load_silo(before), new, cache_dir=cache_dir)
    metrics = json.loads((run / "metrics.json").read_text())
    report |= {
        "share": share,
        "training_command": cmd[2:],
        "epsilon": metrics.get("epsilon"),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    atomic.write_json(out / REPORT, report)
    return report


def rescore_cold_start(data: Path, out: Path, *, cache_dir: Path | None = None) -> dict[str, Any]:
    """Score an earlier cold-start run's adapter again with this version's serving (no training).

    The earlier report is kept as cold_start.previous.json.
    """
    previous = json.loads((out / REPORT).read_text())
    silo = load_silo(data)
    new = new_items(silo, previous["share"])
    report = cold_start_report(out / "run" / "adapter", silo, load_silo(out / "before"), new, cache_dir=cache_dir)
    report |= {k: previous[k] for k in ("share", "training_command", "epsilon", "wall_seconds")}
    atomic.write_json(out / "cold_start.previous.json", previous)
    atomic.write_json(out / REPORT, report)
    return report


def table(report: dict[str, Any]) -> str:
    """The report as the command prints it."""
    lines = [
        f"{'test targets':<28}{'users':>7}  {'model':<9}{'HR@10':>8}{'NDCG@10':>9}{'median rank':>13}",
    ]
    for which, label in (("new", "new items (never trained on)"), ("old", "items seen in training")):
        for model, m in report[which].items():
            median = "" if m["median_rank"] is None else f"{m['median_rank']:,.0f}"
            lines.append(f"{label:<28}{m['users']:>7,}  {model:<9}{m['hr@10']:>8.4f}{m['ndcg@10']:>9.4f}{median:>13}")
            label = ""
    eps = report.get("epsilon")
    lines.append(
        f"{report['new_items']:,} new of {report['catalog']:,} items; random HR@10 {report['random_hr@10']:.4f}; "
        f"training ε {'∞ (no DP)' if eps is None or math.isinf(eps) else f'{eps:.2f}'}"
    )
    return "\n".join(lines)
