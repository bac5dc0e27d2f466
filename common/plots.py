"""Training curves as PNG: people would rather look at these than read a JSON file."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def plot_curves(
    path: Path,
    left: Mapping[str, Sequence[float] | Mapping[int, float]],
    right: Mapping[str, Sequence[float] | Mapping[int, float]],
    *,
    reference: Mapping[str, float] | None = None,
    title: str = "",
    xlabel: str = "epoch",
) -> None:
    """Two panels side by side (e.g. loss | NDCG@10), with optional horizontal reference lines on the right.

    A series is its values at x = 1, 2, …, or a mapping x → value.
    """
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, series in zip(axes, (left, right)):
        for label, values in series.items():
            xs, ys = (
                (list(values), list(values.values()))
                if isinstance(values, Mapping)
                else (range(1, len(values) + 1), values)
            )
            ax.plot(xs, ys, marker="o" if len(ys) <= 40 else None, label=label)
        ax.set_xlabel(xlabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for label, value in (reference or {}).items():
        axes[1].axhline(value, linestyle="--", color="grey", label=label)
    for ax in axes:
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
