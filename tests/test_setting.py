"""Settings are declared once, on their dataclass fields; the command-line options are derived from them."""

from __future__ import annotations

from dataclasses import dataclass, fields

import click
from click.testing import CliRunner

from common.presets import CENTRAL_DP, SILO
from common.round import RoundConfig
from common.setting import help_of, option, setting
from common.train import TrainConfig
from server.settings import ServerSettings
from simulations.cli import main


@dataclass(frozen=True)
class Example:
    rate: float = setting(0.5, "How fast.")
    on: bool = setting(False, "Whether.")


def parse(decorator, args: list[str]) -> dict:
    seen = {}

    @click.command()
    @decorator
    def command(**kwargs):
        seen.update(kwargs)

    result = CliRunner().invoke(command, args)
    assert result.exit_code == 0, result.output
    return seen


def test_an_option_takes_its_default_and_help_from_the_field():
    assert parse(option(Example, "rate", type=float), []) == {"rate": 0.5}
    assert parse(option(Example, "rate", type=float), ["--rate", "2"]) == {"rate": 2.0}
    assert parse(option(Example, "on"), ["--on"]) == {"on": True}
    assert help_of(Example, "rate") == "How fast."


def test_a_preset_leaves_the_option_unset_and_names_its_values():
    decorator = option(Example, "rate", presets={"in fast mode": {"rate": 3.0}}, type=float)
    assert parse(decorator, []) == {"rate": None}  # the preset decides, not the option

    @click.command()
    @decorator
    def command(rate):
        pass

    assert "How fast [0.5; 3 in fast mode]." in command.get_help(click.Context(command))


def help_text(command: str) -> str:
    return " ".join(CliRunner().invoke(main, [command, "--help"], terminal_width=1000).output.split())


def test_run_and_central_state_the_defaults_and_presets_they_are_given():
    run = help_text("run")
    assert f"[{RoundConfig.head_lr:g}; {SILO['head_lr']:g} in silo mode]" in run
    assert f"[{ServerSettings.rounds}; {SILO['rounds']} in silo mode]" in run
    central = help_text("central")
    assert f"[{TrainConfig.head_lr:g}; {CENTRAL_DP['head_lr']:g} with --epsilon]" in central
    # every option of `run` named after a coordinator or round setting carries that setting's help
    server = {f.name for f in fields(ServerSettings)}
    settings = list(fields(ServerSettings)) + [f for f in fields(RoundConfig) if f.name not in server]
    checked = 0
    for f in settings:
        flag = "--" + f.name.replace("_", "-")
        if f.metadata.get("help") and f" {flag} " in run:
            first_words = " ".join(f.metadata["help"].split()[:4])
            assert first_words in run, (flag, first_words)
            checked += 1
    assert checked >= 15
