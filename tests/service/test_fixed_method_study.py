"""A method with nothing to search (model_stock) is scored by a one-trial study."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from search.spec import StudySpec
from service import local
from service.runner import TrialRunner
from service.services import Services
from tests.conftest import zoo_spec


def test_a_fixed_method_is_scored_by_one_trial(settings, tiny_zoo):
    spec = zoo_spec(tiny_zoo, experts=("add", "reverse", "sort"), method="model_stock") | {
        "search_space": {"weight": None, "density": None}, "objectives": [{"kind": "sparsity"}]}
    with pytest.raises(ValidationError, match="set budget.trials to 1 to score it"):
        StudySpec.model_validate(spec)
    services = Services.start(settings)
    try:
        study_id = local.create(services, StudySpec.model_validate(spec | {"budget": {"trials": 1}}))
        final = local.run(services, study_id, TrialRunner(trusted_task_paths=[]))
    finally:
        services.close()
    assert final["status"] == "done" and final["counts"] == {"complete": 1}
    assert final["trials"][0]["values"]["sparsity"] > 0
