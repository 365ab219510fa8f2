"""Searching a method's global parameters (slerp's ``t``) per layer group and filter: the spec, the
distributions, and the MergeConfig whose per-tensor values are the searched groups' values."""

from __future__ import annotations

import pytest
import yaml
from pydantic import ValidationError

from merging.config import Grouping
from merging.mergekit_yaml import parse_mergekit, to_mergekit
from merging.plan import MergePlan
from search.space import SearchSpace
from search.spec import MAX_DIMENSIONS, StudySpec

SLERP = {"base": "/b", "experts": [{"name": "a", "path": "/a"}], "objectives": [{"task": "mmmo_add"}],
         "method": "slerp"}
SLERP_SPACE = {"weight": None, "density": None, "method_params": {"t": {"low": 0.0, "high": 1.0}}}
LAYERS = 8


def _names(num_layers: int = LAYERS) -> list[str]:
    """A Llama checkpoint's tensor names."""
    per_layer = ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.o_proj.weight",
                 "mlp.gate_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight",
                 "post_attention_layernorm.weight"]
    return (["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
            + [f"model.layers.{i}.{n}" for i in range(num_layers) for n in per_layer])


def _spec(space: dict, **extra) -> StudySpec:
    return StudySpec.model_validate(SLERP | extra | {"search_space": SLERP_SPACE | space})


def _distinct_values(space: SearchSpace) -> dict[str, float]:
    """A value per dimension, all different and inside [0, 1]."""
    dists = space.distributions()
    return {key: round(0.05 + 0.9 * i / len(dists), 6) for i, key in enumerate(sorted(dists))}


def _t(config, name: str, names: list[str]) -> float:
    return MergePlan(config, names=names).params_for(name)[1]["t"]


def test_t_per_layer_group_and_filter_is_one_dimension_per_group():
    spec = _spec({"layer_groups": 4, "num_layers": LAYERS, "filters": ["self_attn", "mlp"]})
    dists = SearchSpace(spec).distributions()
    # 2 layer groups x (2 filters + other) + the tensors outside the layers; no weight, no density
    parts = ("self_attn", "mlp", "other")
    assert sorted(dists) == sorted([f"method.t@{g}/{f}" for g in ("L0-3", "L4-7") for f in parts]
                                   + ["method.t@rest/other"])
    assert all(d.low == 0.0 and d.high == 1.0 for d in dists.values())
    assert spec.dimensions() == len(dists)


@pytest.mark.parametrize("space", [
    {},
    {"filters": ["self_attn", "mlp"]},
    {"layer_groups": 3, "num_layers": LAYERS},
    {"layer_groups": 3, "num_layers": LAYERS, "filters": ["self_attn", "mlp"]},
    {"layer_groups": 1, "num_layers": LAYERS, "filters": ["mlp"], "weight": {"low": 0, "high": 1},
     "method_params": {"t": {"low": 0, "high": 1}, "lambda": {"low": 0.5, "high": 1.5}}},
])
def test_dimensions_count_the_searched_method_parameters(space):
    spec = _spec(space)
    assert spec.dimensions() == len(SearchSpace(spec).distributions())


def test_without_groups_t_is_one_global_dimension():
    space = SearchSpace(_spec({}))
    assert list(space.distributions()) == ["method.t"]
    assert space.merge_config({"method.t": 0.25}).params == {"t": 0.25}


@pytest.mark.parametrize("space", [
    {"layer_groups": 3, "num_layers": LAYERS, "filters": ["self_attn", "mlp"]},
    {"layer_groups": 3, "num_layers": LAYERS},
    {"layer_groups": 1, "num_layers": LAYERS, "filters": ["mlp"]},
    {"filters": ["self_attn", "mlp"]},
    {"layer_groups": 8, "num_layers": LAYERS, "filters": ["self_attn"]},  # one group of every layer
])
def test_every_tensor_gets_its_groups_searched_value(space):
    spec = _spec(space)
    search = SearchSpace(spec)
    values = _distinct_values(search)
    config = search.merge_config(values)
    names = _names()
    grouping = Grouping(spec.search_space.layer_groups, LAYERS, tuple(spec.search_space.filters))
    seen = set()
    for name in names:
        group = grouping.group_of(name)
        if group.startswith("rest/") and grouping.filters:  # one group outside the layers (no name has a filter)
            group = "rest/other"
        key = f"method.t@{group}"
        assert _t(config, name, names) == values[key], (name, key)
        seen.add(key)
    assert seen == set(values), "every searched group has tensors here"
    # the exported mergekit YAML is the same setting: it merges to the same per-tensor values
    again = parse_mergekit(to_mergekit(config, tensor_names=names)).config
    for name in names:
        assert MergePlan(again, names=names, num_layers=LAYERS).params_for(name)[1]["t"] == _t(config, name, names)


def test_a_gradient_with_three_entries_per_layer_where_two_would_blend():
    """80 layers in groups of 5: mergekit's layer positions are a hair off the list's entries for
    some layers, so the setting lists each value three times; every layer still gets its value."""
    spec = _spec({"layer_groups": 5, "num_layers": 80})
    search = SearchSpace(spec)
    values = _distinct_values(search)
    config = search.merge_config(values)
    names = _names(80)
    for name in names:
        group = Grouping(5, 80).group_of(name)
        assert _t(config, name, names) == values[f"method.t@{group}"], name


def test_outside_the_layers_one_group_and_a_filter_takes_its_first_layer_groups_value():
    """The documented restriction: ``model.norm.weight`` contains the filter 'norm'."""
    spec = _spec({"layer_groups": 4, "num_layers": LAYERS, "filters": ["norm"]})
    search = SearchSpace(spec)
    assert "method.t@rest/norm" not in search.distributions()
    values = _distinct_values(search)
    config = search.merge_config(values)
    names = _names()
    assert _t(config, "model.norm.weight", names) == values["method.t@L0-3/norm"]
    assert _t(config, "model.embed_tokens.weight", names) == values["method.t@rest/other"]
    assert _t(config, "model.layers.5.input_layernorm.weight", names) == values["method.t@L4-7/norm"]


def test_the_config_exports_as_mergekit_filter_entries_with_per_layer_gradients():
    spec = _spec({"layer_groups": 4, "num_layers": LAYERS, "filters": ["self_attn", "mlp"]})
    search = SearchSpace(spec)
    config = search.merge_config(_distinct_values(search))
    doc = yaml.safe_load(to_mergekit(config, tensor_names=_names()))
    t = doc["parameters"]["t"]
    assert [e.get("filter") for e in t] == ["self_attn", "mlp", "layers.", None]
    assert all(isinstance(e["value"], list) for e in t[:3])  # per-layer gradients


def test_weight_is_searched_or_not():
    spec = StudySpec.model_validate(SLERP | {"method": "nuslerp", "experts": [{"name": "a", "path": "/a"},
                                                                            {"name": "b", "path": "/b2"}],
                                             "search_space": {"density": None}})
    assert sorted(SearchSpace(spec).distributions()) == ["a.weight", "b.weight"]


@pytest.mark.parametrize("bad,match", [
    ({"search_space": {"weight": None, "density": None}}, "no parameters"),
    ({"method_params": {"t": 0.5}, "search_space": SLERP_SPACE}, r"\['t'\] both fixed"),
    ({"search_space": SLERP_SPACE | {"method_choices": {"t": [0.2, 0.4]}}}, "both as a range"),
    ({"search_space": SLERP_SPACE | {"filters": ["*"]}}, "'\\*' means every tensor"),
    ({"search_space": SLERP_SPACE | {"method_params": {"t": {"low": 1.0, "high": 0.0}}}}, "above high"),
])
def test_bad_searched_method_params_are_refused(bad, match):
    with pytest.raises(ValidationError, match=match):
        StudySpec.model_validate(SLERP | bad)


def test_method_params_count_towards_the_dimension_bound():
    with pytest.raises(ValidationError, match=f"more than the {MAX_DIMENSIONS}"):
        _spec({"layer_groups": 1, "num_layers": 600, "filters": ["self_attn"],
               "method_params": {"t": {"low": 0, "high": 1}}})
    assert _spec({"layer_groups": 1, "num_layers": 500}).dimensions() == 501
