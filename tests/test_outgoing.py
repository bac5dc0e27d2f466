"""What leaves a silo: every message the real ClientApp sends, recorded as sent and searched for the silo's users,
its interactions and any tensor in the clear, in both privacy modes."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common import Metadata

from client.outgoing import RECORD_ENV, clear_tensors, recorded, scan, serialise
from common.round import RoundConfig
from server.settings import ServerSettings
from simulations.federated import SimulationSpec, run_simulation
from simulations.synthetic import SyntheticSpec, make_synthetic_silo
from tests.helpers import distinctive_user_ids


def distinctive_silo(folder, users: int, seed: int):
    return distinctive_user_ids(make_synthetic_silo(folder, SyntheticSpec(users=users, seed=seed)))


def test_the_scan_finds_a_user_an_interaction_and_a_clear_tensor(tmp_path):
    silo = distinctive_silo(tmp_path / "silo", users=12, seed=1)
    line = (silo / "interactions.csv").read_text().splitlines()[1]
    user = line.split(",")[0]
    leaky = Message(
        RecordDict({"update": ArrayRecord({"w": Array(np.ones(3, "float32"))}), "info": ConfigRecord({"x": line})}),
        metadata=Metadata(
            run_id=1,
            message_id="",
            src_node_id=1,
            dst_node_id=0,
            reply_to_message_id="m",
            group_id="1",
            created_at=0.0,
            ttl=60.0,
            message_type="train",
        ),
    )
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "1-train-1-a.msg").write_bytes(serialise(leaky))
    result = scan(recorded(tmp_path / "out"), [silo])
    assert result.messages == 1 and result.users == 12 and result.interactions > 12
    assert any(repr(user) in f for f in result.found) and any(repr(line) in f for f in result.found)
    assert clear_tensors(leaky) == ["update/w float32 (3,)"] and not result.clean


@pytest.mark.parametrize("privacy", ["federation", "silo"])
def test_no_user_interaction_or_clear_tensor_leaves_a_silo(tmp_path, tiny_bert, monkeypatch, privacy):
    data = distinctive_silo(tmp_path / "data", users=60, seed=3)
    out, sent = tmp_path / "run", tmp_path / "sent"
    monkeypatch.setenv(RECORD_ENV, str(sent))  # read by the merchants' ClientApps (simulation actors inherit it)
    cfg = RoundConfig.for_mode(privacy, base_model=str(tiny_bert), batch_size=16, epsilon=8.0, delta=1e-3, threads=1)
    settings = ServerSettings(rounds=1, out_dir=str(out), min_fit_clients=2, min_available_clients=3, round=cfg)
    run_simulation(SimulationSpec(data=data, out=out, merchants=3), settings)
    silos = sorted(p for p in (out / "silos").iterdir() if p.is_dir())
    assert len(silos) == 3
    result = scan(recorded(sent), silos)
    print(f"{privacy} mode: {result.line()}")
    kinds = {p.name.split("-")[1] for p in recorded(sent)}
    assert {"train", "query", "evaluate"} <= kinds and result.messages >= 20 and result.users == 60
    assert result.clean, result.found[:3] + result.tensors[:3]
