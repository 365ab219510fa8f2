"""The resident Merger: in-place merges into a live model, and its errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from merging.config import ExpertRef, MergeConfig
from merging.errors import MergeError
from merging.io import load_state_dict
from merging.resident import Merger


def _tiny(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


@pytest.fixture(scope="module")
def models():
    base = _tiny(0)
    experts = {}
    for i, name in enumerate(("a", "b")):
        expert = _tiny(0)
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(10 + i)))
        experts[name] = expert.state_dict()
    return base, experts


def _config(weights, method="task_arithmetic", densities=None):
    experts = []
    for i, (name, w) in enumerate(zip(("a", "b"), weights, strict=True)):
        params = {"weight": w} | ({"density": densities[i]} if densities else {})
        experts.append(ExpertRef(name, f"/{name}", params))
    return MergeConfig(method=method, base="/base", experts=tuple(experts))


def test_apply_writes_the_merge_in_place(models):
    base, experts = models
    merger = Merger(base.state_dict(), experts)
    live = _tiny(0)
    ptrs = {n: p.data_ptr() for n, p in live.named_parameters()}
    merger.apply(live, _config([1.0, 0.0]))
    for name, p in live.named_parameters():
        assert p.data_ptr() == ptrs[name], "a merge must not reallocate the model's parameters"
        torch.testing.assert_close(p.detach(), experts["a"][name])


def test_different_parameters_give_different_weights(models):
    base, experts = models
    merger = Merger(base.state_dict(), experts)
    live = _tiny(0)
    merger.apply(live, _config([0.3, 0.9], "ties", [0.5, 0.5]))
    first = {n: p.detach().clone() for n, p in live.named_parameters()}
    merger.apply(live, _config([0.9, 0.3], "ties", [0.5, 0.5]))
    assert any(not torch.equal(first[n], p) for n, p in live.named_parameters())


def test_sparsity_objective_is_l1_of_the_merged_delta(models):
    base, experts = models
    merger = Merger(base.state_dict(), experts)
    live = _tiny(0)
    l1 = merger.apply(live, _config([0.5, 0.5]))
    expected = sum((live.state_dict()[n] - t).abs().sum().item() for n, t in base.state_dict().items())
    assert l1 == pytest.approx(expected, rel=1e-5)
    assert merger.apply(live, _config([0.0, 0.0])) == 0.0


def test_shape_mismatch_names_expert_and_tensor(models):
    base, experts = models
    bad = dict(experts["a"])
    bad["lm_head.weight"] = torch.zeros(3, 3)
    with pytest.raises(MergeError, match=r"model 'a'.*lm_head.weight.*shape"):
        Merger(base.state_dict(), {"a": bad})


def test_missing_tensor_names_the_expert(models):
    base, experts = models
    bad = {k: v for k, v in experts["b"].items() if k != "model.norm.weight"}
    with pytest.raises(MergeError, match=r"model 'b'.*model.norm.weight"):
        Merger(base.state_dict(), {"b": bad})


def test_sharded_safetensors_are_read(tmp_path, models):
    base, _ = models
    state = {k: v.contiguous() for k, v in base.state_dict().items()}
    names = sorted(state)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for fname, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(tmp_path / fname))
    import json

    index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    loaded = load_state_dict(tmp_path)
    assert sorted(loaded) == names
    assert all(torch.equal(loaded[k], state[k]) for k in names)


def test_layer_groups_and_filters_give_each_group_its_own_parameters(models):
    from merging.config import Grouping

    base, experts = models
    merger = Merger(base.state_dict(), experts)
    grouping = Grouping(layer_groups=1, num_layers=2, filters=("mlp",))
    assert grouping.groups() == ["L0-0/mlp", "L0-0/other", "L1-1/mlp", "L1-1/other", "rest/mlp", "rest/other"]
    only = {g: {"weight": 0.0} for g in grouping.groups()} | {"L1-1/mlp": {"weight": 1.0}}
    config = MergeConfig(method="task_arithmetic", base="/base", grouping=grouping,
                         experts=(ExpertRef("a", "/a", {"weight": 0.0}, group_params=only),
                                  ExpertRef("b", "/b", {"weight": 0.0})))
    live = _tiny(0)
    merger.apply(live, config)
    for name, p in live.named_parameters():
        expected = experts["a"][name] if name.startswith("model.layers.1.mlp.") else base.state_dict()[name]
        torch.testing.assert_close(p.detach(), expected, msg=name)


@pytest.mark.parametrize("method,densities", [("ties", [0.5, 0.3]), ("dare_ties", [0.5, 0.7]),
                                              ("task_arithmetic", None)])
def test_apply_runs_the_fused_kernels_and_gives_the_reference_merge(models, method, densities):
    """A trial's merge goes through the fused kernels (written straight into the live parameters)
    and equals the methods' plain torch code tensor for tensor."""
    from merging.kernels.fused import KernelOptions, Kernels
    from merging.plan import MergePlan
    from merging.step import expert_inputs, merge_tensor

    base, experts = models
    kernels = Kernels(KernelOptions(compile=False))
    merger = Merger(base.state_dict(), experts, kernels=kernels)
    live = _tiny(0)
    config = _config([0.7, 0.4], method, densities)
    merger.apply(live, config)
    assert kernels.calls[("gta_pass", False)] == len(list(live.parameters()))
    plan = MergePlan(config)
    state = base.state_dict()
    for name, p in live.named_parameters():
        b32 = state[name].float()
        ref = merge_tensor(plan, name, b32, expert_inputs(plan, b32, [experts[e][name] for e in ("a", "b")]),
                           [None, None])
        assert torch.equal(p.detach(), ref.to(p.dtype)), name
