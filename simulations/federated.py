"""Simulated federations: many merchants on one machine, in Flower's simulation engine.

The ServerApp and ClientApp are the very apps a real deployment runs; only
the transport differs (Ray actors instead of SuperNodes). Also the
"no federation" baseline: every merchant trains alone on its own silo.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from client.ledger import PrivacyLedger
from client.merchant import Merchant, release_statistics, released_table, state_path
from common import atomic
from common.errors import SilorecError
from common.metrics import (
    load_ranks,
    metrics_from_ranks,
    most_pop,
    most_pop_scorer,
    paired_difference,
    ranks_of,
    save_ranks,
)
from common.model_config import MODEL_SETTINGS
from common.popularity import prior_of, text_keys
from common.presets import SILO
from common.pseudonym import pseudonyms
from common.recommender import Recommender, build_recommender
from common.round import RoundConfig
from common.serve import best_scale, prior_scale_ranks, scale_prior_weight, scorer
from common.silo import load_silo
from common.split import Split, split_silo
from common.storage import load_local, local_file
from common.text import item_texts
from common.train import default_delta, train
from server import checkpoint
from server.federation import prior_scales
from server.settings import ServerSettings
from simulations.console import RUN_LOG, simulation_console
from simulations.partition import plan, write_partition

SPLITS = ("valid", "test")  # the order in which comparisons are reported
RELEASED = ("prior", "neighbour_items", "neighbours")  # what of a merchant's head its releases made
LEARNED = "local-only, prior weight as trained"  # the baseline before it chose its prior's weight on validation


@dataclass(frozen=True)
class SimulationSpec:
    data: Path
    out: Path
    merchants: int = 10
    scheme: str = "region"
    alpha: float = 0.5
    partition_seed: int = 0
    gpu_fraction: float = 0.0  # of a GPU per ClientApp; 0 runs on CPU
    cpus_per_client: int = 1


def partition_for_run(spec: SimulationSpec) -> Path:
    """Write the run's merchant silos under OUT/silos (kept when resuming)."""
    silos = spec.out / "silos"
    if not silos.exists():
        silo = load_silo(spec.data)
        shares = plan(silo, spec.merchants, spec.scheme, seed=spec.partition_seed, alpha=spec.alpha)  # type: ignore[arg-type]
        write_partition(silo, shares, silos, scheme=spec.scheme, seed=spec.partition_seed)
    return silos


def run_simulation(
    spec: SimulationSpec, settings: ServerSettings, *, verbose: bool = False, client_app=None
) -> dict[str, Any]:
    """Run the federation in Flower's simulation engine and return its metrics.json.

    `client_app` replaces silorec's own ClientApp (tests use it to play a misbehaving merchant).
    """
    from flwr.simulation import run_simulation as flwr_run_simulation

    from server.app import make_app

    if client_app is None:
        from client.app import app as client_app

    silos = partition_for_run(spec)
    n = sum(1 for p in silos.iterdir() if p.is_dir())
    cpus = os.cpu_count() or 1
    threads = max(1, spec.cpus_per_client)
    settings = replace(
        settings, out_dir=str(spec.out), round=replace(settings.round, silos_dir=str(silos), threads=threads)
    )
    overrides = _as_run_config(settings)
    backend = {
        "client_resources": {"num_cpus": spec.cpus_per_client, "num_gpus": spec.gpu_fraction},
        # without verbose, the actors' output stays in Ray's session logs (model loading, library warnings)
        "init_args": {"num_cpus": cpus, "num_gpus": 1 if spec.gpu_fraction > 0 else 0, "log_to_driver": verbose},
    }
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    os.environ.setdefault(
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0"
    )  # what Ray's FutureWarning asks: GPUs only where asked
    with simulation_console(spec.out, verbose=verbose):
        flwr_run_simulation(
            server_app=make_app(overrides),
            client_app=client_app,
            num_supernodes=n,
            backend_config=backend,
            verbose_logging=verbose,
        )
    result = spec.out / "metrics.json"
    if not result.is_file():  # Flower logs a ServerApp failure but does not raise it
        raise SilorecError(f"the federated run did not finish: no {result}; see {spec.out / RUN_LOG}")
    metrics = json.loads(result.read_text())
    if metrics.get("rounds") != settings.rounds:
        raise SilorecError(f"{result} is from another run (rounds {metrics.get('rounds')} ≠ {settings.rounds})")
    return metrics


def _as_run_config(settings: ServerSettings) -> dict[str, Any]:
    """ServerSettings back to a flat Flower run config with kebab-case keys."""
    merchant = {k: v for k, v in vars(settings.round).items() if k != "rounds"}  # set from the server's count
    server = {k: v for k, v in vars(settings).items() if k not in ("round", "rounds")}
    flat = {"num_server_rounds": settings.rounds} | server | merchant
    return {k.replace("_", "-"): v for k, v in flat.items()}


def local_only_settings(settings: ServerSettings) -> ServerSettings:
    """The settings a merchant trains alone with: silo mode's, where the run is in federation mode.

    Alone, a merchant has only its own users: one DP-SGD step a round would
    leave it a handful of noisy steps, so it trains local epochs like a silo.
    """
    if settings.privacy == "silo":
        return settings
    names = (
        "epsilon",
        "seed",
        "lr",
        "max_grad_norm",
        "next_items",
        "cut",
        *MODEL_SETTINGS,
        "threads",
        "silos_dir",
    )
    cfg = RoundConfig.for_mode("silo", **{k: getattr(settings.round, k) for k in names})
    return replace(settings, rounds=SILO["rounds"], round=replace(cfg, rounds=SILO["rounds"]))


def central_most_pop(data: Path, cfg: RoundConfig | None = None) -> dict[str, float]:
    """MostPop with the whole data set's popularity, on the same split as the federated test sets (`cfg`'s)."""
    silo = load_silo(data)
    return most_pop(split_of(silo, cfg))["test"]


def split_of(silo, cfg: RoundConfig | None) -> Split:
    """The silo's split as the run's merchants make it: leave-one-out, or its time split."""
    if cfg is None:
        return split_silo(silo.interactions, silo.n_items)
    return split_silo(silo.interactions, silo.n_items, cutoff=cfg.cutoff, train_until=cfg.train_until)


def merchant_silos(silos: Path) -> list[Path]:
    """The merchant silo folders of a partition, in a fixed order."""
    return sorted(p for p in silos.iterdir() if p.is_dir() and not p.name.startswith("."))


def run_local_only(silos: Path, settings: ServerSettings, out: Path, *, log=print) -> dict[str, Any]:
    """Each merchant trains alone (same epochs in all, same ε budget, the same released statistics
    as its federated self where there is one) and is tested on its own silo.

    Like the federation, a merchant scales its prior's weight by the factor
    (of `settings.prior_scales`) that scores best on validation, but on its
    own validation users: alone, it has no others.
    """
    cfg = settings.round
    scales = prior_scales(settings)
    results = []
    for folder in merchant_silos(silos):
        silo = load_silo(folder)
        split = split_of(silo, cfg)
        model = build_recommender(cfg.model(), list(silo.items["item_id"]), item_texts(silo.items))
        epochs = settings.rounds * cfg.local_epochs
        tcfg = replace(cfg.train(noise_multiplier=None, delta=None), epochs=epochs, seed=cfg.seed)
        epsilon = None
        ledger = None
        if cfg.private:
            delta = cfg.delta or default_delta(split.n_users)
            ledger = PrivacyLedger(
                path=out / "local-only" / folder.name / "ledger.json", budget=cfg.epsilon, delta=delta
            )
        keys = text_keys(item_texts(silo.items))
        if ledger is not None and cfg.prior_noise > 0 and not reuse_releases(model, folder, ledger, keys):
            release_statistics(model, split, cfg, ledger, run="local-only", round=0)  # as a federated merchant would
        if ledger is not None:
            users = sum(len(h) >= 2 for h in split.train)
            q = min(1.0, cfg.batch_size / max(users, 1))
            steps = epochs * max(1, math.ceil(users / cfg.batch_size))
            tcfg = replace(
                tcfg, noise_multiplier=ledger.plan(sample_rate=q, steps_per_round=steps, rounds_left=1), delta=delta
            )
        result = train(model, split, tcfg, progress=False)
        if ledger is not None:
            epsilon = ledger.record(
                run="local-only",
                round=1,
                noise_multiplier=result.noise_multiplier,
                sample_rate=result.sample_rate,
                steps=result.steps,
            )
        by_scale = {name: prior_scale_ranks(model, getattr(split, name), (1.0, *scales)) for name in SPLITS}
        scale, learned = None, {}
        if scales and model.has_prior:  # as the federation does, on this merchant's own validation users
            scale = best_scale({k: metrics_from_ranks(by_scale["valid"][k])["ndcg@10"] for k in scales})
            # also as trained, so that choosing on a few dozen validation users is seen not to favour federation
            learned = {f"{name}_ranks_learned": by_scale[name][1.0].tolist() for name in SPLITS}
        ranks = {name: by_scale[name][1.0 if scale is None else scale] for name in SPLITS}
        test = metrics_from_ranks(ranks["test"])
        results.append(
            {
                "silo": folder.name,
                "epsilon": epsilon,
                "prior_scale": scale,
                **test,
                **{f"{name}_ranks": r.tolist() for name, r in ranks.items()},
                **learned,
            }
        )
        log(
            f"  local-only {folder.name:<14} users {test['users']:>4}  NDCG@10 {test['ndcg@10']:.4f}"
            + (f"  ε {epsilon:.2f}" if epsilon else "")
            + (f"  prior weight ×{scale:g}" if scale is not None else "")
        )
    # over all merchants' users at once: each merchant's averages weighted by its users
    report = {name: metrics_from_ranks(np.concatenate([r[f"{name}_ranks"] for r in results])) for name in SPLITS}
    report |= {"per_merchant": results, "epsilon_max": max((r["epsilon"] or 0 for r in results), default=0)}
    atomic.write_json(out / "local-only.json", report)
    return report


def reuse_releases(model: Recommender, folder: Path, ledger: PrivacyLedger, item_keys: np.ndarray) -> bool:
    """Give `model` the statistics the silo's federated merchant released, and charge `ledger` for them.

    A merchant releases its popularity (and co-occurrence) once, whether it
    then federates or trains alone, so the baseline reuses the federation's
    draw of the noise: the two arms of the comparison then differ only in how
    they trained (common random numbers), not also in a second draw of the
    release's noise, which narrows their paired interval.
    The prior comes from the merchant's own released counts (`item_keys`
    name its items in them), not from the pooled counts its federated self
    may score with: pooling is what federating adds.
    False where the merchant released nothing of its own here (no state, no
    run yet, or a federation-mode run, whose releases were the federation's).
    """
    state = state_path({}, folder)
    own = released_table(state)
    saved = local_file(state)
    if own is None or saved is None:
        return False
    releases = [
        e for e in PrivacyLedger.open(state, budget=ledger.budget, delta=ledger.delta).entries if e.what != "train"
    ]
    if not releases:
        return False
    head, item_ids = load_local(saved)
    model.load_local_state({k: v for k, v in head.items() if k in RELEASED}, item_ids)  # not the local head it trained
    model.set_prior(prior_of(own, item_keys))
    for e in releases:
        ledger.record(
            run="local-only",
            round=0,
            noise_multiplier=e.noise_multiplier,
            sample_rate=e.sample_rate,
            steps=e.steps,
            what=e.what,
        )
    return True


def merchant_ranks(silos: Path, settings: ServerSettings, out: Path) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """Each merchant's ranks under the run's final global adapter (as its own evaluate reply
    scores them) and under its own MostPop, by split, model and merchant.

    The simulation holds every silo, so it can score the same users the
    federation reported on, one by one, for a paired comparison; a real
    merchant sends only its averages.
    """
    final = checkpoint.load(out / "checkpoint")
    if final is None or final.round != settings.rounds:
        raise SilorecError(f"{out / 'checkpoint'} holds no finished run of {settings.rounds} rounds")
    ranks: dict[str, dict[str, dict[str, np.ndarray]]] = {
        split: {"federated": {}, "MostPop (each merchant)": {}} for split in SPLITS
    }
    chosen = json.loads((out / "metrics.json").read_text()).get("prior_weight")
    arrays = scale_prior_weight(final.global_arrays, chosen["scale"]) if chosen else final.global_arrays  # as exported
    for folder in merchant_silos(silos):  # state and cache where the simulated ClientApps keep them
        merchant = Merchant(
            folder,
            state_path({}, folder),
            settings.round.model(),
            cache_dir=silos.parent / "cache",
            cutoff=settings.round.cutoff,
            train_until=settings.round.train_until,
        )
        merchant.set_global(arrays)
        scores = {"federated": scorer(merchant.model), "MostPop (each merchant)": most_pop_scorer(merchant.split)}
        for split in SPLITS:
            for model, score in scores.items():
                ranks[split][model][folder.name] = ranks_of(score, getattr(merchant.split, split))
    return ranks


def paired_comparisons(
    silos: Path, settings: ServerSettings, out: Path, local_only: dict[str, Any] | None = None, *, key: bytes
) -> dict[str, dict[str, dict[str, float]]]:
    """Federated NDCG@10 minus each merchant's MostPop (and local-only model), paired by user, by split.

    Each with its paired bootstrap interval (common.metrics); written to
    OUT/comparison.json. The validation differences are the ones to choose
    settings by; the test differences are the ones to report. OUT/ranks.json
    names users by their pseudonym under `key` (common.pseudonym).
    """
    joined = _joined_ranks(silos, settings, out, local_only)
    ids = user_ids(silos, settings.round)
    save_ranks(
        out,
        {split: dict(zip(pseudonyms(key, ids[split]), joined[split]["federated"].tolist())) for split in SPLITS},
        model=f"federated ({settings.privacy} privacy)",
    )
    report = {split: _differences(by_model) for split, by_model in joined.items()}
    atomic.write_json(out / "comparison.json", report)
    return report


def user_ids(silos: Path, cfg: RoundConfig | None = None) -> dict[str, list[str]]:
    """Every merchant's evaluated users by split, merchant after merchant in the order `_joined_ranks` joins them."""
    ids: dict[str, list[str]] = {split: [] for split in SPLITS}
    for folder in merchant_silos(silos):
        silo = load_silo(folder)
        split = split_of(silo, cfg)
        for name in SPLITS:
            ids[name] += [c.user_id for c in getattr(split, name)]
    return ids


def compare_runs(runs: list[Path], against: list[Path]) -> dict[str, dict[str, float]]:
    """NDCG@10 of the runs `runs` minus that of the runs `against`, paired by user, by split.

    Any runs that scored the same users: federated (either privacy mode),
    centralised, or several draws of each (each arm averaged over its runs
    per user before users are resampled). Each run's OUT/ranks.json.
    """
    arms = [[load_ranks(r) for r in runs], [load_ranks(r) for r in against]]
    report = {}
    for split in SPLITS:
        users = sorted(arms[0][0][split])
        for arm, folders in zip(arms, (runs, against)):
            for ranks, folder in zip(arm, folders):
                if sorted(ranks[split]) != users:
                    raise SilorecError(
                        f"{folder} scored other {split} users than {runs[0]}: only runs on the same data pair up"
                    )
        stacked = [np.array([[r[split][u] for u in users] for r in arm]) for arm in arms]
        report[split] = paired_difference(*stacked) | {"runs": len(runs), "against": len(against)}
    return report


def pooled_comparisons(runs: list[Path]) -> dict[str, dict[str, dict[str, float]]]:
    """`paired_comparisons` over several finished `--local-only` runs of one partition, pooled.

    Every run draws its own DP noise, so one run's interval (over users) says
    nothing of the next draw; pooled, each user's difference is averaged over
    the runs before users are resampled.
    """
    if not runs:
        raise SilorecError("pooling needs at least one run folder")
    for out in runs:  # all checked before any is scored
        for name in ("metrics.json", "local-only.json", "silos/partition.json"):
            if not (out / name).is_file():
                raise SilorecError(f"{out} holds no finished `silorec-sim run --local-only`: {out / name} is missing")
    first, partition, settings, users = runs[0], _partition(runs[0]), _settings(runs[0]), _users(runs[0])
    for out in runs[1:]:
        if _partition(out) != partition:
            raise SilorecError(
                f"{out} and {first} split the data into different merchants: only runs of one partition pair up"
            )
        if differ := sorted(k for k, v in _settings(out).items() if settings.get(k) != v):
            raise SilorecError(
                f"{out} and {first} ran with different settings ({', '.join(differ)}): pool draws of one setting"
            )
        if _users(out) != users:
            raise SilorecError(f"{out} and {first} scored different users: they were made from different data")
    stacked: dict[str, dict[str, list[np.ndarray]]] = {split: {} for split in SPLITS}
    for out in runs:
        local_only = json.loads((out / "local-only.json").read_text())
        for split, joined in _joined_ranks(out / "silos", run_settings(out), out, local_only).items():
            for model, ranks in joined.items():
                stacked[split].setdefault(model, []).append(ranks)
    return {  # only what every run scored (runs older than a comparison lack it)
        split: _differences({m: np.stack(r) for m, r in joined.items() if len(r) == len(runs)})
        for split, joined in stacked.items()
    }


def _settings(out: Path) -> dict[str, Any]:
    """What a run was asked to do, without where it ran or what it was called."""
    config = json.loads((out / "metrics.json").read_text())["config"]
    where = {"out_dir", "resume", "run_id", "silos_dir", "round"}
    return {k: v for part in ("server", "round") for k, v in config[part].items() if k not in where}


def _users(out: Path) -> dict[str, list[int]]:
    """How many validation and test users each merchant of a run's local-only baseline scored."""
    merchants = json.loads((out / "local-only.json").read_text())["per_merchant"]
    return {m["silo"]: [len(m[f"{split}_ranks"]) for split in SPLITS] for m in merchants}


def _partition(out: Path) -> dict[str, Any]:
    """How a run split its data (scheme, seed, silos), whatever path it named the data by."""
    return {k: v for k, v in json.loads((out / "silos" / "partition.json").read_text()).items() if k != "source"}


def run_settings(out: Path) -> ServerSettings:
    """The settings a finished simulation in `out` ran with (its metrics.json)."""
    config = json.loads((out / "metrics.json").read_text())["config"]
    return ServerSettings(**{**config["server"], "round": RoundConfig(**config["round"])})


def _joined_ranks(
    silos: Path, settings: ServerSettings, out: Path, local_only: dict[str, Any] | None
) -> dict[str, dict[str, np.ndarray]]:
    """By split and model, the ranks of every merchant's users, merchant after merchant in one fixed order."""
    joined: dict[str, dict[str, np.ndarray]] = {}
    for split, ranks in merchant_ranks(silos, settings, out).items():
        if local_only is not None:
            ranks["local-only"] = {r["silo"]: np.asarray(r[f"{split}_ranks"]) for r in local_only["per_merchant"]}
            if all(f"{split}_ranks_learned" in r for r in local_only["per_merchant"]):
                ranks[LEARNED] = {
                    r["silo"]: np.asarray(r[f"{split}_ranks_learned"]) for r in local_only["per_merchant"]
                }
        names = sorted(ranks["federated"])
        joined[split] = {}
        for model, by_silo in ranks.items():
            if sorted(by_silo) != names:
                raise SilorecError(
                    f"{model} and federated runs cover different merchants: {sorted(by_silo)} vs {names}"
                )
            joined[split][model] = np.concatenate([by_silo[n] for n in names])
    return joined


def _differences(joined: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    return {
        f"federated − {model}": paired_difference(joined["federated"], joined[model])
        for model in joined
        if model != "federated"
    }
