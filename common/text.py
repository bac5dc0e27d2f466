"""Text the towers read: an item's text from its catalog fields, a user's from their history."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from common.silo import CATEGORY_SEPARATOR

HISTORY_SEPARATOR = " ; "


def item_texts(items: pd.DataFrame) -> list[str]:
    """One text per catalog item, in catalog order: title, categories, brand, description."""
    texts = []
    for title, category, brand, description in zip(
        items["title"], items["category"], items["brand"], items["description"]
    ):
        parts = [title]
        if category:
            parts.append(", ".join(c for c in category.split(CATEGORY_SEPARATOR) if c))
        parts += [p for p in (brand, description) if p]
        texts.append(". ".join(parts))
    return texts


def history_text(history: np.ndarray, titles: Sequence[str], *, max_items: int = 50) -> str:
    """A user's history as text, most recent last; the model cuts it to its token budget from the left.

    `titles` are the short per-item texts to join; only the `max_items` most
    recent are kept, which bounds the work before tokenisation.
    """
    recent = history[-max_items:] if max_items > 0 else history[:0]
    return HISTORY_SEPARATOR.join(titles[int(i)] for i in recent)
