"""A run that continues an earlier one (new events): the coordinator starts from that run's adapter."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from common.errors import SilorecError
from common.round import RoundConfig
from server.federation import start_run
from server.settings import ServerSettings
from tests.test_serve import saved_adapter


def settings(tiny_bert, out, **model):
    cfg = RoundConfig.for_mode("federation", base_model=str(tiny_bert), epsilon=8.0, delta=1e-3, threads=1)
    return ServerSettings(out_dir=str(out), round=replace(cfg, **model))


def test_a_run_starts_from_the_earlier_runs_adapter_and_refuses_another_model(tmp_path, tiny_bert, synthetic_silo):
    from safetensors.torch import load_file

    earlier = saved_adapter(tmp_path / "earlier", tiny_bert, synthetic_silo, seed=3)
    fresh = start_run(settings(tiny_bert, tmp_path / "a"))[1]
    _, initial, _, ckpt = start_run(replace(settings(tiny_bert, tmp_path / "b"), init_from=str(earlier)))
    assert ckpt is None and set(initial) == set(fresh)
    saved = {k.replace(".default.", "."): v for k, v in load_file(earlier / "adapter_model.safetensors").items()}
    b = [k for k in initial if "lora_B" in k]
    assert b and all(np.array_equal(initial[k], saved[k].numpy()) for k in b)
    assert not any(np.array_equal(initial[k], fresh[k]) for k in b)  # fresh B is zero, the earlier run's is not
    with pytest.raises(SilorecError, match="lora_r is 8, this run's is 4"):
        start_run(replace(settings(tiny_bert, tmp_path / "c", lora_r=4), init_from=str(earlier)))
