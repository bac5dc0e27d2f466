"""A setting is a dataclass field that carries its one default and its help (peft's `field(metadata={"help": …})`).

The command-line options are derived from those fields (`option`), the Flower
run config in pyproject.toml is checked against them (tests/test_settings.py),
and the round's ConfigRecord is the dataclass itself (`RoundConfig.to_record`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import click


def setting(default: Any, help: str) -> Any:
    """A dataclass field with `default` and `help`, read by `option` and `help_of`."""
    return dataclasses.field(default=default, metadata={"help": help})


def field_of(cls: type, name: str) -> dataclasses.Field:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f
    raise KeyError(f"{cls.__name__} has no setting {name!r}")


def help_of(cls: type, name: str) -> str:
    return field_of(cls, name).metadata.get("help", "")


def _shown(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def option(
    cls: type,
    name: str,
    *,
    presets: Mapping[str, Mapping[str, Any]] | None = None,
    default: Any = dataclasses.MISSING,
    **click_kwargs: Any,
) -> Callable:
    """The click option --<name> of setting `name` of `cls`, with its help and its default.

    Where one of `presets` (what a preset is called, e.g. "in silo mode" → its
    values) sets another value, the option has no default (None: the preset
    decides) and its help ends with the values in brackets: "[3; 80 in silo
    mode]". A boolean setting whose default is False is a flag.
    """
    f = field_of(cls, name)
    value = f.default if default is dataclasses.MISSING else default
    help = f.metadata.get("help", "")
    flag = "--" + name.replace("_", "-")
    preset_values = {what: p[name] for what, p in (presets or {}).items() if name in p}
    if preset_values:
        shown = "; ".join([_shown(value)] + [f"{_shown(v)} {what}" for what, v in preset_values.items()])
        return click.option(flag, name, default=None, help=f"{help.rstrip('.')} [{shown}].", **click_kwargs)
    if isinstance(value, bool) and "type" not in click_kwargs:
        if value:
            return click.option(f"{flag}/--no-{flag[2:]}", name, default=True, show_default=True, help=help)
        return click.option(flag, name, is_flag=True, help=help)
    return click.option(flag, name, default=value, show_default=True, help=help, **click_kwargs)
