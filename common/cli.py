"""What the three command-line tools share: one click group that reports errors as one line."""

from __future__ import annotations

import functools
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
    """--base-model, LoRA and token-budget options, gathered into a ModelConfig passed as `model_cfg`."""
    from common.towers import BUNDLED, ModelConfig

    d = ModelConfig()
    options = [
        click.option("--base-model", default=BUNDLED, show_default=True, help="BERT-family encoder: 'bundled' (all-MiniLM-L6-v2), a local path or a hub name."),
        click.option("--lora-r", type=int, default=d.lora_r, show_default=True, help="LoRA rank."),
        click.option("--lora-alpha", type=int, default=d.lora_alpha, show_default=True, help="LoRA scaling alpha."),
        click.option("--lora-targets", default=",".join(d.lora_targets), show_default=True, help="Comma-separated module names to adapt."),
        click.option("--ffa", is_flag=True, help="FFA-LoRA: freeze A at its seeded init, train and share only B."),
        click.option("--max-tokens", type=int, default=d.max_tokens, show_default=True, help="Token budget of a user's history text."),
        click.option("--temperature", type=float, default=d.temperature, show_default=True, help="Softmax temperature of the cosine score."),
        click.option("--no-head", is_flag=True, help="Score by text alone, without the merchant-local item head."),
    ]

    def wrapper(*args, base_model, lora_r, lora_alpha, lora_targets, ffa, max_tokens, temperature, no_head, **kwargs):
        targets = tuple(t.strip() for t in lora_targets.split(",") if t.strip())
        kwargs["model_cfg"] = ModelConfig(
            base_model=base_model, lora_r=lora_r, lora_alpha=lora_alpha, lora_targets=targets, ffa=ffa,
            max_tokens=max_tokens, temperature=temperature, local_head=not no_head,
        )
        return f(*args, **kwargs)

    wrapper = functools.wraps(f)(wrapper)
    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper
