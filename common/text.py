"""Text the towers read: an item's text from its catalog fields (a user's is their recent items' texts)."""

from __future__ import annotations

import pandas as pd

from common.silo import CATEGORY_SEPARATOR


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
