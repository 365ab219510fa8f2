"""The multi-fidelity ladder, its nested item windows, the combination of rungs and ASHA's promotion."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from evals.objective import Objective
from search.fidelity import combine, ladder, promoted
from search.spec import StudySpec


def test_the_ladder_grows_by_eta_to_each_objectives_samples():
    lad = ladder({"math": 400, "code": 200}, 25, 4)
    assert lad.counts == ({"math": 25, "code": 13}, {"math": 100, "code": 50}, {"math": 400, "code": 200})
    assert lad.top == 2 and lad.window(0) == {"math": (0, 25), "code": (0, 13)}
    # down from the top by whole factors of eta: no sliver of a last rung (12 -> 48 -> 50)
    assert ladder({"add": 50}, 12, 4).counts == ({"add": 13}, {"add": 50})
    assert lad.window(2) == {"math": (100, 400), "code": (50, 200)}


def test_windows_are_nested_subsets_of_the_objectives_items():
    o = Objective(task="mmmo_add", samples=40, seed=3)
    rungs = [o.window_ids(500, a, b) for a, b in ((0, 10), (10, 20), (20, 40))]
    assert sorted(sum(rungs, [])) == o.doc_ids(500)  # every item once, no item twice
    assert o.window_ids(500, 0, 10) == o.window_ids(500, 0, 10) != o.window_ids(500, 10, 20)


def test_rungs_combine_as_item_weighted_means():
    got = combine({"acc": 0.5, "sparsity": 3.0}, {"acc": 1.0, "sparsity": 4.0}, {"acc": (25, 75)})
    assert got == {"acc": pytest.approx(0.875), "sparsity": 4.0}


def test_promotion_keeps_the_front_and_the_top_share_by_layer():
    up = ["maximize", "maximize"]
    points = [[0.1, 0.9], [0.9, 0.1], [0.5, 0.5], [0.45, 0.45], [0.2, 0.2], [0.05, 0.05], [0.1, 0.1], [0.0, 0.0]]
    assert [promoted(points, i, up, 4) for i in range(8)] == [True] * 3 + [False] * 5  # 8 // 4 = 2 < front of 3
    assert promoted(points[2:], 1, up, 2)  # [0.45, 0.45]: second layer, within the top half
    assert not promoted(points[2:], 5, up, 2)
    assert promoted([[0.3, 0.3]], 0, up, 4)  # the first result of a rung is its front


def test_a_fidelity_spec_needs_samples_that_grow_every_rung():
    base = {"base": "/m/b", "experts": [{"name": "a", "path": "/m/a"}],
            "objectives": [{"task": "mmmo_add", "samples": 100}, {"task": "mmmo_sort", "samples": 10}]}
    spec = StudySpec.model_validate(base | {"fidelity": {"min_samples": 10, "eta": 3}})
    assert spec.ladder().counts[-1] == {"mmmo_add": 100, "mmmo_sort": 10}
    with pytest.raises(ValidationError, match="every rung must add items"):
        StudySpec.model_validate(base | {"fidelity": {"min_samples": 2, "eta": 2}})
    with pytest.raises(ValidationError, match="no lower rung fits"):
        StudySpec.model_validate(base | {"fidelity": {"min_samples": 30}})  # 30 x 4 > 100
    with pytest.raises(ValidationError, match="'samples' set"):
        StudySpec.model_validate(base | {"objectives": [{"task": "mmmo_add", "samples": None}],
                                         "fidelity": {"min_samples": 5}})
