"""The coordinator's round loop, one for both privacy modes: start, then each round train, evaluate, checkpoint.

Described in docs/research.md ("Federated training"). What a round does to the global adapter is
the privacy mode's training, picked once by name (`TRAININGS`):

- `federation` (`FederationTraining`): round 0 takes the census and releases
  popularity and co-occurrence once for all merchants; each round is then one
  DP-SGD step over every merchant's users, summed through SecAgg+ with the
  noise split between merchants (`common.distributed_dp`), and the
  coordinator takes the optimiser step (`server.optimizer`), accounted once.
- `silo` (`SiloTraining`): each merchant trains local epochs under its own
  ledger and sends its update, sealed and screened (or, with
  secure-aggregation, masked by SecAgg+), and the coordinator averages them.

Every round ends with an atomic checkpoint, so `resume` continues from the
last complete round.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Context
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from peft import get_peft_model_state_dict

from common import accounting, atomic
from common.arrays import nbytes, to_numpy, to_record
from common.distributed_dp import Lattice, plan
from common.encoder import attach_adapter, load_encoder
from common.errors import SilorecError
from common.logs import log
from common.messages import SumSpec
from common.model_config import ModelConfig
from common.round import RoundConfig
from common.score import PRIOR_WEIGHT, initial_calibration, trained_names
from common.serve import best_scale, parse_scales, scale_prior_weight, scaled_key
from common.storage import load_model_config, read_adapter
from common.train import TrainConfig, default_delta
from server import checkpoint, report, sealing
from server.optimizer import GlobalOptimizer
from server.popularity import pool_popularity
from server.releases import Census, release_statistics, take_census
from server.secagg import SecureSum
from server.secagg import check as check_secure
from server.settings import ServerSettings
from server.strategy import RoundResult, ScreenedFedAvg, summarize_evaluation
from server.updates import spec_of


def run_federation(
    grid: Grid, context: Context, settings: ServerSettings, *, state_key: bytes | None = None
) -> dict[str, Any]:
    """Run (or resume) the federation described by `settings`; write its outputs; return the final metrics.

    `state_key` encrypts the run's sealing key at rest so that `resume` keeps it.
    """
    check_settings(settings)
    if not settings.round.private:
        log(
            WARNING, "no-dp = true: this run trains WITHOUT differential privacy; nothing it releases protects any user"
        )
    out = Path(settings.out_dir)
    ckpt_dir = out / "checkpoint"
    tower, initial, shared, ckpt = start_run(settings)
    envelope = sealing.envelope_for(settings, ckpt_dir, ckpt.run_id if ckpt else None, state_key=state_key)
    base = replace(settings.round, run_id=envelope.run_id, rounds=settings.rounds)
    tuning = prior_scales(settings)
    if tuning:  # valid evaluations also score each factor of the prior's weight
        base = replace(base, score_scales=",".join(f"{k:g}" for k in tuning))
    # round 0 waits for the merchants the run needs; later evaluations ask those online, since one lost
    # mid-run would leave FedAvg waiting for it for ever (its metrics then cover the merchants that answered)
    first = FedAvg(
        fraction_evaluate=1.0,
        min_evaluate_nodes=settings.min_fit_clients,
        min_available_nodes=settings.min_available_clients,
    )
    evaluator = FedAvg(fraction_evaluate=1.0, min_evaluate_nodes=1, min_available_nodes=1)
    secure = SecureSum(grid, context, settings, envelope) if settings.secure else None
    try:
        training = TRAININGS[settings.privacy](grid, settings, envelope, secure, shared)
        global_arrays = ckpt.global_arrays if ckpt else initial
        history: list[dict[str, Any]] = ckpt.history if ckpt else []
        if ckpt is not None:
            training.resume(replace(base, round=0), ckpt)
            for rnd in training.interrupted(ckpt.round):  # its step was committed, its sum never applied
                history.append(interrupted_line(rnd, training))
                report.write_rounds(out, history)
                checkpoint.save(
                    ckpt_dir, checkpoint.Checkpoint(envelope.run_id, rnd, global_arrays, history, *training.state())
                )
                log(WARNING, "round %d: %s", rnd, history[-1]["abandoned"])
        log(
            INFO,
            "silorec run %s (%s privacy): rounds %d..%d, %s",
            envelope.run_id,
            settings.privacy,
            ckpt.round + 1 if ckpt else 1,
            settings.rounds,
            training.describe(),
        )
        if not history:  # round 0: what the mode releases, and the untrained adapter with it
            zero = replace(base, round=0, split="valid")
            line = training.start(zero)
            valid, _ = evaluate_global(first, grid, global_arrays, training.configure(zero), envelope)
            history.append({"round": 0, "valid": valid} | line)
            checkpoint.save(
                ckpt_dir, checkpoint.Checkpoint(envelope.run_id, 0, global_arrays, history, *training.state())
            )
            log(
                INFO,
                "round 0 (%s): valid NDCG@10 %.4f",
                training.released(),
                valid.get("ndcg@10", float("nan")),
                round=0,
                rounds=settings.rounds,
                valid=valid.get("ndcg@10"),
                epsilon=None,
            )
        every = settings.eval_every or training.eval_every()
        for rnd in range(history[-1]["round"] + 1, settings.rounds + 1):
            t0 = time.perf_counter()
            cfg = training.configure(replace(base, round=rnd))
            before = (rnd - 1, global_arrays)
            global_arrays, line = training.round(
                cfg,
                global_arrays,
                lambda before=before: checkpoint.save(
                    ckpt_dir, checkpoint.Checkpoint(envelope.run_id, before[0], before[1], history, *training.state())
                ),
            )
            if rnd % every == 0 or rnd == settings.rounds:
                line["valid"], _ = evaluate_global(
                    evaluator, grid, global_arrays, replace(cfg, split="valid"), envelope
                )
            line["seconds"] = round(time.perf_counter() - t0, 2)
            history.append(line)
            report.write_rounds(out, history)
            checkpoint.save(
                ckpt_dir, checkpoint.Checkpoint(envelope.run_id, rnd, global_arrays, history, *training.state())
            )
            log_round(line, settings.rounds)
        if "valid" not in history[-1]:  # the last round was one stopped mid-way: the adapter is the one before it
            history[-1]["valid"], _ = evaluate_global(
                evaluator, grid, global_arrays, replace(training.configure(base), split="valid"), envelope
            )
            report.write_rounds(out, history)
        global_arrays, prior_weight = tune_prior_weight(global_arrays, history[-1]["valid"], tuning)
        test_cfg = replace(
            training.configure(base), round=settings.rounds, split="test", score_scales=""
        )  # test users choose nothing
        test, per_merchant = evaluate_global(evaluator, grid, global_arrays, test_cfg, envelope)
    finally:
        if secure is not None:
            secure.close()
    return finish_run(
        settings,
        base,
        tower,
        global_arrays,
        history,
        test,
        per_merchant,
        update_bytes=training.update_bytes(),
        extra={
            "privacy": training.summary(),
            "sealed": settings.seal_updates,
            "secure_aggregation": settings.secure,
            "prior_weight": prior_weight,
        },
    )


def check_settings(settings: ServerSettings) -> None:
    """Raise SilorecError for settings that cannot run together, before anything starts."""
    if settings.rounds < 1:
        raise SilorecError(f"num-server-rounds {settings.rounds}: a run needs at least one round")
    if settings.privacy == "federation":
        check_secure(settings)
        if settings.fraction_train != 1.0:
            raise SilorecError(
                f"fraction-train {settings.fraction_train:g}: in federation mode every merchant samples its own "
                "users at the federation's rate each round; it must be 1"
            )
        if settings.round.local_head != "none":
            raise SilorecError(
                f"local-head {settings.round.local_head!r}: federation mode trains only what the coordinator "
                'steps; a merchant-local item head needs privacy = "silo" (or local-head = "none")'
            )
        if settings.min_replies == 1 or settings.min_replies < 0:
            raise SilorecError(
                f"min-replies {settings.min_replies}: a secure sum needs 2 merchants or more (0: every merchant)"
            )
    elif settings.secure_aggregation:
        check_secure(settings)


def interrupted_line(rnd: int, training) -> dict[str, Any]:
    """metrics.jsonl's line for a round the coordinator stopped in after committing its step: spent, not applied."""
    return round_line(rnd, RoundResult(total=None)) | {
        "abandoned": "the coordinator stopped during this round after committing its step to the accountant; "
        "the step stays spent and the round is not rerun, so the run keeps to its planned ε",
        "epsilon_federation": training.epsilon(),
        "seconds": 0.0,
    }


def log_round(line: dict[str, Any], rounds: int) -> None:
    eps = max(line["epsilon"].values()) if line.get("epsilon") else None
    valid = line["valid"]["ndcg@10"] if "valid" in line else None
    done = line.get("abandoned") or f"{line['accepted']}/{line['merchants']} merchants"
    log(
        INFO,
        "round %d/%d: %s%s, %s, %.1f s",
        line["round"],
        rounds,
        done,
        f", valid NDCG@10 {valid:.4f}" if valid is not None else "",
        f"max ε {eps:.2f}" if eps is not None else "non-private",
        line["seconds"],
        round=line["round"],
        rounds=rounds,
        valid=valid,
        epsilon=eps,
    )


# --- silo mode: every merchant trains alone, the coordinator averages ---------------------------------


class SiloTraining:
    """Each merchant trains local epochs under its own noise; updates are sealed and screened, or summed by SecAgg+."""

    def __init__(
        self,
        grid: Grid,
        settings: ServerSettings,
        envelope: sealing.Envelope,
        secure: SecureSum | None,
        shared: dict[str, np.ndarray],
    ) -> None:
        self.grid, self.settings, self.envelope, self.secure, self.shared = grid, settings, envelope, secure, shared
        self.strategy = ScreenedFedAvg(spec_of(shared), settings, envelope)

    def describe(self) -> str:
        how = (
            "secure aggregation (SecAgg+): the coordinator sees only sums"
            if self.secure
            else f"aggregation {self.settings.aggregation}"
        )
        return f"update {nbytes(self.shared)} bytes ({len(self.shared)} tensors), {how}"

    def start(self, cfg: RoundConfig) -> dict[str, Any]:
        """Pool the merchants' own popularity releases, where the run does (never under SecAgg+)."""
        if self.settings.pool_popularity and cfg.private and cfg.prior_noise > 0 and self.secure is None:
            return {
                "pooled_popularity": pool_popularity(
                    self.grid,
                    self.envelope,
                    cfg,
                    min_nodes=self.settings.min_available_clients,
                    timeout=self.settings.round_timeout,
                )
            }
        return {}

    def interrupted(self, applied: int) -> list[int]:
        """None: a merchant's ledger records its own steps, and a rerun round is a new one it pays for."""
        return []

    def released(self) -> str:
        return "each merchant's own releases"

    def configure(self, cfg: RoundConfig) -> RoundConfig:
        return cfg

    def eval_every(self) -> int:
        return 1

    def round(
        self, cfg: RoundConfig, arrays: dict[str, np.ndarray], commit
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        rnd = cfg.round
        if self.secure is not None:
            spec = SumSpec(
                "update",
                tuple(sorted(self.shared)),
                min_replies=self.settings.min_fit_clients,
                clip=self.settings.max_update_norm,
            )
            result = self.secure(
                rnd, cfg.to_record(), spec, sealed=arrays, shapes={n: self.shared[n].shape for n in spec.names}
            )
            for m in result.merchants:
                if m.status in ("rejected", "error"):
                    log(WARNING, "round %d: %s", rnd, m.reason if m.silo == "?" else f"{m.silo}: {m.reason}")
            if result.total is None:
                log(WARNING, "round %d: %s; the global adapter is unchanged", rnd, result.reason)
            line = round_line(rnd, result) | {
                "users": {m.silo: m.metrics.get("users", 0) for m in result.merchants},
                "secagg": result.workflow,
            }  # what bounds the rounding error of this round's mean
            return apply_update(arrays, result.total), line
        self.envelope.open_seconds = self.envelope.global_seal_seconds = 0.0
        messages = self.strategy.configure_train(rnd, to_record(arrays), cfg.to_record(), self.grid)
        trained = self.strategy.screen_and_aggregate(
            rnd,
            self.grid.send_and_receive(
                self.envelope.seal_messages(self.grid, messages, rnd, cfg.to_record()),
                timeout=self.settings.round_timeout,
            ),
        )
        line = round_line(rnd, trained) | {
            "open_seconds": round(self.envelope.open_seconds, 6),
            "global_seal_seconds": round(self.envelope.global_seal_seconds, 6),
        }
        return apply_update(arrays, trained.total), line

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return {"aggregation": "secagg+" if self.secure else self.settings.aggregation}, {}

    def resume(self, cfg: RoundConfig, ckpt: checkpoint.Checkpoint) -> None:
        pass

    def update_bytes(self) -> int:
        return (
            nbytes(self.shared) if self.secure is None else int(sum(a.size for a in self.shared.values()) * 8)
        )  # masked int64

    def summary(self) -> dict[str, Any]:
        return {"mode": "silo", "dp": self.settings.round.private}


# --- federation mode: one DP-SGD step a round over every merchant's users -------------------------------


@dataclass(frozen=True)
class Plan:
    """The federation's DP-SGD: what every round announces, fixed at the start and kept in the checkpoint."""

    noise_multiplier: float  # σ of each step; 0 without DP
    sample_rate: float  # q: every merchant samples each of its users with it
    delta: float
    users: int  # every merchant's trainable users: q·users is the expected batch
    steps: int
    min_replies: int  # m_min: each merchant adds noise of variance σ²C²/m_min
    names: tuple[str, ...]  # the trained tensors, in send order
    lattice: Lattice
    releases: tuple[accounting.Entry, ...] = ()

    @property
    def expected_batch(self) -> float:
        return self.sample_rate * self.users

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {
            "lattice": self.lattice.to_config(),
            "names": list(self.names),
            "releases": [list(e) for e in self.releases],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Plan:
        return cls(
            **{
                **data,
                "lattice": Lattice.from_config(data["lattice"]),
                "names": tuple(data["names"]),
                "releases": tuple(tuple(e) for e in data["releases"]),
            }
        )


class FederationTraining:
    """One DP-SGD step a round: the merchants' clipped per-user gradient sums plus noise shares, summed by SecAgg+."""

    def __init__(
        self,
        grid: Grid,
        settings: ServerSettings,
        envelope: sealing.Envelope,
        secure: SecureSum | None,
        shared: dict[str, np.ndarray],
    ) -> None:
        assert secure is not None
        self.grid, self.settings, self.envelope, self.secure, self.shared = grid, settings, envelope, secure, shared
        self.census: Census | None = None
        self.plan: Plan | None = None
        self.history: list[accounting.Entry] = []  # the federation's accountant: every release and step, once
        self.steps_tried = 0  # rounds whose shares were asked for, applied or abandoned
        self.asked: dict[str, list[accounting.Entry]] = {}  # per merchant: what it was asked to spend and took part in
        self.optimizer: GlobalOptimizer | None = None

    def describe(self) -> str:
        return "one DP-SGD step a round over every merchant's users, noise added once through SecAgg+"

    def start(self, cfg: RoundConfig) -> dict[str, Any]:
        """The census, the plan of steps and noise, and the federation's releases."""
        self.census, census = take_census(
            self.grid,
            self.envelope,
            cfg,
            min_nodes=self.settings.min_available_clients,
            timeout=self.settings.round_timeout,
        )
        merchants, users = len(self.census.nodes), self.census.total_users
        m = self.settings.min_replies or merchants
        if merchants < max(2, m):
            raise SilorecError(
                f"federation mode needs {max(2, m)} merchants with trainable users (min-replies); "
                f"the census found {merchants}"
            )
        delta = cfg.delta or default_delta(users)
        q = min(1.0, cfg.batch_size / users)
        releases = [(cfg.prior_noise, 1.0, 1)] if cfg.private and cfg.prior_noise > 0 else []
        releases += [(cfg.cooccurrence_noise, 1.0, 1)] if releases and cfg.cooccurrence_noise > 0 else []
        sigma = 0.0
        if cfg.private:
            try:
                sigma = accounting.noise_for(
                    cfg.epsilon, delta, sample_rate=q, steps=self.settings.rounds, history=releases
                )
            except ValueError as e:
                raise SilorecError(
                    f"epsilon {cfg.epsilon:g}: {e}; lower prior-noise or cooccurrence-noise, or raise epsilon"
                ) from None
        cfg = replace(cfg, delta=delta)
        entries, held, released = release_statistics(
            self.secure, self.grid, self.envelope, cfg, self.census, min_replies=m, timeout=self.settings.round_timeout
        )
        self.history = list(entries)
        for kind, entry in zip(("popularity", "cooccurrence"), entries):
            for silo in released.get(kind, {}).get("took_part", []):
                self.asked.setdefault(silo, []).append(entry)
        names = tuple(
            trained_names(
                sorted(self.shared), cfg.model(), prior=held["prior"], neighbours=held["neighbours"], adapter=cfg.lr > 0
            )
        )
        dim = int(sum(self.shared[n].size for n in names))
        lattice = plan(
            bound=cfg.max_grad_norm * self.census.max_users,
            noise_multiplier=sigma,
            clip=cfg.max_grad_norm,
            dim=dim,
            min_replies=m,
            merchants=merchants,
        )
        self.plan = Plan(sigma, q, delta, users, self.settings.rounds, m, names, lattice, tuple(entries))
        log(
            INFO,
            "federation: %d merchants, %d users; each round samples users at rate %.4f (expected batch %.0f), "
            "noise multiplier %.3f split over %d merchants, for ε=%g at δ=%.2g over %d steps and %d release(s)",
            merchants,
            users,
            q,
            self.plan.expected_batch,
            sigma,
            m,
            cfg.epsilon,
            delta,
            self.settings.rounds,
            len(entries),
        )
        return {"census": census, "releases": released, "plan": self.plan.to_json()}

    def resume(self, cfg: RoundConfig, ckpt: checkpoint.Checkpoint) -> None:
        """Continue the plan, accountant and optimiser of the checkpoint, with the merchants connected now."""
        state = ckpt.strategy.get("federation")
        if not state:
            raise SilorecError('the checkpoint is of a silo-mode run: resume it with privacy = "silo"')
        self.plan = Plan.from_json(state["plan"])
        if self.plan.steps != self.settings.rounds:
            raise SilorecError(
                f"the run was planned for {self.plan.steps} rounds: resume it with that many, not "
                f"{self.settings.rounds}"
            )
        self.history = [tuple(e) for e in state["accountant"]]
        self.steps_tried = int(state.get("steps_tried", 0))
        self.asked = {silo: [tuple(e) for e in entries] for silo, entries in state.get("asked", {}).items()}
        self.census, _ = take_census(
            self.grid,
            self.envelope,
            replace(cfg, delta=self.plan.delta),
            min_nodes=self.settings.min_available_clients,
            timeout=self.settings.round_timeout,
        )
        if len(self.census.nodes) < max(2, self.plan.min_replies):
            raise SilorecError(
                f"the run needs {self.plan.min_replies} merchants in every round (min-replies); "
                f"{len(self.census.nodes)} are connected: resume it when they are"
            )
        if self.census.total_users != self.plan.users:
            raise SilorecError(
                f"the run was planned for {self.plan.users} users; the merchants connected now have "
                f"{self.census.total_users}: resume it with the same merchants"
            )
        self._make_optimizer(ckpt.global_arrays).load_state_arrays(ckpt.arrays)

    def interrupted(self, applied: int) -> list[int]:
        """The rounds after `applied` whose step the accountant holds: a coordinator stopped mid-round."""
        return list(range(applied + 1, min(self.steps_tried, self.settings.rounds) + 1))

    def released(self) -> str:
        kinds = ["popularity", "co-occurrence"][: len(self.plan.releases)] if self.plan else []
        return f"the federation's {' and '.join(kinds)} release" if kinds else "no release"

    def configure(self, cfg: RoundConfig) -> RoundConfig:
        return replace(cfg, delta=self.plan.delta) if self.plan else cfg

    def eval_every(self) -> int:
        return max(1, round(1 / self.plan.sample_rate)) if self.plan else 1  # once per expected pass over the users

    def round(
        self, cfg: RoundConfig, arrays: dict[str, np.ndarray], commit
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """One DP-SGD step; `commit()` checkpoints the accountant with the step in it before any merchant is asked."""
        p = self.plan
        spec = SumSpec(
            "gradient", p.names, p.noise_multiplier, p.sample_rate, p.min_replies, cfg.max_grad_norm, p.lattice
        )
        if p.noise_multiplier > 0:  # counted before any merchant records it: a crash mid-round leaves it counted
            self.history.append((p.noise_multiplier, p.sample_rate, 1))
        self.steps_tried += 1
        commit()
        result = self.secure(
            cfg.round,
            cfg.to_record(),
            spec,
            sealed=arrays,
            nodes=self.census.nodes,
            shapes={n: arrays[n].shape for n in p.names},
        )
        line = round_line(cfg.round, result) | {"secagg": result.workflow, "epsilon_federation": self.epsilon()}
        if p.noise_multiplier > 0:
            for m in result.accepted:
                self.asked.setdefault(m.silo, []).append((p.noise_multiplier, p.sample_rate, 1))
            if flags := self.ledger_flags(result):
                line["ledger_flags"] = flags
        for m in result.merchants:
            if m.status in ("rejected", "error"):
                log(WARNING, "round %d: %s", cfg.round, m.reason if m.silo == "?" else f"{m.silo}: {m.reason}")
        if result.total is None:
            line["abandoned"] = result.reason
            log(WARNING, "round %d abandoned: %s; the global adapter is unchanged", cfg.round, result.reason)
            return arrays, line
        optimizer = self.optimizer or self._make_optimizer(arrays)
        return optimizer.step(arrays, result.total, p.expected_batch), line

    def ledger_flags(self, result) -> list[dict[str, Any]]:
        """Merchants whose reported ε is below what this run asked them to spend: a ledger lost, reset or rewritten."""
        flags = []
        for m in result.accepted:
            asked = accounting.epsilon(self.asked.get(m.silo, []), self.plan.delta)
            reported = m.metrics.get("epsilon-total")
            if reported is not None and reported < asked * (1 - 1e-6) - 1e-9:
                flags.append({"silo": m.silo, "reported": reported, "asked": asked})
                log(
                    WARNING,
                    "%s reports ε %.4f, less than the %.4f this run asked it to spend: its ledger was lost, reset "
                    "or rewritten",
                    m.silo,
                    reported,
                    asked,
                )
        return flags

    def _make_optimizer(self, arrays: dict[str, np.ndarray]) -> GlobalOptimizer:
        cfg = self.settings.round
        train = TrainConfig(lr=cfg.lr, head_lr=cfg.head_lr)
        self.optimizer = GlobalOptimizer(arrays, self.plan.names, train, self.plan.steps)
        return self.optimizer

    def epsilon(self) -> float | None:
        return accounting.epsilon(self.history, self.plan.delta) if self.plan and self.history else None

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        if self.plan is None:
            return {}, {}
        state = {
            "plan": self.plan.to_json(),
            "accountant": [list(e) for e in self.history],
            "steps_tried": self.steps_tried,
            "asked": {silo: [list(e) for e in entries] for silo, entries in self.asked.items()},
            "census": self.census.to_json() if self.census else {},
        }
        return {"aggregation": "secagg+ (federation)", "federation": state}, (
            self.optimizer.state_arrays() if self.optimizer else {}
        )

    def update_bytes(self) -> int:
        return int(sum(self.shared[n].size for n in self.plan.names) * 8) if self.plan else 0  # masked int64

    def summary(self) -> dict[str, Any]:
        if self.plan is None:
            return {"mode": "federation", "dp": self.settings.round.private}
        return {
            "mode": "federation",
            "dp": self.settings.round.private,
            "epsilon": self.epsilon(),
            "delta": self.plan.delta,
            "accountant": accounting.DEFAULT,
            "noise_multiplier": self.plan.noise_multiplier,
            "sample_rate": self.plan.sample_rate,
            "expected_batch": self.plan.expected_batch,
            "steps": self.steps_tried,
            "releases": [list(e) for e in self.plan.releases],
            "min_replies": self.plan.min_replies,
            "merchants": len(self.census.nodes) if self.census else None,
            "users": self.plan.users,
            "lattice": self.plan.lattice.to_config(),
        }


TRAININGS = {"federation": FederationTraining, "silo": SiloTraining}


# --- shared by both ---------------------------------------------------------------------------------


def prior_scales(settings: ServerSettings) -> tuple[float, ...]:
    """The factors of the prior's weight to choose from after the last round; () where there is no prior to weigh."""
    try:
        scales = parse_scales(settings.prior_scales)
    except ValueError as e:
        raise SilorecError(f"prior-scales: {e}") from None
    return scales if settings.round.private and settings.round.prior_noise > 0 else ()


def tune_prior_weight(
    arrays: dict[str, np.ndarray], valid: dict[str, float], scales: tuple[float, ...]
) -> tuple[dict[str, np.ndarray], dict[str, Any] | None]:
    """The final adapter with its prior's weight scaled by the factor of `scales` with the best
    validation NDCG@10 over all merchants' users (`valid`, the last round's), and what was chosen."""
    ndcg = {k: valid[scaled_key(k)] for k in scales if scaled_key(k) in valid}
    if not ndcg:
        return arrays, None
    scale = best_scale(ndcg)
    learned = float(np.asarray(arrays[PRIOR_WEIGHT]).ravel()[0])
    log(
        INFO,
        "prior weight: learned %.3f; ×%g scores best on validation (NDCG@10 %.4f; %s)",
        learned,
        scale,
        ndcg[scale],
        ", ".join(f"×{k:g} {v:.4f}" for k, v in ndcg.items()),
    )
    chosen = {
        "learned": learned,
        "scale": scale,
        "weight": learned * scale,
        "valid_ndcg@10": {f"{k:g}": v for k, v in ndcg.items()},
    }
    return scale_prior_weight(arrays, scale), chosen


def apply_update(global_arrays: dict[str, np.ndarray], delta: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """The global adapter moved by an aggregated update (unchanged when no update passed)."""
    if delta is None:
        return global_arrays
    return {k: (v + delta[k]).astype(v.dtype) if k in delta else v for k, v in global_arrays.items()}


def start_run(
    settings: ServerSettings,
) -> tuple[Any, dict[str, np.ndarray], dict[str, np.ndarray], checkpoint.Checkpoint | None]:
    """The user tower, its initial adapter, the part merchants send back, and the checkpoint to resume (if asked)."""
    out = Path(settings.out_dir)
    model_cfg = settings.round.model()
    encoder = load_encoder(model_cfg.base_model)[1]
    tower = attach_adapter(encoder, model_cfg)
    calibration = to_numpy(initial_calibration(encoder.config.hidden_size, model_cfg))
    lora = to_numpy(get_peft_model_state_dict(tower))
    initial = lora | calibration
    shared = ({k: v for k, v in lora.items() if "lora_B" in k} if model_cfg.ffa else lora) | calibration
    ckpt = checkpoint.load(out / "checkpoint") if settings.resume else None
    if ckpt is None and (out / "checkpoint" / checkpoint.STATE_FILE).exists():
        raise SilorecError(f"{out} holds an earlier run; resume it with --resume or choose another output folder")
    if settings.init_from and ckpt is None:
        initial = initial | earlier_adapter(Path(settings.init_from), model_cfg, initial)
    return tower, initial, shared, ckpt


# what an adapter's tensors depend on: an earlier run must agree on these to be continued
_SHAPING = ("base_model", "lora_r", "lora_alpha", "lora_targets", "ffa")


def earlier_adapter(folder: Path, model_cfg: ModelConfig, initial: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The shared tensors of an earlier run's adapter in `folder`, checked against this run's model."""
    saved = load_model_config(folder)
    for name in _SHAPING:
        if getattr(saved, name) != getattr(model_cfg, name):
            raise SilorecError(
                f"init-from {folder}: its {name} is {getattr(saved, name)!r}, this run's is "
                f"{getattr(model_cfg, name)!r}; continue a run with the model it trained"
            )
    expected = {k: torch.from_numpy(np.asarray(v)) for k, v in initial.items()}
    state = read_adapter(folder, model_cfg, expected)
    return {k: state[k].numpy().astype(initial[k].dtype) for k in initial if k in state}


def finish_run(
    settings: ServerSettings,
    base: RoundConfig,
    tower: Any,
    global_arrays: dict[str, np.ndarray],
    history: list[dict[str, Any]],
    test: dict[str, float],
    per_merchant: list[dict],
    *,
    update_bytes: int,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """Write metrics.json, the adapter in peft format with its model card, and the plots; return the metrics."""
    out = Path(settings.out_dir)
    final_eps = last_epsilons(history)
    merchants = [
        {
            "silo": m["silo"],
            "users": m.get("users", 0),
            "epsilon-total": final_eps.get(m["silo"], {}).get("epsilon"),
            "delta": final_eps.get(m["silo"], {}).get("delta"),
        }
        for m in per_merchant
    ]
    metrics = {
        "run_id": base.run_id,
        "rounds": settings.rounds,
        "test": {k: v for k, v in test.items() if not k.startswith("most-pop")},
        "most_pop_local": {k.removeprefix("most-pop-"): v for k, v in test.items() if k.startswith("most-pop")},
        "test_per_merchant": per_merchant,
        "epsilon_max": max((e["epsilon"] for e in final_eps.values()), default=None),
        "merchants": merchants,
        "update_bytes": update_bytes,
        **extra,
        "seed": settings.round.seed,
        "config": {"server": {k: v for k, v in vars(settings).items() if k != "round"}, "round": vars(base)},
    }
    atomic.write_json(out / "metrics.json", metrics)
    card = report.model_card(
        base.model(),
        rounds=settings.rounds,
        merchants=merchants,
        test=test,
        run_id=base.run_id,
        privacy=extra.get("privacy"),
    )
    report.export_adapter(out / "adapter", tower, global_arrays, base.model(), card)
    report.plot_run(out, history)
    return metrics


def evaluate_global(
    strategy: FedAvg,
    grid: Grid,
    arrays: dict[str, np.ndarray],
    cfg: RoundConfig,
    envelope: sealing.Envelope | None = None,
) -> tuple[dict, list]:
    """Every merchant's metrics of the global adapter on `cfg.split`, weighted by evaluated users, and each merchant's own."""
    messages = strategy.configure_evaluate(cfg.round, to_record(arrays), cfg.to_record(), grid)
    if envelope is not None:
        messages = envelope.seal_messages(grid, messages, cfg.round, cfg.to_record())
    return summarize_evaluation(grid.send_and_receive(messages))


def round_line(rnd: int, result) -> dict[str, Any]:
    """What metrics.jsonl records of a round's training (a screened round or a secure sum)."""
    trained = [m for m in result.merchants if "loss" in m.metrics]
    users = sum(m.metrics["users"] for m in trained)
    line: dict[str, Any] = {
        "round": rnd,
        "merchants": len(result.merchants),
        "accepted": len(result.accepted),
        "epsilon": {m.silo: m.metrics["epsilon-total"] for m in result.merchants if "epsilon-total" in m.metrics},
        "delta": {m.silo: m.metrics["delta"] for m in result.merchants if "delta" in m.metrics},
        "updates_received": sum(1 for m in result.merchants if m.update_bytes),
        "bytes_received": result.bytes_received,
        "seal_seconds": round(sum(m.metrics.get("seal-seconds", 0.0) for m in result.merchants), 6),
        "rejected": [
            {"silo": m.silo, "node": m.node, "reason": m.reason}
            for m in result.merchants
            if m.status in ("rejected", "error")
        ],
        "no_update": [{"silo": m.silo, "reason": m.reason} for m in result.merchants if m.status == "no-update"],
    }
    if users:
        line["loss"] = sum(m.metrics["loss"] * m.metrics["users"] for m in trained) / users
    return line


def last_epsilons(history: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Each merchant's latest reported total ε and its δ."""
    out: dict[str, dict[str, float]] = {}
    for h in history:
        for silo, eps in h.get("epsilon", {}).items():
            out[silo] = {"epsilon": eps, "delta": h.get("delta", {}).get(silo)}
    return out
