from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import tomllib

from common.round import RoundConfig
from server.settings import ServerSettings

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def run_config() -> dict:
    return tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]


def test_every_run_config_key_is_a_setting():
    known = {f.name for f in fields(ServerSettings)} | {f.name for f in fields(RoundConfig)} | {"num_server_rounds"}
    unknown = [k for k in run_config() if k.replace("-", "_") not in known]
    assert not unknown, f"pyproject.toml run config keys that nothing reads: {unknown}"


def test_run_config_reaches_server_and_merchants():
    s = ServerSettings.from_run_config(run_config() | {"num-server-rounds": 7, "local-epochs": 3, "ffa": True})
    assert s.rounds == 7 and s.round.rounds == 7 and s.round.local_epochs == 3 and s.round.model().ffa
    back = RoundConfig.from_record(s.round.to_record())
    assert back == s.round


def test_the_run_config_states_the_settings_defaults():
    # federation mode's defaults, stated once in the dataclasses; pyproject.toml may only place the run
    defaults = {f.name: f.default for cls in (ServerSettings, RoundConfig) for f in fields(cls) if f.name != "round"}
    defaults["num_server_rounds"] = ServerSettings.rounds
    placed = {"silos_dir", "threads"}  # where `make demo` writes silos; one torch thread per simulated merchant
    differ = {
        k: v
        for k, v in run_config().items()
        if k.replace("-", "_") not in placed and defaults[k.replace("-", "_")] != v
    }
    assert not differ, f"pyproject.toml run config values that are not the settings' defaults: {differ}"
