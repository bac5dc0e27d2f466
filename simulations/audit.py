"""A one-run privacy audit (Steinke, Nasr and Jagielski, 2023) of a federation, in either privacy mode, or of the
centralised model.

- Canaries: m extra users, each a random history of `HISTORY` catalog items
  followed `REPEATS` times by its own target, then two items the split keeps
  for validation and test. Each target is a product of its own that planting
  adds to the catalog whether or not its canary is planted, so no other user
  ever bought it: the rarest next item there is. Each canary is planted with
  probability ½ by a coin the auditor draws from the OS and reveals only in
  OUT/audit.json, after training. A canary is a whole user: the unit of
  privacy.
- Training: the real command (`silorec-sim run`, or `central`) on the planted
  data, in a subprocess, with the settings it is given.
- Scoring, from what leaves the silos and nothing else:
  - "release": where the run releases item popularity to others (federation
    mode, whose pooled counts the coordinator sums and every merchant holds,
    and the central model, whose adapter carries its prior), the released
    prior of the canary's target. Its target's count is zero but for its
    canary, so this is the most direct trace one user leaves in anything
    released: one coordinate of a Gaussian release that the canary moves by
    1/√(HISTORY + 1), its whole L2 share.
  - "association": in silo mode, where only the adapter and calibration leave
    a silo, how much more likely the shared model finds the target after the
    canary's own history than after the other canaries' histories (mean
    log-probability), minus the same under the untrained model (the public,
    seeded start). Comparing the target with itself under other histories
    cancels what training did to the item for everyone (its popularity, the
    calibration); comparing with the start cancels what the text said of the
    pair before training. It is recorded in every mode. It is the weaker
    signal: a text user tower trained by a few clipped steps barely
    memorises one user (AUC 0.45–0.55 at these settings, even without DP).
- Guesses: "in" for the `guesses` highest scores, "out" for the `guesses`
  lowest; the number right gives the empirical lower bound on ε
  (`common.audit.epsilon_lower_bound`, 95% confidence, with the run's δ).
"""

from __future__ import annotations

import json
import math
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from common import atomic
from common.audit import LEVEL, epsilon_lower_bound
from common.errors import SilorecError
from common.silo import STATE_DIR, Silo, load_silo, write_silo

HISTORY = 4  # random catalog items a canary has seen before its target: few, so its target's count share is large
REPEATS = 3  # times its target follows them: every training record that cuts before it has it among its next items
AUDIT_FILE = "audit.json"


@dataclass(frozen=True)
class AuditSpec:
    data: Path
    out: Path
    canaries: int = 200
    guesses: int = 0  # each side; 0: a tenth of the canaries
    central: bool = False  # audit `silorec-sim central` instead of a federation
    options: Sequence[str] = field(default_factory=tuple)  # the training command's own options

    @property
    def per_side(self) -> int:
        return self.guesses or max(1, self.canaries // 10)


@dataclass(frozen=True)
class Canary:
    user_id: str
    history: tuple[int, ...]  # catalog indices (of the planted catalog), oldest first
    target: int  # the planted catalog's index of the canary's own product
    included: bool


def draw_canaries(silo: Silo, m: int, rng: np.random.Generator) -> list[Canary]:
    """m canaries over `silo`'s catalog, each included by a fair coin of `rng`; canary i's target is the i-th
    product `canary_items` appends to the catalog."""
    taken = set(silo.interactions["user_id"].astype(str))
    out = []
    for i in range(m):
        user = f"canary-{i:05d}-{secrets.token_hex(3)}"
        if user in taken:
            raise SilorecError(f"{silo.root}: a user is already named {user}; rename it to audit this silo")
        history = rng.choice(silo.n_items, size=min(HISTORY, silo.n_items), replace=False)
        out.append(Canary(user, tuple(int(x) for x in history), silo.n_items + i, bool(rng.random() < 0.5)))
    return out


def canary_items(silo: Silo, m: int, rng: np.random.Generator) -> pd.DataFrame:
    """m new products, one per canary: a title of random words from the catalog's titles (no existing item text),
    the other fields of a random catalog item."""
    items = silo.items
    words = sorted({w for title in items["title"] for w in str(title).split() if w.isalpha()}) or ["item"]
    existing = set(items["item_id"].astype(str))
    rows = items.iloc[rng.integers(0, len(items), size=m)].copy()
    ids = [f"canary-item-{i:05d}-{secrets.token_hex(3)}" for i in range(m)]
    if existing & set(ids):
        raise SilorecError(f"{silo.root}: an item id is already canary-item-…; rename it to audit this silo")
    rows["item_id"] = ids
    rows["title"] = [" ".join(rng.choice(words, size=3)) + f" {i:05d}" for i in range(m)]
    return rows.reset_index(drop=True)


def plant(silo: Silo, canaries: Sequence[Canary], folder: Path, rng: np.random.Generator) -> None:
    """Write `silo` with every canary's product added to the catalog and the included canaries added as users
    (each at a random existing user's ZIP code)."""
    catalog = pd.concat([silo.items, canary_items(silo, len(canaries), rng)], ignore_index=True)
    items = catalog["item_id"].astype(str).to_numpy()
    start = int(np.median(silo.interactions["timestamp"].to_numpy()))
    rows = []
    for c in canaries:
        if not c.included:
            continue
        tail = rng.choice(silo.n_items, size=2)  # what the split keeps for validation and test
        sequence = [*c.history, *([c.target] * REPEATS), *(int(x) for x in tail)]
        for k, item in enumerate(sequence):
            rows.append({"user_id": c.user_id, "item_id": items[item], "timestamp": start + k * 3_600_000_000_000})
    interactions = pd.concat([silo.interactions[["user_id", "item_id", "timestamp"]], pd.DataFrame(rows)])
    users = silo.users
    if users is not None and "zip_code" in users.columns and len(users):
        zips = users["zip_code"].to_numpy()
        planted = pd.DataFrame({"user_id": [c.user_id for c in canaries if c.included]})
        planted["zip_code"] = zips[rng.integers(0, len(zips), size=len(planted))]
        users = pd.concat([users[["user_id", "zip_code"]], planted], ignore_index=True)
    write_silo(folder, catalog, interactions.reset_index(drop=True), users)


def training_command(spec: AuditSpec, data: Path, out: Path) -> list[str]:
    sim = [sys.executable, "-m", "simulations.cli"]
    verb = ["central"] if spec.central else ["run"]
    return sim + verb + ["--data", str(data), "--out", str(out), *spec.options]


def canary_scores(adapter_dir: Path, silo: Silo, canaries: Sequence[Canary]) -> np.ndarray:
    """Each canary's association of its target with its own history, released model minus untrained start.

    `silo` is the planted data: its catalog holds the canaries' products.
    """
    from common.recommender import build_recommender
    from common.storage import load_model_config
    from common.text import item_texts

    cfg = load_model_config(adapter_dir)
    ids, texts = list(silo.items["item_id"]), item_texts(silo.items)
    released = build_recommender(cfg, ids, texts, adapter_dir=adapter_dir)
    released.set_prior(np.zeros(len(ids)))  # the shared model alone: a merchant's own statistics never leave it
    released.set_neighbours(np.zeros(0, dtype=np.int64), np.zeros((0, 0)))
    start = build_recommender(cfg, ids, texts)
    return association(released, canaries) - association(start, canaries)


def released_prior(run: Path, metrics: dict[str, Any]) -> tuple[dict[str, float], str] | None:
    """The popularity prior that `run` released to others, by item id, and whose it is; None where it released none.

    Federation mode: the pooled release every merchant was handed (read from
    the first merchant's state: they all hold the same counts of the same
    texts). A central run: its adapter's own prior. Silo mode: none, each
    merchant's release stays in its silo.
    """
    from common.storage import load_local, local_file

    mode = (metrics.get("privacy") or {}).get("mode")
    if mode == "federation":
        silos = sorted(p for p in (run / "silos").iterdir() if p.is_dir() and not p.name.startswith("."))
        folders = [(p / STATE_DIR, f"the pooled release held by {p.name}") for p in silos]
    elif mode is None:  # a central run reports no privacy mode
        folders = [(run / "adapter", "the central adapter's prior")]
    else:
        return None
    for folder, whose in folders:
        path = local_file(folder)
        if path is None:
            continue
        state, item_ids = load_local(path)
        if "prior" in state:
            return dict(zip(item_ids, state["prior"].double().reshape(-1).tolist())), whose
    return None


def association(model, canaries: Sequence[Canary]) -> np.ndarray:
    """log p(tᵢ | hᵢ) − mean over j ≠ i of log p(tᵢ | hⱼ), for each canary i (history hᵢ, target tᵢ)."""
    import torch

    from common.serve import score_histories

    histories = [np.array(c.history) for c in canaries]
    targets = torch.as_tensor([c.target for c in canaries])
    logits = torch.cat([score_histories(model, histories[i : i + 64]) for i in range(0, len(histories), 64)])
    at = torch.log_softmax(logits.double(), dim=1)[:, targets]  # at[j, i] = log p(tᵢ | hⱼ)
    own = at.diagonal()
    others = (at.sum(0) - own) / max(len(canaries) - 1, 1)
    return (own - others).numpy()


def guess(scores: np.ndarray, per_side: int) -> dict[int, bool]:
    """Canary index → guess ("in": True) for the `per_side` highest and lowest scores; the rest abstain."""
    order = np.argsort(-scores, kind="stable")
    per_side = min(per_side, len(scores) // 2)
    return {int(i): True for i in order[:per_side]} | {int(i): False for i in order[len(order) - per_side :]}


def claimed(metrics: dict[str, Any]) -> tuple[float, float]:
    """(ε, δ) the trained run claims: the federation's, the weakest silo's, or the central model's; ∞ without DP.

    In silo mode each merchant has its own δ (below 1/its users): a canary is
    protected by its merchant's, so the bound takes the largest ε and δ.
    """
    privacy = metrics.get("privacy") or {}  # a federated run's; a central run reports ε and δ at the top
    if privacy.get("mode") == "silo":
        epsilon = metrics.get("epsilon_max")
        deltas = [m["delta"] for m in metrics.get("merchants", []) if m.get("delta") is not None]
        delta = max(deltas) if deltas else None
    else:
        epsilon = privacy.get("epsilon", metrics.get("epsilon"))
        delta = privacy.get("delta", metrics.get("delta"))
    return (math.inf if epsilon is None else float(epsilon)), (0.0 if delta is None else float(delta))


def run_audit(spec: AuditSpec, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Plant, train, score and bound; writes OUT/audit.json and the audit into the adapter's model card."""
    atomic.check_apart(spec.out, {"--data": spec.data})
    if spec.out.exists() and any(spec.out.iterdir()):
        raise FileExistsError(f"{spec.out} is not empty; choose another --out or pass --force to replace an audit")
    silo = load_silo(spec.data)
    if spec.canaries < 2:
        raise SilorecError(f"an audit needs at least 2 canaries, not {spec.canaries}")
    rng = np.random.default_rng(secrets.randbits(64))  # the coins stay the auditor's until training is done
    canaries = draw_canaries(silo, spec.canaries, rng)
    spec.out.mkdir(parents=True, exist_ok=True)
    atomic.mark(spec.out, "silorec-sim audit")
    planted, run = spec.out / "data", spec.out / "run"
    plant(silo, canaries, planted, rng)
    log(f"planted {sum(c.included for c in canaries)} of {len(canaries)} canaries in {planted}")
    cmd = training_command(spec, planted, run)
    log("training: " + " ".join(cmd[2:]))
    started = time.perf_counter()
    with open(spec.out / "training.log", "wb") as sink:
        done = subprocess.run(cmd, stdout=sink, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SilorecError(f"training failed (exit {done.returncode}); see {spec.out / 'training.log'}")
    report = bound_report(run, load_silo(planted), canaries, spec.per_side) | {
        "training_command": cmd[2:],
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    write_report(spec.out, report)
    return report


def bound_report(run: Path, silo: Silo, canaries: Sequence[Canary], per_side: int) -> dict[str, Any]:
    """Score the canaries from what `run` released, guess, and bound ε: the audit's figures.

    `silo` is the planted data (its catalog holds the canaries' products).
    """
    metrics = json.loads((run / "metrics.json").read_text())
    epsilon, delta = claimed(metrics)
    associations = canary_scores(run / "adapter", silo, canaries)
    release = released_prior(run, metrics)
    ids = silo.items["item_id"].astype(str).tolist()
    priors = None if release is None else np.array([release[0].get(ids[c.target], np.nan) for c in canaries])
    if priors is not None and np.isnan(priors).any():
        raise SilorecError(f"{run}: the released prior misses {int(np.isnan(priors).sum())} canary products")
    scores, score = (associations, ASSOCIATION) if priors is None else (priors, RELEASE + f" ({release[1]})")
    guesses = guess(scores, per_side)
    right = sum(canaries[i].included == g for i, g in guesses.items())
    bound = epsilon_lower_bound(len(canaries), len(guesses), right, delta)
    return {
        "claimed_epsilon": None if math.isinf(epsilon) else epsilon,
        "delta": delta,
        "empirical_epsilon_lower_bound": bound,
        "confidence": 1 - LEVEL,
        "canaries": len(canaries),
        "included": sum(c.included for c in canaries),
        "guesses": len(guesses),
        "correct": right,
        "score": score,
        "association_auc": auc(associations, [c.included for c in canaries]),
        "release_auc": None if priors is None else auc(priors, [c.included for c in canaries]),
        "per_canary": [
            {
                "user_id": c.user_id,
                "history": list(c.history),
                "target": c.target,
                "target_id": ids[c.target],
                "included": c.included,
                "score": float(scores[i]),
                "association": float(associations[i]),
                "released_prior": None if priors is None else float(priors[i]),
                "guess": None if i not in guesses else ("in" if guesses[i] else "out"),
            }
            for i, c in enumerate(canaries)
        ],
    }


def auc(scores: np.ndarray, included: Sequence[bool]) -> float | None:
    """P(an included canary outscores an excluded one), ties counting ½; None without both kinds."""
    scores, included = np.asarray(scores, np.float64), np.asarray(included, bool)
    ins, outs = scores[included], scores[~included]
    if not len(ins) or not len(outs):
        return None
    wins = (ins[:, None] > outs[None, :]).sum() + 0.5 * (ins[:, None] == outs[None, :]).sum()
    return float(wins / (len(ins) * len(outs)))


def write_report(out: Path, report: dict[str, Any]) -> None:
    atomic.write_json(out / AUDIT_FILE, report)
    card = out / "run" / "adapter" / "README.md"
    if card.is_file():
        text = card.read_text()
        text = text[: text.index(CARD_HEADING)] if CARD_HEADING in text else text  # one audit section: the latest
        atomic.write_bytes(card, (text + card_section(report)).encode())


def rescore(out: Path) -> dict[str, Any]:
    """Score an earlier audit's canaries again with this version's score, from its released adapter (no training).

    The earlier audit.json is kept as audit.previous.json. The coins were
    revealed by the earlier audit, so a score chosen after seeing them can be
    tuned to them: a re-scored bound is a check, and a power check re-scored
    should be confirmed by a fresh audit.
    """
    previous = json.loads((out / AUDIT_FILE).read_text())
    canaries = [Canary(c["user_id"], tuple(c["history"]), c["target"], c["included"]) for c in previous["per_canary"]]
    per_side = previous["guesses"] // 2
    report = bound_report(out / "run", load_silo(out / "data"), canaries, per_side)
    report |= {k: previous[k] for k in ("training_command", "wall_seconds") if k in previous}
    report["rescored_from"] = previous.get("score")
    atomic.write_json(out / "audit.previous.json", previous)
    write_report(out, report)
    return report


CARD_HEADING = "\n## Privacy audit\n"
ASSOCIATION = (
    "log p(target | own history) − mean log p(target | other canaries' histories), released adapter and calibration "
    "minus the untrained start"
)
RELEASE = "the released popularity prior of the canary's own product"


def card_section(report: dict[str, Any]) -> str:
    claimed_text = "none (no DP)" if report["claimed_epsilon"] is None else f"{report['claimed_epsilon']:.2f}"
    return (
        CARD_HEADING + "\n"
        f"A one-run audit (Steinke, Nasr and Jagielski, 2023) planted {report['canaries']} canary users, each with "
        f"probability ½, and guessed {report['guesses']} of them from what the run released (score: {report['score']}): "
        f"{report['correct']} right. Claimed ε {claimed_text} at δ={report['delta']:.0e}; empirical lower bound "
        f"{report['empirical_epsilon_lower_bound']:.2f} (95% confidence). A lower bound at or below the claim is "
        "consistent with it; one above it would show the claim wrong.\n"
    )


def summary_line(report: dict[str, Any]) -> str:
    claimed_text = "∞ (no DP)" if report["claimed_epsilon"] is None else f"{report['claimed_epsilon']:.2f}"
    return (
        f"claimed ε {claimed_text}, empirical lower bound {report['empirical_epsilon_lower_bound']:.2f} "
        f"(95% confidence): {report['correct']} of {report['guesses']} guesses right about {report['canaries']} "
        f"canaries ({report['included']} planted); scored by {report['score']}"
    )
