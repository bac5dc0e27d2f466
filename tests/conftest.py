from __future__ import annotations

from pathlib import Path

import pytest

from simulations.synthetic import SyntheticSpec, make_synthetic_silo


@pytest.fixture
def synthetic_silo(tmp_path: Path) -> Path:
    """A small planted-structure silo (60 users, 48 items, 4 categories)."""
    return make_synthetic_silo(tmp_path / "shop", SyntheticSpec(seed=0))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
