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


def test_a_quantized_or_unknown_dtype_tensor_is_refused_from_the_headers(models, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from merging.io.safetensors_stream import SafetensorsReader

    quantized = tmp_path / "quantized"
    shutil.copytree(models["tuned"], quantized)
    state = load_file(str(quantized / "model.safetensors"))
    state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"].to(torch.int8)
    save_file(state, str(quantized / "model.safetensors"))
    with pytest.raises(MergeError, match=r"model 'q': tensor 'model.layers.0.mlp.up_proj.weight' is int8: a quantized"):
        check_dirs(models["base"], {"q": quantized}, ancestry=True)
    # fp8 has no torch dtype the reader maps: refused naming the tensor, from the header alone
    reader = SafetensorsReader(quantized / "model.safetensors")
    reader.entries["model.norm.weight"]["dtype"] = "F8_E4M3"
    with pytest.raises(MergeError, match=r"tensor 'model.norm.weight' has unsupported dtype F8_E4M3"):
        reader.dtype("model.norm.weight")


def test_checkpoint_tensors_that_do_not_fit_the_config_are_refused_naming_the_tensor(models, tmp_path):
    import json
    import shutil

    wrong = tmp_path / "wrong-config"
    shutil.copytree(models["base"], wrong)
    config = json.loads((wrong / "config.json").read_text())
    config["intermediate_size"] = 48  # the files' MLP matrices are 32 wide
    (wrong / "config.json").write_text(json.dumps(config))
    check_dirs(wrong, {"tuned": models["tuned"]}, ancestry=True)  # names and shapes agree with each other
    with pytest.raises(MergeError, match=r"base: checkpoint tensor\(s\) \['model.layers.0.mlp.down_proj.weight'\] "
                                         r"give 'model.layers.0.mlp.down_proj.weight' the shape \(16, 32\); the "
                                         r"model's config makes it \(16, 48\)"):
        check_dirs(wrong, {"tuned": models["tuned"]}, ancestry=True, loadable=True)
    missing = tmp_path / "missing-tensor"
    shutil.copytree(models["base"], missing)
    from safetensors.torch import load_file, save_file

    state = load_file(str(missing / "model.safetensors"))
    del state["model.norm.weight"]
    save_file(state, str(missing / "model.safetensors"))
    with pytest.raises(MergeError, match=r"base: the checkpoint has no tensor\(s\) for the model's parameter\(s\) "
                                         r"\['model.norm.weight'\]"):
        check_dirs(missing, {}, ancestry=False, loadable=True)
    check_dirs(models["base"], {"tuned": models["tuned"]}, ancestry=True, loadable=True)
