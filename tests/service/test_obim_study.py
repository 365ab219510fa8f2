"""OBIM's readings through a study: saliency and top-k scope searched as choices, the shared
calibration text read by the workers, and a spec that asks for shared texts without one refused."""

from __future__ import annotations

from fastapi.testclient import TestClient

from search.spec import StudySpec
from service import local
from service.app import create_app
from service.runner import TrialRunner
from service.services import Services
from tests.conftest import authorize, zoo_spec


def _spec(tiny_zoo, shared, **extra) -> dict:
    spec = zoo_spec(tiny_zoo, experts=("add", "reverse"), method="obim", trials=8)
    spec["experts"][0]["calibration"] = "task:mmmo_add"  # the other expert has only the shared text
    return spec | {
        "objectives": [{"kind": "sparsity"}],
        "method_params": {"calibration": "both"},
        "search_space": {"weight": {"low": 0.5, "high": 1.5}, "density": {"low": 0.2, "high": 0.8},
                         "method_choices": {"saliency": ["obd", "obs", "magnitude"],
                                            "granularity": ["tensor", "global"], "rescale": [False, True]}},
        "sampler": {"name": "random"}, "calibration": str(shared)} | extra


def test_a_study_searches_obims_readings(settings, tiny_zoo, tmp_path):
    shared = tmp_path / "general.txt"
    shared.write_text("12+30=42\nabc>cba\ndcba#abcd\nQWE^qwe\n")
    services = Services.start(settings)
    runner = TrialRunner(trusted_task_paths=[], cache_dir=settings.cache_dir)
    try:
        final = local.run(services, local.create(services, StudySpec.model_validate(_spec(tiny_zoo, shared))), runner)
    finally:
        services.close()
    assert final["status"] == "done" and final["counts"] == {"complete": 8}, final.get("error")
    used = {t["params"]["method.saliency"] for t in final["trials"]}
    assert len(used) >= 2
    (resident,) = runner._sets.values()
    # each statistics reading the trials asked for, computed once and held by the set
    assert set(resident.merger.stats) == {f"{s}/both" for s in used - {"magnitude"}}
    for reading in resident.merger.stats.values():  # the shared text calibrates the expert without its own
        assert set(reading) == {"add", "reverse"}
    assert len({round(t["values"]["sparsity"], 3) for t in final["trials"]}) == 8


def test_shared_calibration_without_a_text_is_a_422(sqlite_settings, tiny_zoo, tmp_path):
    with TestClient(create_app(sqlite_settings)) as client:
        authorize(client)
        body = _spec(tiny_zoo, tmp_path / "absent.txt")
        del body["calibration"]
        response = client.post("/api/v1/studies", json=body)
        assert response.status_code == 422
        assert "shared calibration text" in response.text
        response = client.post("/api/v1/studies", json=_spec(tiny_zoo, tmp_path / "absent.txt"))
        assert response.status_code == 422 and "cannot read calibration data" in response.text
