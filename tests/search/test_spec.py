import pytest
from pydantic import ValidationError

from search.space import SearchSpace
from search.spec import StudySpec, load_spec

BASE = {"base": "/b", "experts": [{"name": "a", "path": "/a"}, {"name": "b", "path": "/b2"}],
        "objectives": [{"task": "mmmo_add"}]}


def _locs(exc: ValidationError) -> list[tuple]:
    return [tuple(e["loc"]) for e in exc.errors()]


def test_density_outside_unit_interval_names_the_field():
    with pytest.raises(ValidationError) as info:
        StudySpec.model_validate(BASE | {"search_space": {"density": {"low": 0.0, "high": 1.0}}})
    assert ("search_space", "density") in _locs(info.value)


def test_duplicate_expert_names_rejected():
    with pytest.raises(ValidationError, match="unique"):
        StudySpec.model_validate(BASE | {"experts": [{"name": "a", "path": "/a"}, {"name": "a", "path": "/b"}]})


def test_unknown_field_rejected():
    with pytest.raises(ValidationError) as info:
        StudySpec.model_validate(BASE | {"budgett": {"trials": 3}})
    assert ("budgett",) in _locs(info.value)


def test_space_round_trips_to_a_merge_config():
    spec = StudySpec.model_validate(BASE)
    space = SearchSpace(spec)
    assert sorted(space.distributions()) == ["a.density", "a.weight", "b.density", "b.weight"]
    config = space.merge_config({"a.weight": 0.5, "a.density": 0.3, "b.weight": 1.0, "b.density": 0.9})
    assert [e.params for e in config.experts] == [{"weight": 0.5, "density": 0.3}, {"weight": 1.0, "density": 0.9}]
    assert config.fingerprint() == space.merge_config(dict(reversed(list(
        {"a.weight": 0.5, "a.density": 0.3, "b.weight": 1.0, "b.density": 0.9}.items())))).fingerprint()


def test_seeded_methods_are_the_methods_that_use_the_rng():
    from merging.methods import METHODS
    from merging.randomness import SEEDED_METHODS

    assert SEEDED_METHODS == {name for name, cls in METHODS.items() if cls.uses_rng}


def test_seed_reaches_the_merge_only_for_methods_that_draw_random_numbers():
    for method, seeded in (("dare_ties", True), ("ties", False), ("no_such_method", False)):
        spec = StudySpec.model_validate(BASE | {"method": method, "seed": 7})
        assert SearchSpace(spec).merge_config({}).seed == (7 if seeded else 0)


def test_yaml_spec_loads(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("base: /b\nexperts:\n  - {name: a, path: /a}\nobjectives:\n  - task: mmmo_add\n")
    assert load_spec(path).experts[0].name == "a"


def test_grouped_space_and_method_choices_round_trip():
    spec = StudySpec.model_validate(BASE | {"method": "obim", "search_space": {
        "layer_groups": 2, "num_layers": 4, "filters": ["self_attn", "mlp"],
        "method_choices": {"order": ["listed", "saliency"]}}})
    space = SearchSpace(spec)
    dists = space.distributions()
    # 3 layer parts (two groups + the rest) x 3 filter parts (two filters + other) x 2 params x 2 experts + order
    assert len(dists) == 3 * 3 * 2 * 2 + 1
    assert "a.weight@L2-3/mlp" in dists and "method.order" in dists
    params = {k: (d.choices[1] if k == "method.order" else d.low) for k, d in dists.items()}
    params["b.density@rest/other"] = 0.5
    config = space.merge_config(params)
    assert config.params["order"] == "saliency"
    assert config.experts[1].group_params["rest/other"]["density"] == 0.5
    assert config.grouping.group_of("model.layers.3.mlp.up_proj.weight") == "L2-3/mlp"
    assert config.grouping.group_of("lm_head.weight") == "rest/other"


def test_expert_named_method_is_refused():
    with pytest.raises(ValidationError, match="reserved"):
        StudySpec.model_validate(BASE | {"experts": [{"name": "method", "path": "/a"}]})


def test_objective_keys_match_the_evaluators():
    from service.specs import objectives_of

    spec = StudySpec.model_validate({
        "base": "b", "experts": [{"name": "e", "path": "p"}],
        "objectives": [{"task": "t"}, {"task": "u", "metric": "acc", "filter": "strict"}, {"kind": "sparsity"},
                       {"kind": "perplexity", "data": "/d/wiki.jsonl"}]})
    assert [o.key for o in spec.objectives] == [o.key for o in objectives_of(spec)]
    assert [o.key for o in spec.objectives] == ["t:exact_match", "u:acc,strict", "sparsity", "perplexity:wiki"]


def test_reference_point_in_objective_order_only_when_whole():
    body = {"base": "b", "experts": [{"name": "e", "path": "p"}], "objectives": [{"task": "t"}, {"task": "u"}]}
    whole = StudySpec.model_validate(body | {"reference_point": {"u:exact_match": 0.2, "t:exact_match": 0.1}})
    assert whole.reference() == [0.1, 0.2]
    assert StudySpec.model_validate(body | {"reference_point": {"t:exact_match": 0.1}}).reference() is None
    assert StudySpec.model_validate(body).reference() is None


def test_constraint_violations_follow_optunas_sign_and_decide_feasibility():
    from search.constraints import constraint_violations, is_feasible

    spec = StudySpec.model_validate(BASE | {"constraints": [{"objective": "sparsity", "max": 0.5},
                                                            {"objective": "mmmo_add:exact_match", "min": 0.2}]})
    values = {"sparsity": 0.25, "mmmo_add:exact_match": 0.1}
    assert constraint_violations(spec, values) == pytest.approx({"sparsity:max": -0.25,
                                                                 "mmmo_add:exact_match:min": 0.1})
    assert not is_feasible(spec, values)
    assert is_feasible(spec, values | {"mmmo_add:exact_match": 0.2})
    assert is_feasible(StudySpec.model_validate(BASE), values)
