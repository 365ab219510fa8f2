"""Each trial records what its evaluation cost: the lm-eval items it scored and the seconds it took,
as its worker reports them (in process and over HTTP)."""

from __future__ import annotations

from search.spec import StudySpec
from service import local
from service.runner import TrialRunner
from service.services import Services
from tests.conftest import objective_keys, zoo_spec


def test_an_in_process_study_records_items_and_seconds(settings, tiny_zoo):
    spec = zoo_spec(tiny_zoo, trials=3, method="task_arithmetic") | {
        "objectives": [{"task": "mmmo_add", "samples": 4}, {"task": "mmmo_reverse", "samples": 6},
                       {"task": "mmmo_reverse_mc", "metric": "acc", "samples": 6}],
        "search_space": {"density": None}}
    services = Services.start(settings)
    try:
        final = local.run(services, local.create(services, StudySpec.model_validate(spec)),
                          TrialRunner(trusted_task_paths=[]))
    finally:
        services.close()
    assert final["counts"] == {"complete": 3}
    for t in final["trials"]:
        assert t["items"] == 16  # 4 + 6 + 6 documents, each scored once
        assert t["eval_seconds"] > 0 and t["eval_seconds"] <= t["duration_s"]


def test_a_worker_reports_its_cost_over_http(client, tiny_zoo):
    spec = zoo_spec(tiny_zoo, trials=2)
    study = client.post("/api/v1/studies", json=spec).json()
    values = dict(zip(objective_keys(spec), [0.5, 0.25], strict=True))
    lease = client.post("/api/v1/leases", json={"worker": "w"}).json()
    bad = client.post(f"/api/v1/leases/{lease['token']}/result", json={"values": values, "items": -1})
    assert bad.status_code == 422
    done = client.post(f"/api/v1/leases/{lease['token']}/result",
                       json={"values": values, "items": 40, "eval_seconds": 1.5})
    assert done.status_code == 200 and done.json()["items"] == 40
    lease = client.post("/api/v1/leases", json={"worker": "w"}).json()
    client.post(f"/api/v1/leases/{lease['token']}/result", json={"values": values})  # an older worker: no cost
    trials = client.get(f"/api/v1/studies/{study['id']}").json()["trials"]
    assert [(t["items"], t["eval_seconds"]) for t in trials] == [(40, 1.5), (None, None)]
