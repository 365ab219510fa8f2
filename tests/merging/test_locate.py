"""Models named by Hugging Face id resolve from the local hub cache; a missing one is a clear error."""

from __future__ import annotations

import shutil

import pytest

from merging.errors import MergeError
from merging.io import ModelNotFound, is_hub_id, locate


def _cache_repo(hub_cache, repo_id: str, source) -> None:
    """Lay ``source`` out as the hub cache does for a downloaded snapshot (what `hf download` leaves)."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    revision = "0" * 40
    shutil.copytree(source, repo / "snapshots" / revision)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_hub_ids_resolve_from_the_cache_and_name_what_is_missing(hub_cache, tiny_zoo):
    _cache_repo(hub_cache, "acme/tiny-base", tiny_zoo.base)
    found = locate("acme/tiny-base")
    assert (found / "config.json").read_bytes() == (tiny_zoo.base / "config.json").read_bytes()
    assert locate(str(tiny_zoo.base)) == tiny_zoo.base  # paths stay paths
    assert is_hub_id("acme/tiny-base") and not is_hub_id("/abs/path") and not is_hub_id("../x/y")
    with pytest.raises(ModelNotFound, match="acme/missing.*Hugging Face cache"):
        locate("acme/missing")
    with pytest.raises(ModelNotFound, match="no such directory"):
        locate("/no/such/dir")
    assert issubclass(ModelNotFound, MergeError)


def test_a_worker_merges_and_scores_models_named_by_hub_id(hub_cache, tiny_zoo):
    from evals.objective import Objective
    from merging.config import ExpertRef, MergeConfig
    from service.runner import SetLoadError, TrialRunner

    _cache_repo(hub_cache, "acme/tiny-base", tiny_zoo.base)
    _cache_repo(hub_cache, "acme/tiny-add", tiny_zoo.experts["add"])
    objectives = [Objective(task="mmmo_add", samples=10)]

    def config(base: str, expert: str) -> MergeConfig:
        return MergeConfig(method="task_arithmetic", base=base, experts=(ExpertRef("add", expert, {"weight": 1.0}),))

    by_id = TrialRunner().run(config("acme/tiny-base", "acme/tiny-add"), objectives)
    by_path = TrialRunner().run(config(str(tiny_zoo.base), str(tiny_zoo.experts["add"])), objectives)
    assert by_id == by_path
    with pytest.raises(SetLoadError, match="ModelNotFound: model 'acme/not-here'"):
        TrialRunner().run(config("acme/tiny-base", "acme/not-here"), objectives)


def test_the_server_accepts_hub_ids_it_cannot_see_and_refuses_bad_paths(settings, tiny_zoo, hub_cache):
    from fastapi.testclient import TestClient

    from service.app import create_app
    from tests.conftest import authorize, zoo_spec

    with TestClient(create_app(settings)) as c:
        authorize(c)
        spec = zoo_spec(tiny_zoo) | {"base": "acme/only-on-the-workers"}
        assert c.post("/api/v1/studies", json=spec).status_code == 201
        spec["search_space"] = {"layer_groups": 2}
        r = c.post("/api/v1/studies", json=spec)
        assert r.status_code == 422 and "num_layers" in r.text  # it cannot count layers it cannot read
        spec = zoo_spec(tiny_zoo) | {"base": "not an id"}
        r = c.post("/api/v1/studies", json=spec)
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "base"]


@pytest.fixture
def online_hub(hub_cache, monkeypatch):
    """The hub cache with huggingface_hub online, its endpoint a port that refuses at once."""
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    return hub_cache


def _config_only(path):
    path.mkdir()
    (path / "config.json").write_text('{"model_type": "llama"}')
    return path


def test_online_hub_ids_resolve_from_the_cache(online_hub, tmp_path):
    _cache_repo(online_hub, "acme/tiny", _config_only(tmp_path / "tiny"))
    found = locate("acme/tiny")
    assert found.is_relative_to(online_hub) and (found / "config.json").read_text() == '{"model_type": "llama"}'


def test_online_a_missing_hub_id_is_downloaded_and_offline_it_is_named(online_hub, monkeypatch):
    import huggingface_hub.constants as constants

    with pytest.raises(ModelNotFound, match="acme/missing': cannot download it from the Hugging Face hub") as info:
        locate("acme/missing")
    assert "refused" in str(info.value).lower()  # it did try the (closed) endpoint
    not_cached = r"model 'acme/missing' is neither a directory on .* nor in its Hugging Face cache"
    with pytest.raises(ModelNotFound, match=not_cached):
        locate("acme/missing", download=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFound, match=not_cached):
        locate("acme/missing")
