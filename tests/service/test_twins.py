"""A configuration proposed while a trial of the same team is still evaluating it (its twin) is
never evaluated twice: it waits, is answered from the twin's result, and is evaluated itself
only if the twin fails. On SQLite and PostgreSQL, with a search space of one point, so every
proposal repeats the first."""

from __future__ import annotations

import optuna

from service.db.models import Trial
from tests.conftest import objective_keys, zoo_spec


def _one_point(tiny_zoo, trials: int) -> dict:
    return zoo_spec(tiny_zoo, trials=trials) | {
        "search_space": {"weight": {"low": 0.5, "high": 0.5}, "density": None}, "sampler": {"name": "random"}}


def _lease(client) -> dict | None:
    r = client.post("/api/v1/leases", json={"worker": "w"})
    assert r.status_code in (200, 204), r.text
    return r.json() if r.status_code == 200 else None


def _post(client, lease: dict, body: dict) -> dict:
    r = client.post("/api/v1/leases/current/result", headers={"X-Lease-Token": lease["token"]}, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def _trials(client, study_id: int) -> list[dict]:
    return client.get(f"/api/v1/studies/{study_id}/trials").json()


def _optuna_trials(settings, index: int = 0) -> list[optuna.trial.FrozenTrial]:
    storage = optuna.storages.RDBStorage(settings.resolved_database_url())
    names = sorted(optuna.get_all_study_names(storage), key=lambda n: optuna.load_study(
        study_name=n, storage=storage)._study_id)
    return optuna.load_study(study_name=names[index], storage=storage).trials


def test_a_configuration_being_evaluated_waits_for_its_twin_and_takes_its_result(client, settings, tiny_zoo):
    spec = _one_point(tiny_zoo, trials=3)
    study = client.post("/api/v1/studies", json=spec).json()
    first = _lease(client)
    assert _lease(client) is None, "the same configuration must not be leased while it is being evaluated"
    trials = _trials(client, study["id"])
    assert [(t["state"], t["worker"]) for t in trials] == [("leased", "w"), ("queued", None), ("queued", None)]
    assert len({tuple(sorted(t["params"].items())) for t in trials}) == 1

    values = dict(zip(objective_keys(spec), [0.5, 0.25], strict=True))
    _post(client, first, {"values": values})
    trials = _trials(client, study["id"])
    assert [(t["state"], t["cached"], t["values"], t["attempts"]) for t in trials] == [
        ("complete", False, values, 1), ("complete", True, values, 0), ("complete", True, values, 0)]
    assert client.get(f"/api/v1/studies/{study['id']}").json()["status"] == "done"
    told = _optuna_trials(settings)
    assert len(told) == 3 and all(t.state == optuna.trial.TrialState.COMPLETE and t.values == [0.5, 0.25]
                                  for t in told)
    assert _lease(client) is None


def test_when_the_twin_fails_a_waiting_trial_is_evaluated_itself(client, settings, tiny_zoo):
    spec = _one_point(tiny_zoo, trials=3)
    study = client.post("/api/v1/studies", json=spec).json()
    first = _lease(client)
    assert _lease(client) is None
    _post(client, first, {"error": "EvaluationError: out of memory"})
    second = _lease(client)
    assert second is not None and second["trial_number"] == 1
    assert _lease(client) is None, "the third waits on the second now"
    values = dict.fromkeys(objective_keys(spec), 0.75)
    _post(client, second, {"values": values})
    trials = _trials(client, study["id"])
    assert [(t["state"], t["cached"]) for t in trials] == [("failed", False), ("complete", False), ("complete", True)]
    assert trials[2]["values"] == values
    detail = client.get(f"/api/v1/studies/{study['id']}").json()
    assert detail["status"] == "done" and detail["counts"] == {"failed": 1, "complete": 2}
    assert [t.state.name for t in _optuna_trials(settings)] == ["FAIL", "COMPLETE", "COMPLETE"]


def test_a_twin_in_another_study_of_the_team_answers_it(client, settings, tiny_zoo):
    spec = _one_point(tiny_zoo, trials=2)
    first_study = client.post("/api/v1/studies", json=spec).json()
    lease = _lease(client)
    second_study = client.post("/api/v1/studies", json=spec).json()
    assert _lease(client) is None
    assert [t["state"] for t in _trials(client, second_study["id"])] == ["queued", "queued"]
    values = dict.fromkeys(objective_keys(spec), 0.5)
    _post(client, lease, {"values": values})
    for study in (first_study, second_study):
        detail = client.get(f"/api/v1/studies/{study['id']}").json()
        assert detail["status"] == "done"
        assert [t["values"] for t in detail["trials"]] == [values, values]
    assert [t.state.name for t in _optuna_trials(settings, 1)] == ["COMPLETE", "COMPLETE"]


def test_deleting_the_twins_study_queues_the_waiting_trials_one_at_a_time(client, tiny_zoo):
    spec = _one_point(tiny_zoo, trials=2)
    doomed = client.post("/api/v1/studies", json=spec).json()
    _lease(client)
    study = client.post("/api/v1/studies", json=spec).json()
    assert _lease(client) is None
    assert client.delete(f"/api/v1/studies/{doomed['id']}").status_code == 204
    lease = _lease(client)
    assert lease["study_id"] == study["id"]
    assert _lease(client) is None, "the other waiting trial now waits on the one leased"
    _post(client, lease, {"values": dict.fromkeys(objective_keys(spec), 0.5)})
    assert client.get(f"/api/v1/studies/{study['id']}").json()["status"] == "done"


def test_waiting_trials_whose_twin_completed_without_them_are_answered_from_the_cache(client, tiny_zoo):
    """What a race between servers leaves (a waiter recorded just after its twin completed): the
    next lease request settles it from the team's cache."""
    spec = _one_point(tiny_zoo, trials=3)
    study = client.post("/api/v1/studies", json=spec).json()
    first = _lease(client)
    assert _lease(client) is None
    services = client.app.state.services
    with services.sessions() as session:
        twin_id = session.query(Trial.id).where(Trial.lease_token == first["token"]).scalar()
        session.query(Trial).where(Trial.waiting_on == twin_id).update({"waiting_on": -twin_id})  # hidden
        session.commit()
    values = dict.fromkeys(objective_keys(spec), 0.5)
    _post(client, first, {"values": values})
    with services.sessions() as session:
        session.query(Trial).where(Trial.waiting_on == -twin_id).update({"waiting_on": twin_id})
        session.commit()
    assert _lease(client) is None
    trials = _trials(client, study["id"])
    assert [(t["state"], t["cached"], t["values"]) for t in trials] == [
        ("complete", False, values), ("complete", True, values), ("complete", True, values)]
    assert client.get(f"/api/v1/studies/{study['id']}").json()["status"] == "done"


def test_a_lease_released_after_its_study_was_cancelled_fails_instead_of_waiting_forever(client, tiny_zoo):
    study = client.post("/api/v1/studies", json=zoo_spec(tiny_zoo, trials=2)).json()
    lease = client.post("/api/v1/leases", json={"worker": "w"}).json()
    client.post(f"/api/v1/studies/{study['id']}/cancel")
    released = client.post("/api/v1/leases/current/release", headers={"X-Lease-Token": lease["token"]})
    assert released.status_code == 200
    assert released.json()["state"] == "failed" and released.json()["error"] == "study cancelled"


def test_study_run_never_waits_on_a_twin_in_another_study(settings, tiny_zoo, tmp_path):
    """`mmmo study run` leases its own study only: a twin elsewhere would never be evaluated."""
    from search.spec import StudySpec
    from service import dispatch, local
    from service.runner import TrialRunner
    from service.services import Services

    spec = StudySpec.model_validate(zoo_spec(tiny_zoo, trials=2, samples=5))
    services = Services.start(settings)
    try:
        other = local.create(services, spec)
        with services.sessions() as session:  # a run of `other` that died holding its first trial
            held = dispatch.next_work(session, services.optuna, services.policy, "dead", services.clock(),
                                      holder=None, study_id=other)
        assert held is not None
        final = local.run(services, local.create(services, spec), TrialRunner(cache_dir=tmp_path / "cache"))
    finally:
        services.close()
    assert final["status"] == "done"
    assert all(t["state"] == "complete" for t in final["trials"])
