"""The console tables a run and an --evaluate end with (stage2.scoring.tables)."""

import math

from stage2.scoring.tables import format_metrics_table


def test_format_metrics_table():
    table = format_metrics_table({"auc": 0.912345, "eer": math.nan, "n": 1200}, "val epoch 3")
    assert table.splitlines() == [
        "val epoch 3",
        "---------------",
        "metric |  value",
        "---------------",
        "auc    | 0.9123",
        "eer    |    n/a",
        "n      |   1200",
    ]
