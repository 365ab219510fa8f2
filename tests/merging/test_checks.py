"""One check for every path: tensor sets, shapes and ancestry, on loaded state dicts and on directories."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from merging.checks import check_dirs
from merging.errors import MergeError
from merging.io import CheckpointReader, ModelNotFound
from merging.resident import Merger

NOT_AN_ANCESTOR = r"model 'tuned': does not look fine-tuned from the base .* is the base its ancestor\?"


def _save(path, seed: int, *, tune_of: int | None = None, intermediate_size: int = 32) -> str:
    """A tiny random Llama; with ``tune_of``, that seed's model moved by a little noise (a fine-tune)."""
    cfg = LlamaConfig(hidden_size=16, intermediate_size=intermediate_size, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, vocab_size=64, max_position_embeddings=16)
    torch.manual_seed(seed if tune_of is None else tune_of)
    model = LlamaForCausalLM(cfg)
    if tune_of is not None:
        noise = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * p.abs().mean() * torch.randn(p.shape, generator=noise))
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"base": _save(root / "base", 0), "tuned": _save(root / "tuned", 1, tune_of=0),
            "stranger": _save(root / "stranger", 2), "wide": _save(root / "wide", 0, intermediate_size=48)}


def test_the_resident_path_refuses_a_base_that_is_not_the_experts_ancestor(models):
    Merger.from_checkpoints(models["base"], {"tuned": models["tuned"]})
    with pytest.raises(MergeError, match=NOT_AN_ANCESTOR):
        Merger.from_checkpoints(models["stranger"], {"tuned": models["tuned"]})
    Merger.from_checkpoints(models["stranger"], {"tuned": models["tuned"]}, check_ancestry=False)  # 'linear'
    with pytest.raises(MergeError, match=r"model 'wide': tensor '.*' has shape \(16, 48\), the base has \(16, 32\)"):
        Merger.from_checkpoints(models["base"], {"wide": models["wide"]}, check_ancestry=False)


def test_check_dirs_reads_headers_and_a_few_probe_tensors(models, monkeypatch):
    read = []
    get = CheckpointReader.get
    monkeypatch.setattr(CheckpointReader, "get", lambda self, name: read.append(name) or get(self, name))
    check_dirs(models["base"], {"tuned": models["tuned"]}, ancestry=True)
    assert len(read) == 3 + 3  # three matrices of the base, the same three of the expert
    read.clear()
    with pytest.raises(MergeError, match=NOT_AN_ANCESTOR):
        check_dirs(models["stranger"], {"tuned": models["tuned"]}, ancestry=True)
    read.clear()
    check_dirs(models["stranger"], {"tuned": models["tuned"]}, ancestry=False)
    assert read == []  # without the ancestry check, headers only
    with pytest.raises(MergeError, match=r"model 'wide': tensor '.*' has shape"):
        check_dirs(models["base"], {"tuned": models["tuned"], "wide": models["wide"]}, ancestry=True)
    with pytest.raises(ModelNotFound, match=r"expert 'gone': model '.*/gone': no such directory"):
        check_dirs(models["base"], {"gone": models["base"] + "/gone"}, ancestry=True)
