import pytest

from search.selection import select
from search.spec import SelectionSpec

VALUES = [[0.9, 0.1, 5.0], [0.5, 0.5, 1.0], [0.1, 0.9, 3.0], [0.2, 0.2, 9.0]]
KEYS = ["a", "b", "size"]
DIRS = ["maximize", "maximize", "minimize"]


def test_best_of_one_objective_respects_direction():
    assert select(VALUES, KEYS, DIRS, SelectionSpec(policy="best:a")) == 0
    assert select(VALUES, KEYS, DIRS, SelectionSpec(policy="best:size")) == 1


def test_weights_prefer_what_they_weigh():
    assert select(VALUES, KEYS, DIRS, SelectionSpec(policy="weights", weights={"b": 1.0})) == 2
    assert select(VALUES, KEYS, DIRS, SelectionSpec(policy="weights", weights={"a": 1.0, "b": 1.0,
                                                                                "size": 2.0})) == 1


def test_knee_is_a_front_point_and_empty_is_none():
    assert select(VALUES, KEYS, DIRS, SelectionSpec()) in (0, 1, 2)
    assert select([], KEYS, DIRS, SelectionSpec()) is None


def test_weights_policy_needs_weights():
    with pytest.raises(ValueError, match="weights"):
        SelectionSpec(policy="weights")
