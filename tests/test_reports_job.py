"""Readable reports: sweep-layers names a best layer only when its interval separates from the
next one's, the report's configuration shows only the options that were set, the demo and the
report draw their maps with the paper figures, and `eval captions --report` writes the page."""

from __future__ import annotations

import pytest

from groundcam.eval.summary import accuracy_block
from groundcam.eval.sweep import best_layer, layer_mark


def row(layer: int, hits: int, n: int) -> dict:
    return {"layer": layer} | accuracy_block(hits, n)


# ----------------------------------------------------------------------------- sweep-layers


def test_a_layer_whose_interval_lies_above_the_next_is_the_best():
    rows = [row(1, 20, 100), row(2, 90, 100), row(3, 60, 100)]
    assert rows[1]["ci95"][0] > rows[2]["ci95"][1]  # 90/100 separates from 60/100
    best, tied = best_layer(rows)
    assert (best, tied) == (2, [])
    table = {"best_layer": best, "tied": tied}
    assert [layer_mark(table, r["layer"]) for r in rows] == ["", "<- best", ""]


def test_overlapping_intervals_are_tied_and_no_layer_is_best():
    rows = [row(1, 20, 100), row(2, 62, 100), row(3, 60, 100), row(4, 55, 100)]
    low = rows[1]["ci95"][0]
    assert rows[2]["ci95"][1] >= low and rows[3]["ci95"][1] >= low > rows[0]["ci95"][1]
    best, tied = best_layer(rows)
    assert (best, tied) == (None, [2, 3, 4])  # from the most accurate; layer 1 is apart
    table = {"best_layer": best, "tied": tied}
    assert [layer_mark(table, r["layer"]) for r in rows] == ["", "tied", "tied", "tied"]


def test_equal_accuracy_is_a_tie_and_the_same_rows_separate_with_more_data():
    assert best_layer([row(3, 7, 10), row(1, 7, 10)]) == (None, [1, 3])
    assert best_layer([row(1, 6, 10), row(2, 8, 10)]) == (None, [2, 1])
    assert best_layer([row(1, 600, 1000), row(2, 800, 1000)]) == (2, [])


def test_one_layer_or_none_scored():
    assert best_layer([row(5, 3, 4)]) == (5, [])
    assert best_layer([row(5, 0, 0)]) == (None, [])
    assert best_layer([]) == (None, [])


@pytest.mark.parametrize("n", [0, 1])
def test_unscored_layers_are_never_marked(n):
    rows = [row(1, 0, 0), row(2, n, n)]
    best, tied = best_layer(rows)
    assert 1 not in tied and best in (2, None)
