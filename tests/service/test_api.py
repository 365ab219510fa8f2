"""The HTTP API on SQLite and PostgreSQL: spec validation, leases, results, Pareto front.

The "worker" here is the test itself posting results over HTTP: the queue's behaviour does
not depend on what computed the numbers.
"""

from __future__ import annotations

import optuna
import pytest
import torch
from fastapi.testclient import TestClient

from service.app import create_app
from service.services import Services
from tests.conftest import authorize, objective_keys, zoo_spec


def _run_trials(client, spec, scores):
    numbers = []
    for s in scores:
        lease = client.post("/api/v1/leases", json={"worker": "w"}).json()
        numbers.append(lease["trial_number"])
        client.post(f"/api/v1/leases/{lease['token']}/result",
                    json={"values": dict(zip(objective_keys(spec), s, strict=True))})
    return numbers


@pytest.mark.parametrize(
    "mutate,loc",
    [
        (lambda s: s["experts"][0].update(path="/no/such/model"), ["body", "experts", 0, "path"]),
        (lambda s: s.update(base="/no/such/base"), ["body", "base"]),
        (lambda s: s.update(search_space={"density": {"low": 0.0, "high": 0.5}}), ["body", "search_space", "density"]),
        (lambda s: s.update(search_space={"density": {"low": 0.5, "high": 1.2}}), ["body", "search_space", "density"]),
        (lambda s: s["objectives"][1].update(task="no_such_task"), ["body", "objectives", 1, "task"]),
        (lambda s: s["objectives"][0].update(metric="bleu"), ["body", "objectives", 0, "metric"]),
        (lambda s: s.update(method="frankenmerge"), ["body", "method"]),
        (lambda s: s.update(method_params={"lambda": 1.0, "bogus": 2}), ["body", "method_params"]),
    ],
)
def test_bad_spec_is_422_naming_the_field_and_stores_nothing(client, settings, tiny_zoo, mutate, loc):
    spec = zoo_spec(tiny_zoo)
    mutate(spec)
    r = client.post("/api/v1/studies", json=spec)
    assert r.status_code == 422, r.text
    details = r.json()["detail"]
    assert any(d["loc"] == loc for d in details), details
    assert all(d["msg"] for d in details)
    assert client.get("/api/v1/studies").json() == []
    storage = optuna.storages.RDBStorage(settings.resolved_database_url())
    assert optuna.get_all_study_names(storage) == []


def test_lease_complete_and_stale_results(client, tiny_zoo):
    spec = zoo_spec(tiny_zoo, trials=3)
    study = client.post("/api/v1/studies", json=spec).json()
    lease = client.post("/api/v1/leases", json={"worker": "w1"}).json()
    assert lease["study_id"] == study["id"]
    assert [e["name"] for e in lease["merge_config"]["experts"]] == ["add", "reverse"]
    assert set(lease["merge_config"]["experts"][0]["params"]) == {"weight", "density"}
    token = lease["token"]

    bad = client.post(f"/api/v1/leases/{token}/result", json={"values": {"nope": 1.0}})
    assert bad.status_code == 422 and "keys" in bad.json()["detail"][0]["msg"]

    assert client.post(f"/api/v1/leases/{token}/heartbeat").status_code == 200
    values = dict(zip(objective_keys(spec), [0.5, 0.25], strict=True))
    done = client.post(f"/api/v1/leases/{token}/result", json={"values": values})
    assert done.status_code == 200 and done.json()["state"] == "complete"

    again = client.post(f"/api/v1/leases/{token}/result", json={"values": values})
    assert again.status_code == 409
    assert client.post(f"/api/v1/leases/{token}/heartbeat").status_code == 409

    detail = client.get(f"/api/v1/studies/{study['id']}").json()
    assert detail["trials"][0]["values"] == values
    assert detail["counts"]["complete"] == 1


def test_failed_evaluation_keeps_the_reason_and_the_study_goes_on(client, tiny_zoo):
    spec = zoo_spec(tiny_zoo, trials=2)
    study = client.post("/api/v1/studies", json=spec).json()
    first = client.post("/api/v1/leases", json={"worker": "w"}).json()
    r = client.post(f"/api/v1/leases/{first['token']}/result", json={"error": "EvaluationError: NaN"})
    assert r.json()["state"] == "failed"
    second = client.post("/api/v1/leases", json={"worker": "w"}).json()
    assert second["trial_number"] != first["trial_number"]
    trials = client.get(f"/api/v1/studies/{study['id']}").json()["trials"]
    assert trials[0]["error"] == "EvaluationError: NaN"


def test_expired_lease_is_re_leased_then_failed_after_max_attempts(settings, clock, tiny_zoo):
    settings = settings.model_copy(update={"lease_seconds": 30, "max_attempts": 2})
    with TestClient(create_app(settings, Services.start(settings, clock=clock))) as client:
        authorize(client)
        spec = zoo_spec(tiny_zoo, trials=2)
        study = client.post("/api/v1/studies", json=spec).json()
        first = client.post("/api/v1/leases", json={"worker": "slow"}).json()
        clock.advance(29)
        assert client.post(f"/api/v1/leases/{first['token']}/heartbeat").status_code == 200  # renewed: 30 s more
        clock.advance(29)
        assert client.post("/api/v1/leases", json={"worker": "fast"}).json()["trial_number"] != first["trial_number"]
        clock.advance(2)  # past the renewed expiry
        second = client.post("/api/v1/leases", json={"worker": "fast"}).json()
        assert second["trial_number"] == first["trial_number"]
        assert second["token"] != first["token"]
        values = dict.fromkeys(objective_keys(spec), 0.1)
        assert client.post(f"/api/v1/leases/{first['token']}/result", json={"values": values}).status_code == 409
        clock.advance(31)
        third = client.post("/api/v1/leases", json={"worker": "w"}).json()
        assert third["trial_number"] != first["trial_number"]
        trial = next(t for t in client.get(f"/api/v1/studies/{study['id']}").json()["trials"]
                     if t["number"] == first["trial_number"])
        assert trial["state"] == "failed" and trial["attempts"] == 2
        assert "lease expired" in trial["error"]


def test_budget_reached_marks_done_and_pareto_lists_the_front(client, tiny_zoo):
    spec = zoo_spec(tiny_zoo, trials=3)
    study = client.post("/api/v1/studies", json=spec).json()
    numbers = _run_trials(client, spec, [(0.9, 0.1), (0.1, 0.9), (0.05, 0.05)])
    assert client.post("/api/v1/leases", json={"worker": "w"}).status_code == 204
    detail = client.get(f"/api/v1/studies/{study['id']}").json()
    assert detail["status"] == "done"
    pareto = client.get(f"/api/v1/studies/{study['id']}/pareto").json()
    assert sorted(t["number"] for t in pareto["front"]) == sorted(numbers[:2])
    assert pareto["selected"] in numbers[:2]
    assert pareto["hypervolume"] > 0


def test_unknown_study_is_404(client):
    assert client.get("/api/v1/studies/999").status_code == 404
    assert client.get("/api/v1/studies/999/pareto").status_code == 404


def test_identical_configuration_in_another_study_is_answered_from_the_cache(client, tiny_zoo):
    spec = zoo_spec(tiny_zoo, trials=2)
    first = client.post("/api/v1/studies", json=spec).json()
    for _ in range(2):
        lease = client.post("/api/v1/leases", json={"worker": "w"}).json()
        client.post(f"/api/v1/leases/{lease['token']}/result",
                    json={"values": dict(zip(objective_keys(spec), [0.3, 0.6], strict=True))})
    # Same seed, same sampler: the second study proposes the same configurations.
    second = client.post("/api/v1/studies", json=spec).json()
    assert client.post("/api/v1/leases", json={"worker": "w"}).status_code == 204
    detail = client.get(f"/api/v1/studies/{second['id']}").json()
    assert detail["status"] == "done"
    assert all(t["cached"] and t["worker"] is None for t in detail["trials"])
    original = client.get(f"/api/v1/studies/{first['id']}").json()["trials"]
    assert [t["values"] for t in detail["trials"]] == [t["values"] for t in original]


def test_objective_directions_resolve_from_lm_eval_and_kind(client, tiny_zoo):
    spec = zoo_spec(tiny_zoo, trials=1)
    spec["objectives"].append({"kind": "sparsity"})
    study = client.post("/api/v1/studies", json=spec).json()
    directions = {o["key"]: o["direction"] for o in study["objectives"]}
    assert directions == {"mmmo_add:exact_match": "maximize", "mmmo_reverse:exact_match": "maximize",
                          "sparsity": "minimize"}


def test_perplexity_objective_needs_readable_data(client, tiny_zoo):
    spec = zoo_spec(tiny_zoo)
    spec["objectives"].append({"kind": "perplexity"})
    assert client.post("/api/v1/studies", json=spec).status_code == 422
    spec["objectives"][-1]["data"] = "/no/such/file.jsonl"
    r = client.post("/api/v1/studies", json=spec)
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "objectives", 2, "data"]


def test_released_lease_goes_back_to_the_queue_without_costing_an_attempt(client, tiny_zoo):
    spec = zoo_spec(tiny_zoo, trials=2)
    study = client.post("/api/v1/studies", json=spec).json()
    first = client.post("/api/v1/leases", json={"worker": "w"}).json()
    assert client.post(f"/api/v1/leases/{first['token']}/release").status_code == 200
    assert client.post(f"/api/v1/leases/{first['token']}/release").status_code == 409
    again = client.post("/api/v1/leases", json={"worker": "w2"}).json()
    assert again["trial_number"] == first["trial_number"]
    trial = client.get(f"/api/v1/studies/{study['id']}").json()["trials"][0]
    assert trial["attempts"] == 1 and trial["worker"] == "w2"


def test_constraints_exclude_infeasible_trials_from_front_and_tell_optuna(client, settings, tiny_zoo):
    spec = zoo_spec(tiny_zoo, trials=3)
    spec["constraints"] = [{"objective": "mmmo_add:exact_match", "min": 0.2}]
    spec["selection"] = {"policy": "best:mmmo_reverse:exact_match"}
    study = client.post("/api/v1/studies", json=spec).json()
    numbers = _run_trials(client, spec, [(0.9, 0.1), (0.1, 0.95), (0.5, 0.5)])
    pareto = client.get(f"/api/v1/studies/{study['id']}/pareto").json()
    assert sorted(t["number"] for t in pareto["front"]) == sorted([numbers[0], numbers[2]])
    assert pareto["selected"] == numbers[2]  # best reverse score among the feasible
    detail = client.get(f"/api/v1/studies/{study['id']}").json()
    storage = optuna.storages.RDBStorage(settings.resolved_database_url())
    name = optuna.get_all_study_names(storage)[0]
    trials = optuna.load_study(study_name=name, storage=storage).trials
    assert trials[numbers[1]].constraints == {"mmmo_add:exact_match:min": pytest.approx(0.1)}
    assert trials[numbers[0]].constraints == {"mmmo_add:exact_match:min": pytest.approx(-0.7)}
    assert detail["status"] == "done"


def test_unknown_constraint_or_selection_objective_is_422(client, tiny_zoo):
    spec = zoo_spec(tiny_zoo)
    spec["constraints"] = [{"objective": "nope", "max": 1}]
    r = client.post("/api/v1/studies", json=spec)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "constraints", 0, "objective"]
    spec["constraints"] = []
    spec["selection"] = {"policy": "best:nope"}
    assert client.post("/api/v1/studies", json=spec).json()["detail"][0]["loc"] == ["body", "selection"]


def test_hypervolume_history_is_monotone(client, tiny_zoo):
    spec = zoo_spec(tiny_zoo, trials=4)
    study = client.post("/api/v1/studies", json=spec).json()
    _run_trials(client, spec, [(0.2, 0.2), (0.1, 0.1), (0.6, 0.3), (0.3, 0.7)])
    history = client.get(f"/api/v1/studies/{study['id']}/hypervolume").json()
    assert len(history) == 4
    hv = [h["hypervolume"] for h in history]
    assert hv == sorted(hv) and hv[-1] > hv[0]
    assert hv[-1] == pytest.approx(client.get(f"/api/v1/studies/{study['id']}/pareto").json()["hypervolume"])


def test_export_trial_as_mergekit_and_spec(client, tiny_zoo):
    import yaml

    from merging.mergekit_yaml import parse_mergekit

    spec = zoo_spec(tiny_zoo, trials=1)
    study = client.post("/api/v1/studies", json=spec).json()
    lease = client.post("/api/v1/leases", json={"worker": "w"}).json()
    text = client.get(f"/api/v1/studies/{study['id']}/trials/{lease['trial_number']}/export").text
    plan = parse_mergekit(text)
    assert plan.config.method == "ties"
    assert [e.params for e in plan.config.experts] == [e["params"] for e in lease["merge_config"]["experts"]]
    ours = yaml.safe_load(client.get(f"/api/v1/studies/{study['id']}/trials/{lease['trial_number']}/export",
                                     params={"format": "spec"}).text)
    assert ours == lease["merge_config"]
    assert client.get(f"/api/v1/studies/{study['id']}/trials/99/export").status_code == 404


def test_time_budget_stops_new_trials(clock_client, clock, tiny_zoo):
    client = clock_client
    spec = zoo_spec(tiny_zoo, trials=50)
    spec["budget"]["seconds"] = 20.0  # shorter than a lease (30 s): no lease expires here
    study = client.post("/api/v1/studies", json=spec).json()
    first = client.post("/api/v1/leases", json={"worker": "w"}).json()
    clock.advance(19)
    second = client.post("/api/v1/leases", json={"worker": "w"})
    assert second.status_code == 200  # still within the budget
    clock.advance(2)
    assert client.post("/api/v1/leases", json={"worker": "w"}).status_code == 204
    values = {"values": dict.fromkeys(objective_keys(spec), 0.5)}
    client.post(f"/api/v1/leases/{second.json()['token']}/result", json=values)
    assert client.get(f"/api/v1/studies/{study['id']}").json()["status"] == "running"  # one still in flight
    client.post(f"/api/v1/leases/{first['token']}/result", json=values)
    assert client.post("/api/v1/leases", json={"worker": "w"}).status_code == 204
    assert client.get(f"/api/v1/studies/{study['id']}").json()["status"] == "done"


def test_layer_groups_read_the_layer_count_from_the_base(client, tiny_zoo, tmp_path):
    spec = zoo_spec(tiny_zoo, trials=1)
    spec["search_space"] = {"layer_groups": 2, "filters": ["mlp"]}
    # groups with values of their own from the first trial (the default warm-up ties them)
    spec["sampler"] |= {"tie_groups": False}
    study = client.post("/api/v1/studies", json=spec).json()
    lease = client.post("/api/v1/leases", json={"worker": "w"}).json()
    assert lease["merge_config"]["grouping"] == {"layer_groups": 2, "num_layers": 4, "filters": ["mlp"]}
    groups = lease["merge_config"]["experts"][0]["group_params"]
    assert sorted(groups) == ["L0-1/mlp", "L0-1/other", "L2-3/mlp", "L2-3/other", "rest/mlp", "rest/other"]
    # mergekit's form: filter entries with per-layer gradients, which merge to the trial's tensors
    r = client.get(f"/api/v1/studies/{study['id']}/trials/{lease['trial_number']}/export")
    assert r.status_code == 200 and "filter: mlp" in r.text
    from merging.config import MergeConfig
    from merging.files import merge_to_dir
    from merging.io import CheckpointReader
    from merging.mergekit_yaml import parse_mergekit

    exported = parse_mergekit(r.text).config
    assert exported.grouping is None
    trial = CheckpointReader(merge_to_dir(MergeConfig.from_dict(lease["merge_config"]), tmp_path / "trial"))
    again = CheckpointReader(merge_to_dir(exported, tmp_path / "exported"))
    assert all(torch.equal(trial.get(n), again.get(n)) for n in trial.keys())


def test_warm_start_seeds_evaluated_trials_outside_the_budget(client, settings, tiny_zoo):
    spec = zoo_spec(tiny_zoo, trials=3)
    first = client.post("/api/v1/studies", json=spec).json()
    _run_trials(client, spec, [(0.9, 0.1), (0.1, 0.9), (0.5, 0.5)])
    warm = dict(spec, seed=7, warm_start=[first["id"]], budget={"trials": 2})
    second = client.post("/api/v1/studies", json=warm).json()
    detail = client.get(f"/api/v1/studies/{second['id']}").json()
    assert len(detail["trials"]) == 3 and all(t["state"] == "complete" and t["cached"] for t in detail["trials"])
    assert sorted(tuple(t["values"].values()) for t in detail["trials"]) == [(0.1, 0.9), (0.5, 0.5), (0.9, 0.1)]
    storage = optuna.storages.RDBStorage(settings.resolved_database_url())
    loaded = [optuna.load_study(study_name=n, storage=storage) for n in optuna.get_all_study_names(storage)]
    assert len(loaded) == 2 and all(len(s.trials) == 3 for s in loaded)
    for s in loaded:  # sampled or copied, every trial sits in NSGA-II's generation 0: parents to come
        assert all(t.system_attrs.get("NSGAIISampler:generation") == 0 for t in s.trials)
    leases = [client.post("/api/v1/leases", json={"worker": "w"}).json() for _ in range(2)]
    assert {lease["study_id"] for lease in leases} == {second["id"]}
    assert client.post("/api/v1/leases", json={"worker": "w"}).status_code == 204  # budget: 2 new trials


def test_warm_start_from_unknown_or_different_study_is_422(client, tiny_zoo):
    spec = zoo_spec(tiny_zoo, trials=1)
    r = client.post("/api/v1/studies", json=dict(spec, warm_start=[42]))
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "warm_start", 0]
    other = client.post("/api/v1/studies", json=zoo_spec(tiny_zoo, experts=("sort", "upper"))).json()
    r = client.post("/api/v1/studies", json=dict(spec, warm_start=[other["id"]]))
    assert r.status_code == 422 and "same base" in r.json()["detail"][0]["msg"]


def test_mmmo_bo_sampler_runs_through_the_server(client, tiny_zoo):
    spec = zoo_spec(tiny_zoo, trials=5)
    spec["sampler"] = {"name": "mmmo-bo", "n_startup_trials": 3}
    study = client.post("/api/v1/studies", json=spec).json()
    _run_trials(client, spec, [(0.1 * i, 1 - 0.1 * i) for i in range(5)])
    detail = client.get(f"/api/v1/studies/{study['id']}").json()
    assert detail["status"] == "done" and len({str(t["params"]) for t in detail["trials"]}) == 5


def test_a_users_own_task_directory(client, tiny_zoo, tmp_path):
    from evals.synthetic import DATA_DIR

    tasks = tmp_path / "my_tasks"
    tasks.mkdir()
    (tasks / "my_add.yaml").write_text(f"""task: my_add
dataset_path: json
dataset_kwargs:
  data_files:
    test: {DATA_DIR / 'add' / 'test.jsonl'}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
target_delimiter: ""
generation_kwargs: {{until: ["\\n"], max_gen_toks: 8, do_sample: false}}
metric_list: [{{metric: exact_match, aggregation: mean, higher_is_better: true}}]
""")
    spec = zoo_spec(tiny_zoo, trials=1)
    spec["objectives"] = [{"task": "my_add", "samples": 10}]
    r = client.post("/api/v1/studies", json=spec)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "objectives", 0, "task"]
    spec["task_paths"] = [str(tmp_path / "nope")]
    assert client.post("/api/v1/studies", json=spec).json()["detail"][0]["loc"] == ["body", "task_paths", 0]
    spec["task_paths"] = [str(tasks)]
    assert client.post("/api/v1/studies", json=spec).status_code == 201
    lease = client.post("/api/v1/leases", json={"worker": "w"}).json()
    assert lease["task_paths"] == [str(tasks)]

    from evals.objective import Objective
    from merging.config import MergeConfig
    from service.runner import TrialRunner

    values = TrialRunner().run(MergeConfig.from_dict(lease["merge_config"]),
                               [Objective(**o) for o in lease["objectives"]], tuple(lease["task_paths"]))
    assert 0.0 <= values["my_add:exact_match"] <= 1.0


def test_cancel_clone_delete_and_search(client, settings, tiny_zoo):
    spec = zoo_spec(tiny_zoo, trials=4)
    study = client.post("/api/v1/studies", json=spec).json()
    other = client.post("/api/v1/studies",
                        json=zoo_spec(tiny_zoo, experts=("sort", "upper"), method="dare_ties")).json()
    held = client.post("/api/v1/leases", json={"worker": "w"}).json()
    assert held["study_id"] == study["id"]
    cancelled = client.post(f"/api/v1/studies/{study['id']}/cancel").json()
    assert cancelled["status"] == "cancelled"
    # results of trials in flight are still accepted, but no new trial of the study starts
    r = client.post(f"/api/v1/leases/{held['token']}/result", json={"values": dict.fromkeys(objective_keys(spec), 0.4)})
    assert r.status_code == 200
    assert client.post("/api/v1/leases", json={"worker": "w"}).json()["study_id"] == other["id"]

    assert [s["id"] for s in client.get("/api/v1/studies", params={"status": "cancelled"}).json()] == [study["id"]]
    assert [s["id"] for s in client.get("/api/v1/studies", params={"method": "dare_ties"}).json()] == [other["id"]]
    assert [s["id"] for s in client.get("/api/v1/studies", params={"model": "expert-reverse"}).json()] == [study["id"]]
    assert len(client.get("/api/v1/studies", params={"q": "TEST STUDY"}).json()) == 2

    clone = client.post(f"/api/v1/studies/{study['id']}/clone")
    assert clone.status_code == 201 and clone.json()["status"] == "running"
    assert client.get(f"/api/v1/studies/{clone.json()['id']}").json()["spec"] == \
        client.get(f"/api/v1/studies/{study['id']}").json()["spec"]

    assert client.delete(f"/api/v1/studies/{study['id']}").status_code == 204
    assert client.get(f"/api/v1/studies/{study['id']}").status_code == 404
    storage = optuna.storages.RDBStorage(settings.resolved_database_url())
    assert len(optuna.get_all_study_names(storage)) == 2


def test_metrics_in_prometheus_text(client, tiny_zoo):
    spec = zoo_spec(tiny_zoo, trials=2)
    client.post("/api/v1/studies", json=spec)
    _run_trials(client, spec, [(0.1, 0.2)])
    client.post("/api/v1/leases", json={"worker": "busy"})
    text = client.get("/metrics").text
    assert 'mmmo_studies{status="running"} 1' in text
    assert 'mmmo_trials{state="complete"} 1' in text and 'mmmo_trials{state="leased"} 1' in text
    assert "mmmo_busy_workers 1" in text and "mmmo_trial_duration_seconds_count 1" in text


def test_reference_point_from_the_spec(client, tiny_zoo):
    spec = zoo_spec(tiny_zoo, trials=2)
    keys = objective_keys(spec)
    spec["reference_point"] = dict.fromkeys(keys, 0.0)
    study = client.post("/api/v1/studies", json=spec).json()
    _run_trials(client, spec, [(0.5, 0.5), (1.0, 0.25)])
    pareto = client.get(f"/api/v1/studies/{study['id']}/pareto").json()
    assert pareto["reference"] == [0.0, 0.0]
    assert pareto["hypervolume"] == pytest.approx(0.5 * 0.5 + 0.5 * 0.25)  # the union of two boxes from the origin
    spec["reference_point"] = {"nope": 0.0}
    assert client.post("/api/v1/studies", json=spec).json()["detail"][0]["loc"] == ["body", "reference_point"]


def test_trials_asked_but_never_recorded_are_failed_in_optuna(client, tiny_zoo):
    from search.spec import StudySpec
    from service import results, studies

    spec = zoo_spec(tiny_zoo, trials=3)
    study_id = client.post("/api/v1/studies", json=spec).json()["id"]
    services = client.app.state.services
    with services.sessions() as session:
        study = studies.get_study(session, study_id, None)
        name, parsed = study.optuna_name, StudySpec.model_validate(study.spec)
        orphan, _ = services.optuna.ask(name, parsed)  # as if the asking process died right after
        assert results.fail_orphans(session, services.optuna, study, older_than_s=3600) == []  # too recent
        lease = client.post("/api/v1/leases", json={"worker": "w"}).json()
        assert lease["trial_number"] != orphan
        assert results.fail_orphans(session, services.optuna, study, older_than_s=0) == [orphan]
    trials = optuna.load_study(study_name=name, storage=services.optuna.storage).trials
    assert trials[orphan].state == optuna.trial.TrialState.FAIL
    assert trials[lease["trial_number"]].state == optuna.trial.TrialState.RUNNING  # ours, leased: untouched
