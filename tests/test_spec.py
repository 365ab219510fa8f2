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


def test_yaml_spec_loads(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("base: /b\nexperts:\n  - {name: a, path: /a}\nobjectives:\n  - task: mmmo_add\n")
    assert load_spec(path).experts[0].name == "a"
