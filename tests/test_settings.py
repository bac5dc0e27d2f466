from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import tomllib

from common.round import RoundConfig
from server.settings import ServerSettings, run_config_toml

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


def test_the_run_config_is_the_one_run_config_toml_derives_from_the_settings():
    text = PYPROJECT.read_text()
    start = text.index("[tool.flwr.app.config]\n")
    block = text[start : text.index("\n\n", start) + 1]
    assert block == run_config_toml(), "pyproject.toml's run config differs: paste `silorec-server run-config` there"
