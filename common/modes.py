"""The privacy modes, named once; a module of its own so that a command's --help need not import torch."""

PRIVACY_MODES: tuple[str, ...] = ("federation", "silo")  # common.round and docs/threat-model.md say what each means
