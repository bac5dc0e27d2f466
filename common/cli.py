"""What the three command-line tools share: one click group that reports errors as one line."""

from __future__ import annotations

import functools
import math
import sys
from typing import Any

import click

from common.errors import SilorecError

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


def with_defaults(model_cfg, defaults: dict[str, Any]):
    """`model_cfg` with `defaults` for every option the current command line did not set."""
    from dataclasses import replace

    from click.core import ParameterSource

    ctx = click.get_current_context()
    unset = {k: v for k, v in defaults.items() if ctx.get_parameter_source(k) in (ParameterSource.DEFAULT, None)}
    return replace(model_cfg, **unset)


def model_options(f):
    """--base-model, LoRA, history and head options, gathered into a ModelConfig passed as `model_cfg`."""
    from common.model_config import BUNDLED, LOCAL_HEADS, ModelConfig
    from common.presets import DP_MODEL

    d = ModelConfig()
    options = [
        click.option(
            "--base-model",
            default=BUNDLED,
            show_default=True,
            help="BERT-family encoder: 'bundled' (all-MiniLM-L6-v2), a local path or a hub name.",
        ),
        click.option("--lora-r", type=COUNT, default=d.lora_r, show_default=True, help="LoRA rank."),
        click.option("--lora-alpha", type=COUNT, default=d.lora_alpha, show_default=True, help="LoRA scaling alpha."),
        click.option(
            "--lora-targets",
            default=",".join(d.lora_targets),
            show_default=True,
            help="Comma-separated module names to adapt.",
        ),
        click.option("--ffa", is_flag=True, help="FFA-LoRA: freeze A at its seeded init, train and share only B."),
        click.option(
            "--max-tokens",
            type=COUNT,
            default=d.max_tokens,
            show_default=True,
            help=f"Token budget of a user's history: the texts of their most recent items "
            f"[{DP_MODEL['max_tokens']} with DP].",
        ),
        click.option(
            "--recency",
            type=Number(float, low=0, high=1, low_open=True),
            default=d.recency,
            show_default=True,
            help="Weight of a history item in the user vector, per step back in time (1: plain mean).",
        ),
        click.option(
            "--temperature",
            type=POSITIVE,
            default=d.temperature,
            show_default=True,
            help="Initial temperature of the cosine score (the scale is learned).",
        ),
        click.option(
            "--local-head",
            type=click.Choice(LOCAL_HEADS),
            default=d.local_head,
            show_default=True,
            help="Merchant-local item head: per-item weights and bias, bias only, or none [none with DP: the released "
            "statistics carry popularity].",
        ),
    ]

    def wrapper(
        *args, base_model, lora_r, lora_alpha, lora_targets, ffa, max_tokens, recency, temperature, local_head, **kwargs
    ):
        targets = tuple(t.strip() for t in lora_targets.split(",") if t.strip())
        kwargs["model_cfg"] = ModelConfig(
            base_model=base_model,
            lora_r=lora_r,
            lora_alpha=lora_alpha,
            lora_targets=targets,
            ffa=ffa,
            max_tokens=max_tokens,
            recency=recency,
            temperature=temperature,
            local_head=local_head,
        )
        return f(*args, **kwargs)

    wrapper = functools.wraps(f)(wrapper)
    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper
