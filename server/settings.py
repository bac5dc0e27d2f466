"""The coordinator's settings for one run, read once from the Flower run config."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

from common.errors import SilorecError
from common.round import RoundConfig
from common.serve import PRIOR_SCALES


@dataclass(frozen=True)
class ServerSettings:
    rounds: int = 80  # federation mode: one DP-SGD step a round; silo mode's preset is 3 (common.presets.SILO)
    out_dir: str = "runs/flwr"
    resume: bool = False
    min_fit_clients: int = 2  # a round's update is applied only if at least this many merchants' updates pass screening
    min_available_clients: int = 2
    fraction_train: float = 1.0
    aggregation: str = "fedavg"  # fedavg | median | trimmed-mean
    trim: float = 0.1  # trimmed-mean: fraction dropped at each end
    max_update_norm: float = 25.0  # L2 bound on one merchant's update; larger ones are rejected
    round_timeout: float = 3600.0
    secure_aggregation: bool = (
        False  # SecAgg+: the coordinator sees only the sum of updates (no screening, no robust aggregation)
    )
    # before round 1, sum the merchants' released popularity by item text and give each merchant
    # the pooled counts (server.popularity); DP runs with a prior only, never with SecAgg+
    pool_popularity: bool = True
    # after the last round, scale the prior's weight by the factor that scores best on all
    # merchants' validation users (common.serve); "" keeps the learned weight
    prior_scales: str = PRIOR_SCALES
    seal_updates: bool = True  # merchants seal updates to the run's key; off only for debugging
    signing_keys: str = (
        ""  # signing.json of `silorec-server enroll`: then every update must be signed by an enrolled merchant
    )
    state_key_file: str = (
        ""  # a file holding the key that encrypts the run's sealing key at rest (else $SILOREC_STATE_KEY)
    )
    # federation mode: the fewest merchants whose shares a round needs (m_min); each merchant adds
    # noise of variance σ²C²/m_min, and a round with fewer replies is abandoned. 0: every merchant
    # of the run's census (exactly the central noise; any dropout abandons a round)
    min_replies: int = 0
    eval_every: int = 0  # validation every this many rounds (and after the last); 0: federation mode once per pass over the users, silo mode every round
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
