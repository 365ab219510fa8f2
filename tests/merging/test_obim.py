"""OBIM (our reading): saliency statistics, exclusive masks, densities, order."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from merging.methods import TensorInputs, get_method
from merging.methods.obim import obm_saliency, top_fraction_mask
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


# ---- the open readings as options ----

def test_obs_weights_are_the_inverse_hessian_diagonal_of_the_unpadded_inputs():
    from merging.saliency import collect_obs_weights

    model = _Toy()
    g = torch.Generator().manual_seed(3)
    batches = [{"x": torch.randn(2, 9, 6, generator=g), "attention_mask": torch.tensor([[1] * 9, [1] * 5 + [0] * 4])},
               {"x": torch.randn(1, 9, 6, generator=g), "attention_mask": torch.ones(1, 9, dtype=torch.long)}]
    got = collect_obs_weights(model, batches)
    xs = torch.cat([b["x"][b["attention_mask"].bool()] for b in batches])  # (tokens, 6)
    with torch.no_grad():
        hidden = torch.relu(model.up(xs))
    for name, x in (("up.weight", xs), ("down.weight", hidden)):
        h = (x.T @ x).double()
        h.diagonal().masked_fill_(h.diagonal() == 0, 1.0)  # relu may leave a channel dead
        h += 0.01 * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
        torch.testing.assert_close(got[name].double(), 1 / torch.linalg.inv(h).diagonal(), rtol=1e-4, atol=0)
    # one layer's Hessian at a time (a budget below two of them): the same numbers, two passes
    small = collect_obs_weights(model, batches, max_bytes=4 * 6 * 6)
    assert all(torch.allclose(small[k], got[k]) for k in got)


def test_obs_and_obd_rank_a_delta_differently_when_inputs_correlate():
    """OBD sees each channel's energy alone; OBS sees that a channel moving with another can be
    compensated, so a delta on a redundant channel matters less."""
    from merging.saliency import obs_weights

    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, generator=g)
    x = torch.stack([a, a + 0.01 * torch.randn(500, generator=g), torch.randn(500, generator=g)], 1)
    h = x.T @ x
    energy, obs = h.diagonal().clone(), obs_weights(h.clone(), damping=1e-4)
    assert energy[0] > 0.5 * energy[2]  # similar energies ...
    assert obs[0] < 0.01 * obs[2]  # ... but channel 0 is redundant with channel 1


def test_rescale_keeps_each_experts_mass(deltas):
    method, t, resolved, params = _merge(deltas[:1], [{"density": 0.2, "weight": 1.0}],
                                         {"rescale": True, "granularity": "tensor"})
    merged = method.merge(t, resolved, params)
    torch.testing.assert_close(merged.abs().sum(), deltas[0].abs().sum(), rtol=1e-5, atol=0)
    assert int((merged != 0).sum()) == int(0.2 * merged.numel())
    plain = method.merge(t, resolved, {**params, "rescale": False})
    assert float(plain.abs().sum()) < 0.5 * float(merged.abs().sum())


def test_magnitude_saliency_ignores_the_statistics(deltas):
    energy = torch.zeros(24)
    energy[:4] = 100.0
    method, t, resolved, params = _merge(deltas[:1], [{"density": 0.2}], {"saliency": "magnitude",
                                                                          "granularity": "tensor"}, stats=[energy])
    ((_, mask, _),) = method.masks(t, resolved, params)
    assert torch.equal(mask, top_fraction_mask(deltas[0].abs(), 0.2, False))


def test_global_scope_keeps_the_budget_across_tensors_where_saliency_is_largest(tiny_zoo, tmp_path):
    """One budget per expert over all its tensors: the kept count is the budget to within one
    histogram bin, tensors keep different shares, and the resident and file paths agree."""
    from merging.budget import saliency_histogram
    from merging.config import ExpertRef, MergeConfig
    from merging.files import merge_to_dir
    from merging.io import CheckpointReader
    from merging.resident import Merger

    experts = tuple(ExpertRef(n, str(p), {"weight": 1.0, "density": 0.3}) for n, p in tiny_zoo.experts.items())
    params = {"granularity": "global", "saliency": "magnitude"}
    one = MergeConfig(method="obim", base=str(tiny_zoo.base), experts=experts[:1], params=params)
    merger = Merger.from_checkpoints(str(tiny_zoo.base), {e.name: e.path for e in one.experts})
    merged = dict(merger.merged_tensors(one))
    floats = [n for n in merger.names if merger.base[n].is_floating_point()]
    budget = sum(int(0.3 * merger.base[n].numel()) for n in floats)
    kept = {n: merged[n] != merger.base[n] for n in floats}
    total = sum(int(k.sum()) for k in kept.values())
    hist = saliency_histogram(torch.cat([merger.deltas_of(n)[0].pow(2).reshape(-1) for n in floats]))
    assert budget <= total <= budget + int(hist.max())
    # not 0.3 in every tensor: the tensor with the largest deltas keeps the largest share
    rms = {n: float(merger.deltas_of(n)[0].pow(2).mean()) for n in floats if merger.base[n].numel() > 64}
    share = {n: float(kept[n].float().mean()) for n in rms}
    assert share[max(rms, key=rms.get)] > 0.3 > share[min(rms, key=rms.get)]

    two = MergeConfig(method="obim", base=str(tiny_zoo.base), experts=experts[:2],
                      params={**params, "rescale": True})
    merger = Merger.from_checkpoints(str(tiny_zoo.base), {e.name: e.path for e in two.experts})
    merged = dict(merger.merged_tensors(two))
    written = CheckpointReader(str(merge_to_dir(two, tmp_path / "merged")))
    assert all(torch.equal(written.get(n), merged[n]) for n in floats)


def test_calibration_modes_read_own_shared_or_both_texts(tiny_zoo, tmp_path):
    from evals.texts import calibration_texts
    from merging.config import ExpertRef, MergeConfig
    from merging.errors import MergeError
    from merging.saliency import readings_of, stats_for, texts_for

    shared = tmp_path / "general.txt"
    shared.write_text("12+30=42\nabc>cba\n")
    own = tmp_path / "own.txt"
    own.write_text("dcba#abcd\n")
    e = ExpertRef("add", str(tiny_zoo.experts["add"]), {}, calibration=str(own))
    bare = ExpertRef("sort", str(tiny_zoo.experts["sort"]), {})
    read = calibration_texts
    assert texts_for(e, "own", str(shared), read) == ["dcba#abcd"]
    assert texts_for(e, "shared", str(shared), read) == ["12+30=42", "abc>cba"]
    assert texts_for(e, "both", str(shared), read) == ["dcba#abcd", "12+30=42", "abc>cba"]
    assert texts_for(bare, "own", str(shared), read) == []  # magnitude for that expert
    with pytest.raises(MergeError, match="shared calibration text"):
        texts_for(e, "shared", None, read)

    def config(**params):
        return MergeConfig(method="obim", base=str(tiny_zoo.base), experts=(e, bare), params=params,
                           calibration=str(shared))
    assert readings_of(config()) == ["obd/own"]
    assert readings_of(config(saliency="obs", calibration="both")) == ["obs/both"]
    assert readings_of(config(saliency="magnitude")) == []
    stats = stats_for(config(calibration="shared"), tmp_path, texts_of=read)["obd/shared"]
    assert sorted(stats) == ["add", "sort"]  # the shared text calibrates the expert without its own
    mine = stats_for(config(), tmp_path, texts_of=read)["obd/own"]
    assert sorted(mine) == ["add"]
    name = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(mine["add"][name], stats["add"][name])
    assert "calibration" in MergeConfig.from_dict(config().to_dict()).to_dict()
