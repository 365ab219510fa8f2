import random

import pytest

from search.pareto import hypervolume, hypervolume_improvement, knee_point, pareto_front


def test_front_respects_directions():
    pts = [(1, 5), (2, 2), (3, 4), (0, 0)]
    assert pareto_front(pts, ["maximize", "maximize"]) == [0, 2]
    assert pareto_front(pts, ["minimize", "minimize"]) == [3]
    assert pareto_front(pts, ["maximize", "minimize"]) == [1, 2, 3]


def test_front_keeps_duplicates_of_a_front_point():
    assert pareto_front([(1, 1), (1, 1), (0, 0)], ["maximize", "maximize"]) == [0, 1]


def test_hypervolume_2d_known_value():
    # staircase of (1,3), (2,2), (3,1) against (0,0), maximising: 3 + 2 + 1 = 6
    assert hypervolume([(1, 3), (2, 2), (3, 1)], (0, 0), ["maximize", "maximize"]) == pytest.approx(6.0)


def test_hypervolume_ignores_dominated_and_out_of_reference_points():
    pts = [(1, 3), (2, 2), (3, 1), (1, 1), (-1, 5)]
    assert hypervolume(pts, (0, 0), ["maximize", "maximize"]) == pytest.approx(6.0)


def test_hypervolume_3d_matches_monte_carlo():
    rng = random.Random(0)
    pts = [(rng.random(), rng.random(), rng.random()) for _ in range(12)]
    exact = hypervolume(pts, (1.0, 1.0, 1.0), ["minimize"] * 3)
    n = 200_000
    hits = 0
    for _ in range(n):
        q = (rng.random(), rng.random(), rng.random())
        hits += any(all(p[i] <= q[i] for i in range(3)) for p in pts)
    assert exact == pytest.approx(hits / n, abs=0.01)


def test_knee_is_on_the_front_and_balanced():
    pts = [(0.0, 1.0), (0.7, 0.7), (1.0, 0.0), (0.2, 0.2)]
    assert knee_point(pts, ["maximize", "maximize"]) == 1
    assert knee_point([], ["maximize"]) is None


def test_hypervolume_improvement_equals_the_difference_of_volumes():
    rng = random.Random(3)
    for dims, directions in ((2, ["maximize", "minimize"]), (3, ["maximize"] * 3), (4, ["minimize"] * 4)):
        ref = [0.0 if d == "maximize" else 1.0 for d in directions]
        points = [[rng.random() for _ in range(dims)] for _ in range(40)]
        front = [points[i] for i in pareto_front(points, directions)]
        for new in ([rng.random() for _ in range(dims)] for _ in range(10)):
            expected = hypervolume([*front, new], ref, directions) - hypervolume(front, ref, directions)
            assert hypervolume_improvement(front, new, ref, directions) == pytest.approx(expected, abs=1e-12)


def test_hypervolume_trace_measures_every_prefix():
    from search.pareto import hypervolume_trace

    rng = random.Random(5)
    directions = ["maximize", "minimize", "maximize"]
    points = [[rng.random() for _ in range(3)] for _ in range(60)]
    ref = [0.0, 1.0, 0.0]
    trace = hypervolume_trace(points, ref, directions)
    assert trace == pytest.approx([hypervolume(points[: i + 1], ref, directions) for i in range(60)], abs=1e-12)


def test_reference_point_is_the_given_one_else_just_beyond_the_worst_value():
    from search.pareto import reference_point

    values = [[0.2, 3.0], [0.6, 1.0]]
    directions, keys = ["maximize", "minimize"], ["acc", "ppl"]
    assert reference_point(values, directions, keys) == pytest.approx([0.2 - 0.04, 3.0 + 0.2])
    assert reference_point(values, directions, keys, {"ppl": 10.0}) == pytest.approx([0.16, 10.0])
    assert reference_point([[0.5, 2.0]], directions, keys) == pytest.approx([0.4, 2.1])  # no range: 0.1
