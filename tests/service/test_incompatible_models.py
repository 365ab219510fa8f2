"""A base that is not the experts' ancestor: refused at submit time when the server sees the
files, else the study fails once, at a worker's first load, with the reason."""

from __future__ import annotations

import shutil

import pytest

from evals.tiny_zoo import build_tiny_zoo
from service import local
from service.runner import TrialRunner
from service.services import Services
from tests.conftest import zoo_spec


def test_a_base_that_is_not_the_experts_ancestor_is_a_422_naming_the_expert(client, tiny_zoo, tmp_path):
    stranger = build_tiny_zoo(tmp_path / "other", seed=1)  # same shapes, unrelated weights
    spec = zoo_spec(tiny_zoo) | {"base": str(stranger.base)}
    response = client.post("/api/v1/studies", json=spec)
    assert response.status_code == 422
    problem = response.json()["detail"][0]
    assert problem["loc"] == ["body", "experts", 0, "path"]
    assert "model 'add'" in problem["msg"] and "ancestor" in problem["msg"]
    assert client.get("/api/v1/studies").json() == []
    # linear merges take no deltas: any models of one shape merge
    assert client.post("/api/v1/studies", json=spec | {"method": "linear", "search_space": {"density": None}}
                       ).status_code == 201


def test_a_study_whose_models_turn_out_incompatible_fails_once_with_the_reason(settings, tmp_path):
    zoo = build_tiny_zoo(tmp_path / "zoo")
    stranger = build_tiny_zoo(tmp_path / "other", seed=1)
    services = Services.start(settings)
    try:
        study_id = local.create(services, _spec(zoo, trials=6))
        # What the worker finds is not what the server checked (another machine's files, a
        # checkpoint replaced since): the 'reverse' expert is now an unrelated model.
        shutil.rmtree(zoo.experts["reverse"])
        shutil.copytree(stranger.experts["reverse"], zoo.experts["reverse"])
        final = local.run(services, study_id, TrialRunner(cache_dir=tmp_path / "cache"))
    finally:
        services.close()
    assert final["status"] == "failed"
    assert "model 'reverse'" in final["error"] and "ancestor" in final["error"]
    assert len(final["trials"]) == 1  # one load, not trial after trial
    assert final["trials"][0]["state"] == "failed" and final["trials"][0]["error"] == final["error"]


def _spec(zoo, trials: int):
    from search.spec import StudySpec

    return StudySpec.model_validate(zoo_spec(zoo, trials=trials))


def test_models_whose_tensors_do_not_fit_the_config_are_a_422_naming_the_tensor(client, tmp_path):
    import json

    zoo = build_tiny_zoo(tmp_path / "zoo")
    for model in (zoo.base, *zoo.experts.values()):  # all alike, so only the config check can see it
        config = json.loads((model / "config.json").read_text())
        config["intermediate_size"] *= 2
        (model / "config.json").write_text(json.dumps(config))
    response = client.post("/api/v1/studies", json=zoo_spec(zoo))
    assert response.status_code == 422
    problem = response.json()["detail"][0]
    assert "base: checkpoint tensor(s) ['model.layers.0.mlp.down_proj.weight']" in problem["msg"]
    assert "the model's config makes it" in problem["msg"]
    assert client.get("/api/v1/studies").json() == []


def test_allow_unrelated_merges_with_the_warning_instead_of_refusing(client, tiny_zoo, tmp_path, caplog):
    import logging
    import os
    import subprocess
    import sys

    import yaml

    from evals.objective import Objective
    from merging.config import ExpertRef, MergeConfig

    stranger = build_tiny_zoo(tmp_path / "other", seed=1)
    spec = zoo_spec(tiny_zoo) | {"base": str(stranger.base), "allow_unrelated": True}
    with caplog.at_level(logging.WARNING, logger="merging.checks"):
        assert client.post("/api/v1/studies", json=spec).status_code == 201
    assert "model 'add': does not look fine-tuned from the base" in caplog.text and "allow_unrelated" in caplog.text

    config = MergeConfig(method="ties", base=str(stranger.base), allow_unrelated=True,
                         experts=(ExpertRef("add", str(tiny_zoo.experts["add"]), {"weight": 0.5, "density": 0.5}),))
    assert config.fingerprint() == MergeConfig(**{**config.__dict__, "allow_unrelated": False}).fingerprint()
    runner = TrialRunner(trusted_task_paths=[], max_resident_bytes=2**34)
    scores = runner.run(config, [Objective(kind="sparsity", direction="minimize")])
    assert scores["sparsity"] > 0
    # the set loaded leniently is not reused by a config that must refuse the unrelated base
    from merging.errors import IncompatibleCheckpoints

    with pytest.raises(IncompatibleCheckpoints, match="does not look fine-tuned"):
        runner.run(MergeConfig(**{**config.__dict__, "allow_unrelated": False}),
                   [Objective(kind="sparsity", direction="minimize")])

    doc = {"merge_method": "ties", "base_model": str(stranger.base),
           "models": [{"model": str(tiny_zoo.experts["add"]), "parameters": {"weight": 0.5, "density": 0.5}}]}
    (tmp_path / "merge.yml").write_text(yaml.safe_dump(doc))
    env = {**os.environ, "MMMO_CACHE_DIR": str(tmp_path / "cache")}

    def merge(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "service.cli", "merge", str(tmp_path / "merge.yml"),
                               str(tmp_path / f"out{len(flags)}"), *flags], capture_output=True, text=True, env=env,
                              timeout=300)

    refused = merge()
    assert refused.returncode == 1 and "is the base its ancestor?" in refused.stderr
    allowed = merge("--allow-unrelated")
    assert allowed.returncode == 0, allowed.stderr
    assert "does not look fine-tuned from the base" in allowed.stderr and "merging anyway" in allowed.stderr
