"""A study over experts with resized vocabularies: refused at submit without a tokenizer setting
(saying how), accepted with one, and its trials run in the output vocabulary."""

from __future__ import annotations

from search.spec import StudySpec
from service import local
from service.runner import TrialRunner
from service.services import Services
from tests.merging.test_vocab import _resize_experts
from tests.tiny_archs import build_arch_set


def _spec(arch_set, **extra) -> dict:
    return {"name": "vocab", "base": str(arch_set.base), "method": "ties",
            "experts": [{"name": n, "path": str(p)} for n, p in list(arch_set.experts.items())[:2]],
            "objectives": [{"kind": "sparsity"}], "sampler": {"name": "random"}, "budget": {"trials": 2}} | extra


def test_resized_experts_need_a_tokenizer_setting_and_merge_with_one(client, settings, tmp_path):
    arch_set = build_arch_set(tmp_path / "models", "llama", experts=2, seed=3)
    _resize_experts(arch_set, seed=4)  # e0 adds <a> <b>, e1 adds <b> <c> <d>

    refused = client.post("/api/v1/studies", json=_spec(arch_set))
    assert refused.status_code == 422
    assert "tokenizer_source" in refused.json()["detail"][0]["msg"]
    both = client.post("/api/v1/studies", json=_spec(arch_set, tokenizer_source="union", tokenizer={"source": "base"}))
    assert both.status_code == 422 and "cannot specify both" in both.text
    accepted = client.post("/api/v1/studies", json=_spec(arch_set, tokenizer_source="union"))
    assert accepted.status_code == 201, accepted.text

    services = Services.start(settings)
    try:
        study_id = local.create(services, StudySpec.model_validate(_spec(arch_set, tokenizer_source="union")))
        runner = TrialRunner(trusted_task_paths=[])
        final = local.run(services, study_id, runner)
    finally:
        services.close()
    assert final["status"] == "done" and final["counts"].get("complete") == 2
    from transformers import AutoTokenizer

    base_vocab = len(AutoTokenizer.from_pretrained(arch_set.base))
    assert runner.last_model.get_input_embeddings().weight.shape[0] == base_vocab + 4  # <a> <b> <c> <d>
    assert StudySpec.model_validate(_spec(arch_set, tokenizer_source="union")).tokenizer == {"source": "union"}
