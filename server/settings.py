"""The coordinator's settings for one run, read once from the Flower run config."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

from common.errors import SilorecError
from common.presets import SILO
from common.round import RoundConfig
from common.serve import PRIOR_SCALES
from common.setting import setting


@dataclass(frozen=True)
class ServerSettings:
    """The coordinator's settings; the defaults are federation mode's, silo mode takes common.presets.SILO over them."""

    rounds: int = setting(80, "Rounds (num-server-rounds in the run config); in federation mode one DP-SGD step each.")
    out_dir: str = setting("runs/flwr", "Run folder: checkpoint, metrics, adapter, plots.")
    resume: bool = setting(False, "Continue the run in the run folder from its last complete round.")
    min_fit_clients: int = setting(2, "Silo mode: fewest accepted updates that change the global adapter.")
    min_available_clients: int = setting(2, "Fewest merchants online before a round starts.")
    fraction_train: float = setting(1.0, "Share of the online merchants asked to take part in each round.")
    aggregation: str = setting("fedavg", "Silo mode: fedavg (users-weighted) or a robust rule.")
    trim: float = setting(0.1, "Silo mode, trimmed-mean: the share of updates dropped at each end.")
    max_update_norm: float = setting(25.0, "Silo mode: updates with a larger L2 norm are rejected.")
    round_timeout: float = setting(3600.0, "Seconds a round waits for the merchants' replies.")
    secure_aggregation: bool = setting(
        False,
        "Silo mode: Flower's SecAgg+, so the server learns only the sum of updates (no per-update screening; fedavg "
        "only). Federation mode always sums through it.",
    )
    pool_popularity: bool = setting(
        True,
        "Silo mode: before round 1 the coordinator sums the merchants' released item counts by item text and each "
        "merchant scores with the pooled ones (no further ε; the coordinator sees each merchant's noisy counts; "
        "never with secure aggregation).",
    )
    prior_scales: str = setting(
        PRIOR_SCALES,
        "After the last round, scale the prior's weight by whichever of these factors scores best on validation "
        "users (all merchants' in the federation, its own for a merchant alone); '' keeps the learned weight.",
    )
    seal_updates: bool = setting(True, "Merchants seal updates to the run's key; off only for debugging.")
    signing_keys: str = setting(
        "", "signing.json of `silorec-server enroll`: then every update must be signed by an enrolled merchant."
    )
    state_key_file: str = setting(
        "", "A file holding the key that encrypts the run's sealing key at rest (else $SILOREC_STATE_KEY)."
    )
    min_replies: int = setting(
        0,
        "Federation mode: the fewest merchants a round needs (m_min); each adds noise of variance σ²C²/m_min and a "
        "round with fewer is abandoned. 0: every merchant of the run.",
    )
    eval_every: int = setting(
        0,
        "Validate every this many rounds, and after the last; 0: once per expected pass over the users "
        "(federation), every round (silo).",
    )
    init_from: str = setting(
        "",
        "An earlier run's adapter folder to start from, to continue training on new events (the merchants' ledgers "
        "go on adding up); '' starts from a fresh adapter.",
    )
    round: RoundConfig = field(default_factory=RoundConfig)  # what merchants are told

    @property
    def privacy(self) -> str:
        return self.round.privacy

    @property
    def secure(self) -> bool:
        """Whether sums go through SecAgg+: always in federation mode, on request in silo mode."""
        return self.privacy == "federation" or self.secure_aggregation

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> ServerSettings:
        """Settings from a run config with Flower's kebab-case keys (`num-server-rounds`, `local-epochs`, ...)."""
        values = {k.replace("-", "_"): v for k, v in run_config.items()}
        if "num_server_rounds" in values:
            values["rounds"] = values.pop("num_server_rounds")
        own = {f.name for f in fields(cls)} - {"round"}
        try:
            settings = cls(**{k: v for k, v in values.items() if k in own})
            round_cfg = RoundConfig.from_run_config({k: v for k, v in values.items() if k not in own})
        except (TypeError, ValueError) as e:
            raise SilorecError(f"run config: {e}") from None
        return replace(settings, round=replace(round_cfg, rounds=settings.rounds))


# What the coordinator sets in each message, never the operator: no run config key.
PER_MESSAGE = ("run_id", "round", "rounds", "split", "score_scales")
# Where `make demo` writes its silos, and one torch thread per simulated merchant: the project's run config places
# the run on this machine's layout, every other value is the settings' default.
PLACED = {"silos_dir": "data/silos", "threads": 1}


def run_config_entries(placed: dict[str, Any] | None = None) -> list[tuple[str, Any, str]]:
    """(run config key, value, help) of every setting an operator may set, in the order pyproject.toml lists them."""
    placed = PLACED if placed is None else placed
    out = []
    for cls, skip in ((ServerSettings, {"round"}), (RoundConfig, set(PER_MESSAGE))):
        for f in fields(cls):
            if f.name in skip:
                continue
            out.append((run_config_key(f.name), placed.get(f.name, f.default), f.metadata.get("help", "")))
    return sorted(out, key=lambda entry: entry[0] != "privacy")  # the mode first: it decides what the rest mean


def run_config_key(name: str) -> str:
    """A coordinator setting's run config key: kebab-case, and Flower's own name for the rounds."""
    return "num-server-rounds" if name == "rounds" else name.replace("_", "-")


def run_config_toml(placed: dict[str, Any] | None = None) -> str:
    """The `[tool.flwr.app.config]` table, each key with its help as a comment: what pyproject.toml holds."""
    import textwrap

    lines = [
        "[tool.flwr.app.config]",
        "# Written by `silorec-server run-config` from the settings' declarations (server/settings.py,",
        "# common/round.py, common/model_config.py); tests/test_settings.py keeps the two the same.",
        "# Read by the ServerApp only: everything a merchant needs travels in each round's message.",
    ]
    preset = ", ".join(f"{run_config_key(k)} = {_toml(v)}" for k, v in SILO.items())
    lines += textwrap.wrap(
        f'The values are federation mode\'s; silo mode (privacy = "silo") wants its preset too: {preset}.',
        100,
        initial_indent="# ",
        subsequent_indent="# ",
        break_on_hyphens=False,
    )
    for key, value, help in run_config_entries(placed):
        lines += (
            textwrap.wrap(help, 100, initial_indent="# ", subsequent_indent="# ", break_on_hyphens=False)
            if help
            else []
        )
        lines.append(f"{key} = {_toml(value)}")
    return "\n".join(lines) + "\n"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)
