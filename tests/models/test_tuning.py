"""models.tuning.search_outward: a grid extended past the edge its best lies on."""

import pytest

from models.tuning import search_outward


def _counting(peak: float):
    calls: list[float] = []

    def measure(v: float) -> float:
        calls.append(v)
        return -abs(v - peak)

    return measure, calls


def test_the_grid_grows_past_the_edge_where_the_best_lies_and_stops_inside():
    measure, calls = _counting(5.0)
    scores = search_outward(measure, (0.3, 0.6, 1.0), 2.0, 5, down=False)
    assert list(scores) == [0.3, 0.6, 1.0, 2.0, 4.0, 8.0]  # 8 is past the peak: stop
    assert max(scores, key=scores.get) == 4.0 and len(calls) == len(set(calls))

    measure, _ = _counting(0.01)
    scores = search_outward(measure, (0.7, 0.8), 2.0, 2, up=False)
    assert list(scores) == [0.175, 0.35, 0.7, 0.8]  # at most two past the edge


def test_one_sided_searches_ignore_the_other_edge_and_known_scores_are_not_remeasured():
    measure, _ = _counting(100.0)
    assert list(search_outward(measure, (1.0, 2.0), 2.0, 3, up=False)) == [1.0, 2.0]
    measure, calls = _counting(0.3)
    scores = search_outward(measure, (0.5, 1.0, 2.0), 1.6, 3, measured={1.0: -0.7})
    assert (
        1.0 not in calls
        and scores[1.0] == -0.7
        and max(scores, key=scores.get) == 0.3125
        and min(scores) == 0.1953
    )
    with pytest.raises(ValueError, match="factor"):
        search_outward(measure, (1.0,), 0.85, 1)
