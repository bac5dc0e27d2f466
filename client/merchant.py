"""One merchant's side of a round: train on the silo under its privacy ledger, or evaluate.

A Merchant holds its silo, split and model for as long as its process lives
(a SuperNode or a simulation actor may serve many rounds), and keeps what
must survive a restart in the silo's state folder: the privacy ledger, the
local item head and the released statistics (popularity prior, item
co-occurrence). What leaves: the update of the shared model (new − global:
LoRA tensors and calibration) every round and, once, where the coordinator
pools popularity, the released item counts keyed by a hash of each item's
text.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from client.ledger import PrivacyBudgetExceeded, PrivacyLedger
from client.node_config import NodeConfig
from common import atomic, distributed_dp
from common.arrays import pack, to_numpy, to_torch, unpack
from common.cooccurrence import pair_counts, release_top_cooccurrence
from common.errors import SecureAggregationError, SilorecError
from common.messages import SumSpec
from common.metrics import metrics_from_ranks, most_pop
from common.model_config import ModelConfig
from common.popularity import (
    accountant_entry,
    counts_over_keys,
    key_slots,
    prior_from_counts,
    prior_of,
    release_prior,
    text_keys,
)
from common.recommender import Recommender, build_recommender
from common.records import UserRecords
from common.round import RoundConfig
from common.serve import parse_scales, prior_scale_ranks, scaled_key
from common.silo import Silo, load_silo
from common.split import Split, split_silo
from common.storage import LOCAL_FILE
from common.text import item_texts
from common.train import clipped_gradient_sum, default_delta, train

TABLE_FILE = "popularity.safetensors"  # the silo's released item counts, keyed by item text: what it may pool
TIMING_FILE = (
    "timing.jsonl"  # seconds each federation step took this merchant: local only (it would tell its sample size)
)


@dataclass
class TrainOutcome:
    update: dict[str, np.ndarray] | None  # None: the merchant did not train (budget exhausted, no users)
    metrics: dict[str, float]
    reason: str = ""


class Merchant:
    """A silo, its state folder, and a recommender over its catalog."""

    def __init__(
        self,
        silo_dir: Path,
        state_dir: Path,
        model_cfg: ModelConfig,
        *,
        cache_dir: Path | None = None,
        cutoff: str = "",
        train_until: str = "",
    ) -> None:
        self.silo: Silo = load_silo(silo_dir)
        self.split: Split = split_silo(
            self.silo.interactions, self.silo.n_items, cutoff=cutoff, train_until=train_until
        )
        self.state_dir = Path(state_dir)
        self.model_cfg = model_cfg
        self.model: Recommender = build_recommender(
            model_cfg, list(self.silo.items["item_id"]), item_texts(self.silo.items), cache_dir=cache_dir
        )
        self.trainable_users = len(UserRecords(self.split))
        self.item_keys = text_keys(item_texts(self.silo.items))  # how other merchants' tables name our items
        self.most_pop = most_pop(self.split)  # fixed for the silo: computed once, not every round

    # --- state that stays in the silo ------------------------------------------

    def ledger(self, cfg: RoundConfig, budget: float | None) -> PrivacyLedger:
        delta = cfg.delta or default_delta(self.split.n_users)
        return PrivacyLedger.open(self.state_dir, budget=budget if budget is not None else cfg.epsilon, delta=delta)

    def release_statistics(self, cfg: RoundConfig, ledger: PrivacyLedger) -> None:
        """The silo's popularity prior (and co-occurrence), released once and kept in the state folder.

        The released counts are kept too, keyed by item text (TABLE_FILE),
        before the head: a crash in between leaves no prior, so the next
        round releases again (paying twice) rather than pooling nothing.
        """
        counts = release_statistics(self.model, self.split, cfg, ledger, run=cfg.run_id, round=cfg.round)
        if counts is not None:
            atomic.write_bytes(
                self.state_dir / TABLE_FILE, pack({"keys": self.item_keys, "counts": np.asarray(counts, np.float64)})
            )
            self.model.save_local(self.state_dir / LOCAL_FILE)

    def popularity_table(
        self, cfg: RoundConfig, *, budget: float | None = None
    ) -> tuple[dict[str, np.ndarray] | None, str]:
        """The silo's released item counts keyed by item text (releasing them first if it has not), or why there are none.

        Sharing them is post-processing of the release: it costs no ε.
        """
        if not cfg.private or cfg.prior_noise <= 0:
            return None, "this run releases no popularity"
        self.model.restore_local(self.state_dir)
        if not self.model.has_prior:
            self.release_statistics(cfg, self.ledger(cfg, budget))
            if not self.model.has_prior:
                return None, "the ε budget left cannot pay for the popularity release"
        table = released_table(self.state_dir)
        if table is None:
            return (
                None,
                f"the popularity was released without keeping its counts ({self.state_dir / TABLE_FILE} is missing)",
            )
        return table, ""

    def use_pooled_popularity(self, table: dict[str, np.ndarray]) -> None:
        """Score with the pooled counts of our items' texts (the coordinator's sum of every merchant's table) from now on."""
        prior = prior_of(table, self.item_keys)  # ValueError before anything changes if it is no table
        self.model.restore_local(self.state_dir)
        self.model.set_prior(prior)
        self.model.save_local(self.state_dir / LOCAL_FILE)

    # --- federation mode: shares of one sum over every merchant ------------------------

    def census(self) -> dict[str, np.ndarray]:
        """What a federation-mode coordinator asks first: how many users can train, and the keys of the item texts."""
        return {"users": np.array([self.trainable_users], np.int64), "keys": self.item_keys}

    def release_share(
        self, cfg: RoundConfig, spec: SumSpec, keys: np.ndarray, *, budget: float | None = None
    ) -> tuple[list[np.ndarray], dict[str, float]]:
        """This silo's share of the federation's popularity or co-occurrence release (`spec.task`) over the item-text
        `keys`, paid for in its ledger first.

        Popularity: each user's distinct keys, 1/√(how many) each.
        Co-occurrence: each user's pairs of `keys` items within WINDOW steps,
        scaled to norm 1. Either way one user moves the signal by at most 1 in
        L2 and every user counts: a spec that says otherwise is refused.
        """
        if spec.clip != 1.0 or spec.sample_rate != 1.0:
            raise SecureAggregationError(
                f"{self.silo.name}: a release counts every user with L2 norm 1, not clip {spec.clip:g} "
                f"and sample rate {spec.sample_rate:g} as announced; refusing it"
            )
        self._admit(cfg, spec, budget)
        keys = np.asarray(keys, np.uint64)
        if spec.task == "popularity":
            signal = counts_over_keys(self.split.train, self.item_keys, keys)
        else:  # histories over the chosen keys, every other item one index past them
            slots = key_slots(self.item_keys, keys)
            slots = np.where(slots >= 0, slots, len(keys))
            signal = pair_counts(
                [slots[np.asarray(h, np.int64)] for h in self.split.train], np.arange(len(keys)), len(keys) + 1
            )
        return self._share(cfg, spec, {spec.names[0]: signal}, what=spec.task, budget=budget)

    def use_pooled_neighbours(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Score with the federation's released co-occurrence among its items (`keys`, `matrix`) from now on."""
        keys, matrix = np.asarray(arrays["keys"]), np.asarray(arrays["matrix"], np.float32)
        if keys.dtype != np.uint64 or matrix.shape != (len(keys), len(keys)):
            raise ValueError(
                f"co-occurrence needs uint64 keys and a square matrix over them, not {keys.dtype} and {matrix.shape}"
            )
        first = {}  # an item text of several catalog items names the first of them
        for index, key in enumerate(self.item_keys.tolist()):
            first.setdefault(key, index)
        mine = [k for k, key in enumerate(keys.tolist()) if key in first]
        self.model.restore_local(self.state_dir)
        self.model.set_neighbours([first[int(keys[k])] for k in mine], matrix[np.ix_(mine, mine)])
        self.model.save_local(self.state_dir / LOCAL_FILE)

    def gradient_share(
        self, global_arrays: dict[str, np.ndarray], cfg: RoundConfig, spec: SumSpec, *, budget: float | None = None
    ) -> tuple[list[np.ndarray], dict[str, float]]:
        """This silo's share of one federation DP-SGD step: its Poisson-sampled users' clipped gradient sum plus noise.

        The announced noise and sample rate are checked against this silo's
        own budget (and recorded) before anything is computed from its users.
        """
        t0 = time.perf_counter()
        self.set_global(global_arrays)
        try:  # what the federation steps, whatever this merchant holds of the releases (their weights' gradient is then 0)
            self.model.set_trained(spec.names)
        except KeyError as e:
            raise SecureAggregationError(
                f"{self.silo.name}: the coordinator steps a tensor this model lacks ({e}); "
                "coordinator and merchant must run the same silorec version"
            ) from None
        self._admit(cfg, spec, budget)
        records = UserRecords(self.split, seed=cfg.seed, next_items=cfg.next_items, cut=cfg.cut)
        records.set_epoch(cfg.round)  # a fresh cut point per user and round
        rng = np.random.default_rng(secrets.randbits(128))  # the sample must be secret: amplification assumes it
        picked = np.flatnonzero(rng.random(len(records)) < spec.sample_rate)
        train_cfg = replace(cfg.train(noise_multiplier=None, delta=None), max_grad_norm=spec.clip)
        signal = clipped_gradient_sum(self.model, [records[int(i)] for i in picked], train_cfg)
        arrays, metrics = self._share(
            cfg, spec, {n: signal[n] for n in spec.names}, what="train", budget=budget, rng=rng
        )
        # how long it took tells how many users were sampled, which must stay secret: kept here, never sent
        with open(self.state_dir / TIMING_FILE, "a") as log:
            log.write(
                json.dumps({"run": cfg.run_id, "round": cfg.round, "seconds": round(time.perf_counter() - t0, 4)})
                + "\n"
            )
        return arrays, metrics

    def _admit(self, cfg: RoundConfig, spec: SumSpec, budget: float | None) -> None:
        """SecureAggregationError unless the announced step fits this silo's own budget."""
        if cfg.private:
            try:
                self.ledger(cfg, budget).admit(spec.noise_multiplier, spec.sample_rate)
            except (PrivacyBudgetExceeded, ValueError) as e:
                raise SecureAggregationError(f"{self.silo.name} refuses the round: {e}") from None

    def _share(
        self,
        cfg: RoundConfig,
        spec: SumSpec,
        signal: dict[str, np.ndarray],
        *,
        what: str,
        budget: float | None,
        rng: np.random.Generator | None = None,
    ) -> tuple[list[np.ndarray], dict[str, float]]:
        """`signal` as this merchant's noise share on the spec's lattice, recorded in the ledger before it leaves."""
        lattice = spec.lattice
        dim = int(sum(a.size for a in signal.values()))
        try:
            lattice.check_share(spec.noise_multiplier, spec.clip, dim, spec.min_replies)
        except distributed_dp.LatticeError as e:
            raise SecureAggregationError(f"{self.silo.name}: {e}") from None
        std = lattice.share_std(spec.noise_multiplier, spec.clip, dim, spec.min_replies) if cfg.private else 0.0
        share = distributed_dp.encode(signal, lattice, std, rng=rng)
        metrics: dict[str, float] = {"users": float(self.trainable_users)}
        if cfg.private:
            ledger = self.ledger(cfg, budget)
            total = ledger.record(
                run=cfg.run_id,
                round=cfg.round,
                noise_multiplier=spec.noise_multiplier,
                sample_rate=spec.sample_rate,
                steps=1,
                what=what,
            )
            metrics |= {"epsilon-total": total, "delta": ledger.delta, "noise-multiplier": spec.noise_multiplier}
        return [share[n] for n in spec.names], metrics

    # --- a round --------------------------------------------------------------------

    def set_global(self, global_arrays: dict[str, np.ndarray]) -> None:
        self.model.load_shared_state(to_torch(global_arrays))
        # The state folder, not this process, holds the latest head: a simulation may serve this
        # silo from another actor in the next round, so read it every time.
        self.model.restore_local(self.state_dir)

    def train_round(
        self, global_arrays: dict[str, np.ndarray], cfg: RoundConfig, *, budget: float | None = None
    ) -> TrainOutcome:
        """Train from the global adapter; return the update and metrics, or why there is none."""
        self.set_global(global_arrays)
        shared_before = to_numpy(self.model.shared_state())
        users = self.trainable_users
        base = {"users": float(users), "budget-exhausted": 0.0}
        if users == 0:
            return TrainOutcome(None, base | {"no-users": 1.0}, "no user with two or more training interactions")
        noise, delta, ledger, spent_before = None, None, None, 0.0
        if cfg.private:
            ledger = self.ledger(cfg, budget)
            spent_before = ledger.spent()
        if ledger is not None and cfg.prior_noise > 0 and not self.model.has_prior:
            self.release_statistics(cfg, ledger)
        if ledger is not None:
            sample_rate = min(1.0, cfg.batch_size / users)
            steps = cfg.local_epochs * max(1, math.ceil(users / cfg.batch_size))
            try:
                noise = ledger.plan(
                    sample_rate=sample_rate, steps_per_round=steps, rounds_left=cfg.rounds - cfg.round + 1
                )
            except PrivacyBudgetExceeded as e:
                metrics = base | {"budget-exhausted": 1.0, "epsilon-total": spent_before, "epsilon-round": 0.0}
                return TrainOutcome(None, metrics, str(e))
            delta = ledger.delta
        result = train(self.model, self.split, cfg.train(noise_multiplier=noise, delta=delta), progress=False)
        metrics = base | {
            "loss": float(result.losses[-1]) if result.losses else float("nan"),
            "steps": float(result.steps),
        }
        if ledger is not None:
            total = ledger.record(
                run=cfg.run_id,
                round=cfg.round,
                noise_multiplier=result.noise_multiplier,
                sample_rate=result.sample_rate,
                steps=result.steps,
            )
            metrics |= {
                "epsilon-total": total,
                "epsilon-round": total - spent_before,
                "delta": ledger.delta,
                "noise-multiplier": result.noise_multiplier,
            }
        self.model.save_local(self.state_dir / LOCAL_FILE)
        shared_after = to_numpy(self.model.shared_state())
        update = {k: shared_after[k] - shared_before[k] for k in shared_after}
        return TrainOutcome(update, metrics)

    @torch.no_grad()
    def evaluate(self, global_arrays: dict[str, np.ndarray], cfg: RoundConfig) -> dict[str, float]:
        """Full-ranking metrics of the global adapter (with this silo's head) on `cfg.split`, and MostPop's."""
        self.set_global(global_arrays)
        cases = self.split.test if cfg.split == "test" else self.split.valid
        scales = parse_scales(cfg.score_scales)
        # one pass of the user tower serves the model as it is (×1) and every factor asked for
        ranks = prior_scale_ranks(self.model, cases, (1.0, *scales))
        ours = metrics_from_ranks(ranks[1.0]) | {scaled_key(k): metrics_from_ranks(ranks[k])["ndcg@10"] for k in scales}
        pop = self.most_pop["test" if cfg.split == "test" else "valid"]
        out = {k: float(v) for k, v in ours.items() if k != "users"}
        out |= {f"most-pop-{k}": float(v) for k, v in pop.items() if k != "users"}
        out["users"] = float(len(cases))
        return out


def release_statistics(
    model: Recommender, split: Split, cfg: RoundConfig, ledger: PrivacyLedger, *, run: str, round: int
) -> np.ndarray | None:
    """Release the split's popularity prior, then (with `cfg.cooccurrence_noise`) its co-occurrence, into `model`.

    Each release is recorded in `ledger` before the caller keeps it or trains
    with it: a crash in between costs ε, never an unaccounted release.
    Returns the released item counts (catalog order), or None if the budget
    cannot pay for the prior; the co-occurrence is left out if it alone
    cannot be paid for.
    """
    if ledger.cost(*accountant_entry(cfg.prior_noise)) >= ledger.budget:
        return None
    counts = release_prior(split.train, len(model.item_ids), cfg.prior_noise)
    noise, rate, steps = accountant_entry(cfg.prior_noise)
    ledger.record(run=run, round=round, noise_multiplier=noise, sample_rate=rate, steps=steps, what="popularity")
    model.set_prior(prior_from_counts(counts))
    if cfg.cooccurrence_noise > 0 and ledger.cost(*accountant_entry(cfg.cooccurrence_noise)) < ledger.budget:
        released = release_top_cooccurrence(model.prior.cpu().numpy(), split.train, cfg.cooccurrence_noise)
        noise, rate, steps = accountant_entry(cfg.cooccurrence_noise)
        ledger.record(run=run, round=round, noise_multiplier=noise, sample_rate=rate, steps=steps, what="cooccurrence")
        model.set_neighbours(*released)
    return counts


def released_table(state_dir: Path) -> dict[str, np.ndarray] | None:
    """The item counts a silo released, keyed by item text ({"keys", "counts"}), if it kept them."""
    path = Path(state_dir) / TABLE_FILE
    return unpack(path.read_bytes()) if path.is_file() else None


# Merchants built in this process, most recently used last. A simulation actor serves many silos in
# turn and each Merchant holds its own encoder (~90 MB for MiniLM), so the cache is bounded: an
# evicted merchant is rebuilt from its silo and state folder, which hold everything it needs.
_MERCHANTS: OrderedDict[tuple, Merchant] = OrderedDict()


def merchants_per_process() -> int:
    """How many merchants one process keeps built ($SILOREC_MERCHANTS_PER_PROCESS, default 16)."""
    raw = os.environ.get("SILOREC_MERCHANTS_PER_PROCESS", "16")
    try:
        value = int(raw)
    except ValueError:
        raise SilorecError(f"SILOREC_MERCHANTS_PER_PROCESS must be a whole number ≥ 1, not {raw!r}") from None
    if value < 1:
        raise SilorecError(f"SILOREC_MERCHANTS_PER_PROCESS must be a whole number ≥ 1, not {raw!r}")
    return value


def merchant_for_node(node: NodeConfig, cfg: RoundConfig) -> Merchant:
    """This node's Merchant, from its parsed node config and the round's config."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return merchant_for(
        node.silo(cfg.silos_dir),
        node.state(cfg.silos_dir),
        cfg.model(),
        cache_dir=node.cache(cfg.silos_dir),
        cutoff=cfg.cutoff,
        train_until=cfg.train_until,
    )


def state_path(node_config: Mapping, silo: Path) -> Path:
    """Where the node of `silo` keeps its ledger, key and local state."""
    return NodeConfig.parse(node_config | {"data-path": str(silo)}).state()


def merchant_for(
    silo_dir: Path,
    state_dir: Path,
    model_cfg: ModelConfig,
    *,
    cache_dir: Path | None = None,
    cutoff: str = "",
    train_until: str = "",
) -> Merchant:
    """This process's Merchant for a silo: built once while it stays among the most recently used
    (`merchants_per_process`), since loading BERT costs seconds."""
    key = (str(Path(silo_dir).resolve()), str(Path(state_dir).resolve()), repr(model_cfg), cutoff, train_until)
    if key in _MERCHANTS:
        _MERCHANTS.move_to_end(key)
        return _MERCHANTS[key]
    merchant = Merchant(silo_dir, state_dir, model_cfg, cache_dir=cache_dir, cutoff=cutoff, train_until=train_until)
    _MERCHANTS[key] = merchant
    while len(_MERCHANTS) > merchants_per_process():
        _MERCHANTS.popitem(last=False)
    return merchant
