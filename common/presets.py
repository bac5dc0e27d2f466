"""The tuned presets, named once: what a kind of run uses for the settings its user leaves alone.

Each maps setting names (of ModelConfig, TrainConfig or RoundConfig) to
values; a setting the user gives always wins. The defaults themselves are
defined once, beside their help, in `common.model_config`, `common.train`
and `common.round`. The figures behind each choice are in docs/results.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

# Any DP run's model: a shorter history pays for more (noisier) steps, and no per-item weight is
# trained, because under DP a per-item weight is a row of noise per item; popularity and
# co-occurrence come from one release each instead.
DP_MODEL: Mapping[str, Any] = MappingProxyType({"max_tokens": 64, "local_head": "none"})

# Central DP-SGD (and federation mode, one such step a round): large expected batches, since the
# noise is divided by the batch, and small calibration steps, since the releases already place it
# near its best.
CENTRAL_DP: Mapping[str, Any] = MappingProxyType({"epochs": 20, "batch_size": 256, "lr": 1e-3, "head_lr": 0.01})

# Silo mode: each merchant trains local epochs on its own users under its own full noise.
SILO: Mapping[str, Any] = MappingProxyType(
    {"rounds": 3, "local_epochs": 2, "batch_size": 64, "head_lr": 0.1, "prior_noise": 1.0, "cooccurrence_noise": 0.0}
)
