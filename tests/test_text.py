from __future__ import annotations

import pandas as pd

from common.text import item_texts


def test_item_text_joins_present_fields():
    items = pd.DataFrame(
        {
            "title": ["Toy Story (1995)", "Pan"],
            "category": ["Animation|Comedy", ""],
            "brand": ["", "acme"],
            "description": ["", ""],
        }
    )
    assert item_texts(items) == ["Toy Story (1995). Animation, Comedy", "Pan. acme"]
