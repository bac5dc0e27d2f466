"""What the three command-line tools share: one click group that reports errors as one line."""

from __future__ import annotations

import functools
import math
import sys
from typing import Any

import click

from common.errors import SilorecError
from common.model_config import MODEL_SETTINGS

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class RoleGroup(click.Group):
    """A click group whose commands turn silorec's typed errors into one line on stderr and exit 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (SilorecError, FileExistsError) as e:
            click.secho(f"error: {e}", fg="red", err=True)
            sys.exit(2)
        except (
            OSError
        ) as e:  # a folder that cannot be written, a disk that is full: the file and the reason, not a traceback
            where = f"{e.filename}: " if e.filename else ""
            click.secho(f"error: {where}{e.strerror or e}", fg="red", err=True)
            sys.exit(2)


class Number(click.ParamType):
    """A finite number within bounds, checked where the command line is read: a usage error (exit 2), never later."""

    def __init__(
        self,
        kind: type = float,
        *,
        low: float | None = None,
        high: float | None = None,
        low_open: bool = False,
        high_open: bool = False,
    ) -> None:
        self.kind, self.low, self.high, self.low_open, self.high_open = kind, low, high, low_open, high_open
        self.name = "integer" if kind is int else "number"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            number = self.kind(value) if not isinstance(value, str) or self.kind is float else int(value, 10)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not {'a whole number' if self.kind is int else 'a number'}", param, ctx)
        if self.kind is float and not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        too_low = self.low is not None and (number <= self.low if self.low_open else number < self.low)
        too_high = self.high is not None and (number >= self.high if self.high_open else number > self.high)
        if too_low or too_high:
            self.fail(f"{value!r} is not in {self.describe()}", param, ctx)
        return number

    def describe(self) -> str:
        low = "(-∞" if self.low is None else ("(" if self.low_open else "[") + f"{self.low:g}"
        high = "∞)" if self.high is None else f"{self.high:g}" + (")" if self.high_open else "]")
        return f"{low}, {high}"


POSITIVE = Number(float, low=0, low_open=True)  # ε, noise multipliers' bounds, clipping norms, temperatures
NON_NEGATIVE = Number(float, low=0)  # learning rates (0 holds the adapter), noise multipliers (0: no release)
PROBABILITY = Number(float, low=0, high=1, low_open=True, high_open=True)  # δ
FRACTION = Number(float, low=0, high=1)
COUNT = Number(int, low=1)  # rounds, epochs, merchants, k, batch sizes
SEED = Number(int, low=0)
COUNT_OR_AUTO = Number(int, low=0)  # 0: the setting's automatic choice


def quiet_libraries() -> None:
    """Hush the load reports and deprecation chatter of transformers and Opacus at the command line."""
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("opacus").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")


def model_options(f):
    """ModelConfig's settings as options (help and defaults from its fields), passed on as `model_given`.

    `model_given` maps each to its value, None where a preset decides
    (`model_config` resolves those).
    """
    from common.model_config import LOCAL_HEADS, ModelConfig
    from common.presets import DP_MODEL
    from common.setting import option

    types = {
        "lora_r": COUNT,
        "lora_alpha": COUNT,
        "max_tokens": COUNT,
        "recency": Number(float, low=0, high=1, low_open=True),
        "temperature": POSITIVE,
        "local_head": click.Choice(LOCAL_HEADS),
    }
    options = [
        option(
            ModelConfig,
            name,
            presets={"with DP": DP_MODEL},
            **({"default": ",".join(ModelConfig().lora_targets)} if name == "lora_targets" else {}),
            **({"type": types[name]} if name in types else {}),
        )
        for name in MODEL_SETTINGS
    ]

    def wrapper(*args, **kwargs):
        kwargs["model_given"] = {name: kwargs.pop(name) for name in MODEL_SETTINGS}
        return f(*args, **kwargs)

    wrapper = functools.wraps(f)(wrapper)
    for decorate in reversed(options):
        wrapper = decorate(wrapper)
    return wrapper


def model_config(given: dict[str, Any], *presets: dict[str, Any], seed: int = 0):
    """The ModelConfig of the options `given` (from `model_options`), the `presets` (later ones win) filling what was
    not given."""
    from common.model_config import ModelConfig

    values: dict[str, Any] = {}
    for p in presets:
        values |= dict(p)
    values |= {k: v for k, v in given.items() if v is not None}
    if isinstance(values.get("lora_targets"), str):
        values["lora_targets"] = tuple(t.strip() for t in values["lora_targets"].split(",") if t.strip())
    return ModelConfig(**values, seed=seed)
