"""Multi-fidelity studies through the server's leases: rung by rung, only unseen items scored, the
earlier items' scores kept, only top-rung results on the front."""

from __future__ import annotations

import pytest

from evals.objective import Objective
from search.space import SearchSpace
from search.spec import StudySpec
from service import local, studies
from service.runner import TrialRunner
from service.services import Services
from tests.conftest import zoo_spec


def test_a_multi_fidelity_study_promotes_rung_by_rung(settings, tiny_zoo):
    spec = StudySpec.model_validate(zoo_spec(tiny_zoo, trials=8, method="task_arithmetic") | {
        "objectives": [{"task": "mmmo_add", "samples": 16}, {"task": "mmmo_reverse_mc", "metric": "acc",
                                                              "samples": 16}, {"kind": "sparsity"}],
        "search_space": {"density": None}, "sampler": {"name": "random"},
        "fidelity": {"min_samples": 4, "eta": 2}})
    runner = TrialRunner(trusted_task_paths=[])
    services = Services.start(settings)
    try:
        study_id = local.create(services, spec)
        final = local.run(services, study_id, runner)
        with services.sessions() as session:
            front = studies.pareto(studies.get_study(session, study_id, None))
            history = studies.hypervolume_history(studies.get_study(session, study_id, None))
    finally:
        services.close()
    assert final["status"] == "done" and final["counts"] == {"complete": 8}, final.get("error")
    trials = final["trials"]
    rungs = [t["rung"] for t in trials]
    assert set(rungs) <= {0, 1, 2} and 2 in rungs and min(rungs) < 2  # some stopped early, some reached the top
    per_rung = {0: 8, 1: 16, 2: 32}  # items of both tasks up to each rung (4, 8, 16 each)
    assert all(t["items"] == per_rung[t["rung"]] for t in trials)
    # a top-rung trial's values are its configuration's full-fidelity scores: the rungs' items combined
    top = next(t for t in trials if t["rung"] == 2)
    full = TrialRunner(trusted_task_paths=[]).run(
        SearchSpace(spec).merge_config(top["params"]),
        [Objective(task="mmmo_add", samples=16), Objective(task="mmmo_reverse_mc", metric="acc", samples=16),
         Objective(kind="sparsity", direction="minimize")])
    assert top["values"] == pytest.approx(full, rel=1e-6)
    # only full-fidelity results make the front, the selection and the hypervolume's history
    assert front.front and all(t.rung == 2 for t in front.front)
    assert len(history) == rungs.count(2)


def test_leases_carry_the_rung_and_its_items_over_http(client, tiny_zoo):
    spec = zoo_spec(tiny_zoo, trials=2) | {"fidelity": {"min_samples": 4, "eta": 2},
                                           "objectives": [{"task": "mmmo_add", "samples": 16}]}
    study = client.post("/api/v1/studies", json=spec).json()
    lease = client.post("/api/v1/leases", json={"worker": "w"}).json()
    assert (lease["rung"], lease["window"]) == (0, {"mmmo_add": [0, 4]})
    first = client.post(f"/api/v1/leases/{lease['token']}/result",
                        json={"values": {"mmmo_add:exact_match": 0.5}, "items": 4}).json()
    assert (first["state"], first["rung"]) == ("queued", 0)  # alone on rung 0's front: promoted
    again = client.post("/api/v1/leases", json={"worker": "w"}).json()
    assert again["trial_number"] == lease["trial_number"] and again["token"] != lease["token"]
    assert (again["rung"], again["window"]) == (1, {"mmmo_add": [4, 8]})
    assert client.post(f"/api/v1/leases/{lease['token']}/result",
                       json={"values": {"mmmo_add:exact_match": 0.5}}).status_code == 409  # the old lease is void
    second = client.post(f"/api/v1/leases/{again['token']}/result",
                         json={"values": {"mmmo_add:exact_match": 1.0}, "items": 4}).json()
    assert second["rung"] == 1 and second["values"] == {"mmmo_add:exact_match": 0.75} and second["items"] == 8
    detail = client.get(f"/api/v1/studies/{study['id']}").json()
    assert detail["trials"][0]["state"] == "queued"  # promoted again, to the top rung


def test_study_run_searches_methods_with_rungs_and_cost_objectives(database_url, tiny_zoo, tmp_path, capsys):
    """`mmmo study run` end to end: the method searched, multi-fidelity rungs, tokens and latency."""
    import json

    from service import cli

    spec = zoo_spec(tiny_zoo, trials=6, method="ties") | {
        "method": ["task_arithmetic", "ties"], "sampler": {"name": "random"},
        "objectives": [{"task": "mmmo_add", "samples": 8}, {"kind": "tokens"}, {"kind": "latency"}],
        "fidelity": {"min_samples": 2, "eta": 2}}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    assert cli.main(["study", "run", str(path), "--db", database_url, "--home", str(tmp_path / "home")]) == 0
    out = capsys.readouterr().out
    assert "rung 0 of 2" in out and "promoted" in out
    assert "tokens" in out and "latency" in out  # the front's table names the cost objectives


def test_a_handed_back_or_expired_rung_is_leased_again_at_the_same_rung(client, tiny_zoo):
    from service.client import LEASE_TOKEN_HEADER

    spec = zoo_spec(tiny_zoo, trials=1) | {"fidelity": {"min_samples": 4, "eta": 2},
                                           "objectives": [{"task": "mmmo_add", "samples": 16}]}
    client.post("/api/v1/studies", json=spec)

    def lease():
        got = client.post("/api/v1/leases", json={"worker": "w"}).json()
        return got, {LEASE_TOKEN_HEADER: got["token"]}

    first, held = lease()
    client.post("/api/v1/leases/current/result", headers=held, json={"values": {"mmmo_add:exact_match": 0.25}})
    second, held = lease()
    assert second["rung"] == 1
    assert client.post("/api/v1/leases/current/release", headers=held).json()["rung"] == 0  # values of rung 0 kept
    third, held = lease()
    assert (third["rung"], third["window"]) == (1, {"mmmo_add": [4, 8]})
    done = client.post("/api/v1/leases/current/result", headers=held,
                       json={"values": {"mmmo_add:exact_match": 0.75}}).json()
    assert done["rung"] == 1 and done["values"] == {"mmmo_add:exact_match": 0.5}
