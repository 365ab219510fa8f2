"""OBIM (our reading): saliency statistics, exclusive masks, densities, order."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from merging.methods import TensorInputs, get_method
from merging.methods.obim import obm_saliency
from merging.saliency import calibration_stats, collect_input_energy


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(6, 5)
        self.down = nn.Linear(5, 3)

    def forward(self, x, attention_mask=None):
        return self.down(torch.relu(self.up(x)))


def test_input_energy_equals_direct_sum_of_squares_without_padding():
    model = _Toy()
    x = torch.randn(2, 4, 6)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    stats = collect_input_energy(model, [{"x": x, "attention_mask": mask}])
    keep = mask.bool()
    with torch.no_grad():
        hidden = torch.relu(model.up(x))
    torch.testing.assert_close(stats["up.weight"], x[keep].pow(2).sum(0))
    torch.testing.assert_close(stats["down.weight"], hidden[keep].pow(2).sum(0))


def _merge(deltas, experts, params=None, stats=None, base=None):
    method = get_method("obim")
    names = [f"e{i}" for i in range(len(deltas))]
    resolved, global_params = method.resolve(experts, params or {}, names)
    base = torch.zeros_like(deltas[0]) if base is None else base
    t = TensorInputs("w", base, deltas, None, stats)
    return method, t, resolved, global_params


@pytest.fixture
def deltas():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(32, 24, generator=g) for _ in range(3)]


@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_masks_are_mutually_exclusive_and_respect_density(deltas, granularity):
    experts = [{"density": 0.3}, {"density": 0.5}, {"density": 0.2}]
    method, t, resolved, params = _merge(deltas, experts, {"granularity": granularity})
    masks = method.masks(t, resolved, params)
    total = torch.zeros_like(deltas[0], dtype=torch.int32)
    for i, mask, _ in masks:
        total += mask.int()
        kept = int(mask.sum())
        if granularity == "tensor":
            assert kept <= int(experts[i]["density"] * deltas[0].numel())
        else:
            assert (mask.sum(1) <= int(experts[i]["density"] * deltas[0].shape[1])).all()
    assert int(total.max()) <= 1, "a position may belong to one expert only"
    first, first_mask, _ = masks[0]
    assert int(first_mask.sum()) == int(experts[first]["density"] * deltas[0].numel()) or granularity == "row"


def test_merge_adds_each_masked_delta_once_scaled(deltas):
    experts = [{"density": 0.4, "weight": 0.5}, {"density": 0.4, "weight": 2.0}, {"density": 0.4}]
    method, t, resolved, params = _merge(deltas, experts)
    merged = method.merge(t, resolved, params)
    expected = torch.zeros_like(deltas[0])
    for i, mask, _ in method.masks(t, resolved, params):
        expected += resolved[i]["weight"] * deltas[i] * mask
    torch.testing.assert_close(merged, expected)


def test_one_expert_at_density_one_is_task_arithmetic(deltas):
    base = torch.randn(32, 24)
    method, t, resolved, params = _merge(deltas[:1], [{"density": 1.0, "weight": 0.7}], base=base)
    torch.testing.assert_close(method.merge(t, resolved, params), base + 0.7 * deltas[0])


def test_saliency_uses_activation_energy_where_it_applies(deltas):
    energy = torch.zeros(24)
    energy[:4] = 100.0  # only the first four input channels ever see activation
    s = obm_saliency(deltas[0], energy)
    assert (s[:, 4:] == 0).all() and (s[:, :4] > 0).all()
    torch.testing.assert_close(obm_saliency(deltas[0], None), deltas[0].pow(2))
    torch.testing.assert_close(obm_saliency(deltas[0], torch.ones(7)), deltas[0].pow(2))  # shape mismatch
    method, t, resolved, params = _merge(deltas[:1], [{"density": 4 * 32 / (32 * 24)}], stats=[energy])
    ((_, mask, _),) = method.masks(t, resolved, params)
    assert mask[:, :4].all() and not mask[:, 4:].any()


def test_order_by_saliency_lets_the_heaviest_expert_choose_first(deltas):
    small, large = 0.01 * deltas[0], 10 * deltas[1]
    method, t, resolved, params = _merge([small, large], [{"density": 0.5}] * 2, {"order": "saliency"})
    order = [i for i, _, _ in method.masks(t, resolved, params)]
    assert order == [1, 0]
    method, t, resolved, params = _merge([small, large], [{"density": 0.5}] * 2, {"order": "listed"})
    assert [i for i, _, _ in method.masks(t, resolved, params)] == [0, 1]


def test_unknown_order_is_refused():
    from merging.errors import MergeError

    with pytest.raises(MergeError, match="order"):
        get_method("obim").resolve([{"density": 0.5}], {"order": "random"}, ["e0"])


def test_calibration_stats_are_cached_on_disk(tiny_zoo, tmp_path):
    texts = ["12+30=42", "abc>cba", "dcba#abcd"]
    first = calibration_stats(tiny_zoo.experts["add"], texts, tmp_path)
    cached = list((tmp_path / "saliency").glob("*.safetensors"))
    assert len(cached) == 1
    second = calibration_stats(tiny_zoo.experts["add"], texts, tmp_path)
    assert sorted(first) == sorted(second)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(k.endswith("mlp.down_proj.weight") for k in first)
    other = calibration_stats(tiny_zoo.experts["add"], texts[:2], tmp_path)
    assert len(list((tmp_path / "saliency").glob("*.safetensors"))) == 2
    assert not torch.equal(other["lm_head.weight"], first["lm_head.weight"])
