"""Each standard method against a plain re-statement of mergekit's formulas, in float32."""

from __future__ import annotations

import pytest
import torch

from merging.errors import MergeError
from merging.methods import METHODS, TensorInputs, get_method


def _ref_magnitude(d: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return d
    k = int(density * d.numel())
    mask = torch.zeros_like(d)
    mask.view(-1)[torch.argsort(d.abs().view(-1), descending=True)[:k]] = 1  # mergekit's full argsort
    return d * mask


def _ref_l1(d: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    return masked * (d.abs().sum() / masked.abs().sum())


def _ref_gta(base, deltas, weights, *, consensus: bool, normalize: bool, lam: float = 1.0):
    stacked = torch.stack(deltas)
    w = torch.tensor(weights).view(-1, *([1] * base.dim()))
    weighted = stacked * w
    if consensus:
        majority = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
        mask = (weighted.sign() == majority).float()
        mixed, divisor = (weighted * mask).sum(0), (w * mask).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed, divisor = weighted.sum(0), w.sum(0).expand_as(base).clone()
    if normalize:
        mixed = mixed / divisor
    return base + lam * mixed


@pytest.fixture
def tensors():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 48, generator=g)
    deltas = [0.1 * torch.randn(64, 48, generator=g) for _ in range(3)]
    return base, deltas


EXPERTS = [{"weight": 0.7, "density": 0.5}, {"weight": 0.3, "density": 0.3}, {"weight": 1.1, "density": 0.9}]


def _run(method_name, base, deltas, experts, params=None, seed=0):
    method = get_method(method_name)
    names = [f"m{i}" for i in range(len(deltas))]
    wanted = {p.name for p in method.expert_params}
    resolved, global_params = method.resolve([{k: v for k, v in e.items() if k in wanted} for e in experts],
                                             params or {}, names)
    gen = torch.Generator().manual_seed(seed)
    return method.merge(TensorInputs("t", base, deltas, gen), resolved, global_params)


def test_task_arithmetic_matches_reference(tensors):
    base, deltas = tensors
    out = _run("task_arithmetic", base, deltas, EXPERTS, {"lambda": 0.8})
    ref = _ref_gta(base, deltas, [e["weight"] for e in EXPERTS], consensus=False, normalize=False, lam=0.8)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("normalize", [True, False])
def test_ties_matches_reference(tensors, normalize):
    base, deltas = tensors
    out = _run("ties", base, deltas, EXPERTS, {"normalize": normalize})
    trimmed = [_ref_magnitude(d, e["density"]) for d, e in zip(deltas, EXPERTS, strict=True)]
    ref = _ref_gta(base, trimmed, [e["weight"] for e in EXPERTS], consensus=True, normalize=normalize)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_linear_is_normalised_weighted_average(tensors):
    base, deltas = tensors
    out = _run("linear", base, deltas, EXPERTS)
    w = [e["weight"] for e in EXPERTS]
    ref = sum((base + d) * wi for d, wi in zip(deltas, w, strict=True)) / sum(w)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name,consensus", [("dare_ties", True), ("dare_linear", False)])
def test_dare_matches_reference_with_the_same_draws(tensors, name, consensus):
    base, deltas = tensors
    out = _run(name, base, deltas, EXPERTS, seed=3)
    gen = torch.Generator().manual_seed(3)
    dropped = []
    for d, e in zip(deltas, EXPERTS, strict=True):
        mask = torch.bernoulli(torch.full_like(d, e["density"]), generator=gen)
        dropped.append(_ref_l1(d, d * mask))
    ref = _ref_gta(base, dropped, [e["weight"] for e in EXPERTS], consensus=consensus, normalize=False)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_dare_is_reproducible_and_seed_dependent(tensors):
    base, deltas = tensors
    a = _run("dare_ties", base, deltas, EXPERTS, seed=1)
    b = _run("dare_ties", base, deltas, EXPERTS, seed=1)
    c = _run("dare_ties", base, deltas, EXPERTS, seed=2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_breadcrumbs_drops_both_tails(tensors):
    base, deltas = tensors
    experts = [{"weight": 1.0, "density": 0.5}]
    out = _run("breadcrumbs", base, deltas[:1], experts, {"gamma": 0.1})
    kept = (out - base) != 0
    n = base.numel()
    assert kept.sum().item() == int(0.5 * n)
    magnitudes = deltas[0].abs().view(-1).sort().values
    kept_mags = deltas[0].abs()[kept]
    n_top, n_bot = int(0.1 * n), n - int(0.5 * n) - int(0.1 * n)
    assert kept_mags.min() >= magnitudes[n_bot] and kept_mags.max() <= magnitudes[n - n_top - 1]


def test_della_keeps_about_density_and_rescales(tensors):
    base, deltas = tensors
    out = _run("della", base, deltas[:1], [{"weight": 1.0, "density": 0.5}], {"epsilon": 0.1})
    delta = out - base
    kept = (delta != 0).float().mean().item()
    assert 0.45 < kept < 0.55
    torch.testing.assert_close(delta.abs().sum(), deltas[0].abs().sum(), rtol=1e-5, atol=1e-5)


def test_density_one_ties_with_one_expert_is_task_arithmetic(tensors):
    base, deltas = tensors
    out = _run("ties", base, deltas[:1], [{"weight": 0.6, "density": 1.0}], {"normalize": False})
    torch.testing.assert_close(out, base + 0.6 * deltas[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_rejects_unknown_parameters(name):
    method = get_method(name)
    with pytest.raises(MergeError, match="unknown parameter"):
        method.resolve([{"weight": 1.0, "bogus": 1}], {}, ["m0"])


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5])
def test_density_outside_unit_interval_is_refused(density):
    with pytest.raises(MergeError, match="density"):
        get_method("ties").resolve([{"weight": 1.0, "density": density}], {}, ["m0"])


def test_unknown_method_is_named():
    with pytest.raises(MergeError, match="unknown merge method 'nope'"):
        get_method("nope")


def test_missing_weight_names_the_model():
    with pytest.raises(MergeError, match="model 'm0'.*weight"):
        get_method("task_arithmetic").resolve([{}], {}, ["m0"])
