"""The merge method as a searched categorical: each trial merges with its method and the
parameters that method takes; one front across methods; the export names each trial's method."""

from __future__ import annotations

import yaml
from fastapi.testclient import TestClient

from search.space import SearchSpace
from search.spec import StudySpec
from service import local
from service.app import create_app
from service.runner import TrialRunner
from service.services import Services
from tests.conftest import authorize, zoo_spec

METHODS = ["task_arithmetic", "ties", "dare_ties", "obim"]


def _spec(tiny_zoo) -> dict:
    return zoo_spec(tiny_zoo, trials=10) | {
        "method": METHODS, "method_params": {"normalize": False, "order": "saliency"},
        "objectives": [{"kind": "sparsity"}, {"task": "mmmo_add", "samples": 4}],
        "sampler": {"name": "random"}}


def test_each_trial_takes_its_methods_parameters(tiny_zoo):
    spec = StudySpec.model_validate(_spec(tiny_zoo))
    space = SearchSpace(spec)
    assert list(space.distributions()["method"].choices) == METHODS and spec.dimensions() == 5
    params = {"add.weight": 0.5, "add.density": 0.3, "reverse.weight": 1.0, "reverse.density": 0.6}
    ta = space.merge_config(params | {"method": "task_arithmetic"})
    # task arithmetic takes normalize (mergekit's task-arithmetic family), not density nor order
    assert ta.method == "task_arithmetic" and ta.params == {"normalize": False}
    assert ta.experts[0].params == {"weight": 0.5}
    ties = space.merge_config(params | {"method": "ties"})
    assert ties.params == {"normalize": False} and ties.experts[1].params == {"weight": 1.0, "density": 0.6}
    assert space.merge_config(params | {"method": "obim"}).params == {"order": "saliency"}


def test_a_study_searches_among_methods(settings, tiny_zoo):
    services = Services.start(settings)
    try:
        study_id = local.create(services, StudySpec.model_validate(_spec(tiny_zoo)))
        final = local.run(services, study_id, TrialRunner(trusted_task_paths=[]))
    finally:
        services.close()
    assert final["status"] == "done" and final["counts"] == {"complete": 10}, final.get("error")
    assert final["method"] == METHODS
    used = {t["params"]["method"] for t in final["trials"]}
    assert len(used) >= 3


def test_the_export_names_each_trials_method_and_bad_choices_are_422(sqlite_settings, tiny_zoo):
    with TestClient(create_app(sqlite_settings)) as client:
        authorize(client)
        bad = _spec(tiny_zoo) | {"method_params": {"no_such_param": 1}}
        response = client.post("/api/v1/studies", json=bad)
        assert response.status_code == 422 and "no parameter of any of the methods" in response.text
        response = client.post("/api/v1/studies", json=_spec(tiny_zoo) | {"method": ["ties", "nope"]})
        assert response.status_code == 422 and "nope" in response.text
        response = client.post("/api/v1/studies", json=_spec(tiny_zoo) | {"method": ["ties", "ties"]})
        assert response.status_code == 422 and "distinct" in response.text
        study = client.post("/api/v1/studies", json=_spec(tiny_zoo) | {"budget": {"trials": 4}}).json()
        assert study["method"] == METHODS
        listed = client.get("/api/v1/studies", params={"method": "obim"}).json()
        assert [s["id"] for s in listed] == [study["id"]]
        services = client.app.state.services
        local.run(services, study["id"], TrialRunner(trusted_task_paths=[]))
        trials = client.get(f"/api/v1/studies/{study['id']}/trials").json()
        for t in trials:
            exported = yaml.safe_load(client.get(f"/api/v1/studies/{study['id']}/trials/{t['number']}/export").text)
            assert exported["merge_method"] == t["params"]["method"]
