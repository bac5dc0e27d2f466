from __future__ import annotations

import numpy as np
import pandas as pd

from common.text import history_text, item_texts


def test_item_text_joins_present_fields():
    items = pd.DataFrame(
        {"title": ["Toy Story (1995)", "Pan"], "category": ["Animation|Comedy", ""], "brand": ["", "acme"], "description": ["", ""]}
    )
    assert item_texts(items) == ["Toy Story (1995). Animation, Comedy", "Pan. acme"]


def test_history_text_is_most_recent_last_and_bounded():
    titles = ["a", "b", "c", "d"]
    assert history_text(np.array([2, 0, 3]), titles) == "c ; a ; d"
    assert history_text(np.array([2, 0, 3]), titles, max_items=2) == "a ; d"
