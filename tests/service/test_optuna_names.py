"""Optuna's own tools (optuna-dashboard opens our database) see a study by its spec's name and its
values by the objectives' keys."""

from __future__ import annotations

import optuna

from search.optuna_store import optuna_storage
from search.spec import StudySpec
from service import local
from service.services import Services
from tests.conftest import zoo_spec


def test_the_optuna_study_carries_the_specs_name_and_metric_names(settings, tiny_zoo):
    objectives = [{"task": "mmmo_add", "samples": 5}, {"kind": "sparsity"}]
    spec = zoo_spec(tiny_zoo, method="ties") | {"name": "math+code", "objectives": objectives}
    services = Services.start(settings)
    try:
        local.create(services, StudySpec.model_validate(spec))
        local.create(services, StudySpec.model_validate(spec))  # the same name again: both kept
        summaries = optuna.get_all_study_summaries(optuna_storage(settings.database_url))
    finally:
        services.close()
    ours = [s for s in summaries if s.study_name.startswith("math+code [")]
    assert len(ours) == 2 and ours[0].study_name != ours[1].study_name
    study = optuna.load_study(study_name=ours[0].study_name, storage=optuna_storage(settings.database_url))
    assert study.metric_names == ["mmmo_add:exact_match", "sparsity"]
