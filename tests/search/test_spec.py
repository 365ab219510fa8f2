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


# Issue #15: bounded, finite specs; YAML without aliases.

ALIAS_BOMB = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},"
    f"*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)}]\n" for i in range(8))


def test_yaml_aliases_are_refused_before_they_expand(tmp_path):
    from search.spec import parse_spec_text

    assert len(ALIAS_BOMB) < 400  # 9**9 strings once expanded
    with pytest.raises(ValueError, match="aliases"):
        parse_spec_text(ALIAS_BOMB)
    path = tmp_path / "bomb.yaml"
    path.write_text(ALIAS_BOMB)
    with pytest.raises(ValueError, match="aliases"):
        load_spec(path)


def test_spec_documents_are_bounded_in_size_and_depth(tmp_path):
    from search.spec import MAX_SPEC_BYTES, parse_spec_text

    with pytest.raises(ValueError, match="at most"):
        parse_spec_text("#" * (MAX_SPEC_BYTES + 1))
    path = tmp_path / "big.yaml"
    path.write_text("name: x\n" + "#" * MAX_SPEC_BYTES)
    with pytest.raises(ValueError, match="at most"):
        load_spec(path)
    with pytest.raises(ValueError, match="nested"):
        parse_spec_text("[" * 5000 + "]" * 5000)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("place", [
    lambda v: {"search_space": {"weight": {"low": v, "high": 1.0}}},
    lambda v: {"search_space": {"weight": {"low": 0.0, "high": v}}},
    lambda v: {"reference_point": {"mmmo_add:exact_match": v}},
    lambda v: {"constraints": [{"objective": "mmmo_add:exact_match", "max": v}]},
    lambda v: {"constraints": [{"objective": "mmmo_add:exact_match", "min": v}]},
    lambda v: {"selection": {"policy": "weights", "weights": {"mmmo_add:exact_match": v}}},
    lambda v: {"budget": {"seconds": v}},
    lambda v: {"method_params": {"lambda": v}},
    lambda v: {"search_space": {"method_choices": {"lambda": [1.0, v]}}},
])
def test_non_finite_numbers_are_refused_everywhere(place, bad):
    with pytest.raises(ValidationError, match="finite|valid"):
        StudySpec.model_validate(BASE | place(bad))


def test_yaml_nan_and_infinity_are_refused():
    from search.spec import parse_spec_text

    for text in (".nan", ".inf", "-.inf"):
        data = parse_spec_text(f"base: /b\nexperts: [{{name: a, path: /a}}]\nobjectives: [{{task: t}}]\n"
                               f"reference_point: {{'t:exact_match': {text}}}\n")
        with pytest.raises(ValidationError, match="finite"):
            StudySpec.model_validate(data)


@pytest.mark.parametrize("search_space", [
    {},
    {"density": None},
    {"layer_groups": 2, "num_layers": 4},
    {"layer_groups": 3, "num_layers": 32, "filters": ["self_attn", "mlp"]},
    {"filters": ["mlp"], "method_choices": {"normalize": [True, False]}},
])
def test_dimensions_count_the_search_spaces_parameters(search_space):
    spec = StudySpec.model_validate(BASE | {"search_space": search_space})
    assert spec.dimensions() == len(SearchSpace(spec).distributions())


def test_search_space_size_and_layer_count_are_bounded():
    from search.spec import MAX_DIMENSIONS, MAX_LAYERS

    with pytest.raises(ValidationError) as info:
        StudySpec.model_validate(BASE | {"search_space": {"num_layers": 10_000, "layer_groups": 1}})
    assert ("search_space", "num_layers") in _locs(info.value)
    # 2 experts x 2 parameters x (1024 layers + rest) x 1: over the bound, whatever the base
    with pytest.raises(ValidationError, match=f"more than the {MAX_DIMENSIONS}"):
        StudySpec.model_validate(BASE | {"search_space": {"num_layers": MAX_LAYERS, "layer_groups": 1}})
    with pytest.raises(ValidationError, match=f"more than the {MAX_DIMENSIONS}"):
        StudySpec.model_validate(BASE | {"search_space": {"num_layers": 200, "layer_groups": 1,
                                                          "filters": ["q", "k", "v"]}})
    ok = StudySpec.model_validate(BASE | {"search_space": {"num_layers": 80, "layer_groups": 1}})
    assert ok.dimensions() == 2 * 2 * 81 <= MAX_DIMENSIONS
    with pytest.raises(ValidationError):
        StudySpec.model_validate(BASE | {"experts": [{"name": f"e{i}", "path": "/a"} for i in range(33)]})


def test_paths_beyond_the_os_limits_are_a_validation_error_not_an_os_error():
    for path, message in (("/m/" + "x" * 300, "components may be at most 255 bytes"),
                          ("/m" * 2100, "4096"), ("/m/a\x00b", "NUL")):
        for place in ({"base": path}, {"experts": [{"name": "a", "path": path}]},
                      {"experts": [{"name": "a", "path": "/a", "calibration": path}]},
                      {"objectives": [{"kind": "perplexity", "data": path}]}, {"task_paths": [path]}):
            with pytest.raises(ValidationError, match=message):
                StudySpec.model_validate(BASE | place)
