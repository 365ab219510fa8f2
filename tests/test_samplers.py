"""One contract over every sampler, plus the pieces of the MM-MO proposer."""

from __future__ import annotations

import math

import numpy as np
import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution

from search.samplers import SAMPLERS, make_sampler
from search.samplers._mmmo_bo import de_candidate, posterior_variance
from search.spec import SamplerSpec

SPACE = {"a.weight": FloatDistribution(0.0, 1.5), "a.density": FloatDistribution(0.01, 1.0, log=True),
         "method.order": CategoricalDistribution(["listed", "saliency"])}


def _objectives(p: dict) -> list[float]:
    # a smooth two-objective trade-off with an interior optimum
    return [-(p["a.weight"] - 1.0) ** 2 - math.log(p["a.density"]) ** 2 / 10, -p["a.weight"]]


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_proposes_inside_the_space_with_ask_tell(name):
    spec = SamplerSpec(name=name, population_size=4, n_startup_trials=4)
    study = optuna.create_study(directions=["maximize", "maximize"], sampler=make_sampler(spec, seed=0))
    seen = set()
    for _ in range(14):
        trial = study.ask(SPACE)
        p = trial.params
        assert 0.0 <= p["a.weight"] <= 1.5 and 0.01 <= p["a.density"] <= 1.0
        assert p["method.order"] in ("listed", "saliency")
        seen.add((round(p["a.weight"], 6), round(p["a.density"], 6)))
        study.tell(trial, _objectives(p))
    assert len(seen) >= 8, "a sampler must explore (NSGA-II children may repeat a parent)"


def test_samplers_are_reproducible_from_the_seed():
    def run() -> list[float]:
        sampler = make_sampler(SamplerSpec(name="mmmo-bo", n_startup_trials=3), seed=5)
        study = optuna.create_study(directions=["maximize", "maximize"], sampler=sampler)
        out = []
        for _ in range(6):
            t = study.ask(SPACE)
            out.append(t.params["a.weight"])
            study.tell(t, _objectives(t.params))
        return out

    assert run() == run()


def test_de_candidate_stays_in_the_cube_and_crosses_over():
    rng = np.random.RandomState(0)
    base, a, b, c = np.full(6, 0.5), np.full(6, 0.9), np.ones(6), np.zeros(6)
    cand = de_candidate(base, a, b, c, rng, f=0.5, cr=0.5)
    assert ((cand >= 0) & (cand <= 1)).all()
    assert set(np.round(cand, 6)) <= {0.5, 1.0}  # each coordinate from base or the clipped mutant
    assert (cand == 1.0).any()
    assert (de_candidate(base, a, b, c, rng, cr=0.0) == 1.0).sum() == 1  # one coordinate at least


def test_posterior_variance_is_high_far_from_the_data():
    observed = np.array([[0.1, 0.1], [0.2, 0.15]])
    near, far = posterior_variance(np.array([[0.1, 0.1], [0.9, 0.9]]), observed)
    assert near < 0.01 and far > 0.9


def test_nsga2_breeds_its_first_children_from_a_model_proposed_warm_up():
    spec = SamplerSpec(name="nsga2", population_size=4, warmup_trials=8)
    study = optuna.create_study(directions=["maximize", "maximize"], sampler=make_sampler(spec, seed=1))
    for _ in range(14):
        trial = study.ask(SPACE)
        study.tell(trial, _objectives(trial.params))
    generations = [t.system_attrs["NSGAIISampler:generation"] for t in study.trials]
    assert generations[:8] == [0] * 8, "the whole warm-up is generation 0"
    assert all(g >= 1 for g in generations[8:]), "children after the warm-up"
    plain = make_sampler(SamplerSpec(name="nsga2", population_size=4, warmup_trials=0), seed=1)
    assert type(plain) is optuna.samplers.NSGAIISampler
