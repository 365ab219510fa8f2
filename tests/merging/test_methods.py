"""Each standard method against a plain re-statement of mergekit's formulas, in float32, and the
contract of every method's parameters. The comparison with mergekit 0.1.5 itself, on real
checkpoints, is ``test_mergekit_parity.py``."""

from __future__ import annotations

import logging

import pytest
import torch

from merging.errors import MergeError
from merging.kernels.rng import expert_key, keep_draw
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
    if method.takes == "models":  # the experts' own tensors
        return method.merge(TensorInputs("t", base, [], gen, models=[base + d for d in deltas], key=seed), resolved,
                            global_params)
    return method.merge(TensorInputs("t", base, deltas, gen, key=seed), resolved, global_params)


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
    dropped = []
    for i, (d, e) in enumerate(zip(deltas, EXPERTS, strict=True)):
        mask = (keep_draw(d.shape, expert_key(3, i)) < e["density"]).float()  # the counter-based draws
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
    out = _run("breadcrumbs", base, deltas[:1], experts, {"gamma": 0.1})  # global: every model's default
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


@pytest.mark.parametrize("density", [-0.1, 1.5])
def test_density_outside_unit_interval_is_refused(density):
    with pytest.raises(MergeError, match="density"):
        get_method("ties").resolve([{"weight": 1.0, "density": density}], {}, ["m0"])


@pytest.mark.parametrize("name", ["ties", "dare_ties", "dare_linear", "breadcrumbs", "della"])
def test_density_zero_drops_the_whole_delta_as_in_mergekit(tensors, name):
    base, deltas = tensors
    out = _run(name, base, deltas[:2], [{"weight": 0.7, "density": 0.0}, {"weight": 0.5, "density": 0.5}])
    # as if the first expert added nothing: each expert draws its own counter-based mask (by its
    # position), so the second one's draws are the same either way
    alone = _run(name, base, deltas[:2], [{"weight": 0.0, "density": 0.5}, {"weight": 0.5, "density": 0.5}])
    assert torch.equal(out, alone)
    assert not torch.equal(out, _run(name, base, deltas[:2], [{"weight": 0.7, "density": 0.3},
                                                               {"weight": 0.5, "density": 0.5}]))


def test_ties_keeps_at_least_the_largest_entry_as_in_mergekit():
    delta = torch.tensor([0.1, -0.5, 0.2, 0.05])
    out = _run("ties", torch.zeros(4), [delta], [{"weight": 1.0, "density": 0.1}])  # int(0.4) = 0 entries
    assert torch.equal(out, torch.tensor([0.0, -0.5, 0.0, 0.0]))


def test_della_bounds_are_checked_before_any_tensor():
    with pytest.raises(MergeError, match="model 'm1'.*density - epsilon"):
        get_method("della").resolve([{"weight": 1.0, "density": 0.5}, {"weight": 1.0, "density": 0.1}],
                                    {"epsilon": 0.15}, ["m0", "m1"])


# Every parameter a method accepts is honoured (changing it changes the merge; a per-model one
# changes it when given for one model only, and not as it would globally), or it is one mergekit
# declares and ignores for the method: the merge is unchanged and a warning says so.
CHANGED = {"weight": 0.4, "density": 0.3, "gamma": 0.1, "epsilon": 0.05, "lambda": 0.5, "order": "saliency",
           "granularity": "tensor", "max_iter": 0, "tol": 0.05, "select_topk": 0.5, "t": 0.6, "eps": 0.5,
           "scale": 0.5, "saliency": "magnitude", "calibration": "shared"}
# Global parameters that choose a merge's inputs rather than act in it: OBIM's calibration picks the
# texts its statistics come from (tests/merging/test_obim.py shows it acts there).
UPSTREAM = {("obim", "calibration")}
# Models merged per method (default 2): arcee_fusion merges exactly one into the base; karcher's mean
# of two equally weighted models is the midpoint it starts from, so its iterations show only with three;
# slerp, nearswap and passthrough take one model (beside the base, or alone).
CONTRACT_MODELS = {"arcee_fusion": 1, "karcher": 3, "slerp": 1, "nearswap": 1, "passthrough": 1}
# Global parameters every contract merge of a method is given: a required one (slerp's and nearswap's
# t), or one without which another has no effect (nuslerp_row_wise acts only on unflattened tensors).
CONTRACT_PARAMS = {"slerp": {"t": 0.3}, "nearswap": {"t": 0.05}, "nuslerp": {"nuslerp_flatten": False}}


def _changed(param, name=""):
    """A value other than the contract merge's: a boolean flipped, else ``CHANGED``'s."""
    value = CONTRACT_PARAMS.get(name, {}).get(param.name, param.default)
    return (not value) if isinstance(param.default, bool) else CHANGED[param.name]


@pytest.fixture
def contract_inputs():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(64, 48, generator=g)
    # different scales: OBIM's saliency order is then not the listed one
    return base, [s * torch.randn(64, 48, generator=g) for s in (0.1, 0.2, 0.3)]


def _contract_run(name, inputs, experts, params):
    base, deltas = inputs[0], inputs[1][:len(experts)]
    method = get_method(name)
    params = {**CONTRACT_PARAMS.get(name, {}), **params}
    resolved, global_params = method.resolve(experts, params, [f"m{i}" for i in range(len(experts))])
    gen = torch.Generator().manual_seed(0)
    if method.takes == "models":
        return method.merge(TensorInputs("t", base, [], gen, models=[base + d for d in deltas], key=0), resolved,
                            global_params)
    # per-channel statistics, so that OBIM's saliency is not its magnitude
    stats = [torch.linspace(0.1, 3.0 + i, base.shape[1]) for i in range(len(deltas))] if name == "obim" else None
    return method.merge(TensorInputs("t", base, deltas, gen, stats=stats, key=0), resolved, global_params)


def _baseline_experts(method):
    baseline = {"weight": [0.7, 0.5, 0.6], "density": [0.5, 0.5, 0.5]}
    return [{p.name: baseline[p.name][i] for p in method.expert_params if p.name in baseline}
            for i in range(CONTRACT_MODELS.get(method.name, 2))]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_accepted_parameter_is_honoured_or_warned_about(name, contract_inputs, caplog):
    method = get_method(name)
    experts = _baseline_experts(method)
    baseline = _contract_run(name, contract_inputs, experts, {})
    for p in method.expert_params:
        one = [{**experts[0], p.name: _changed(p, name)}, *experts[1:]]
        out = _contract_run(name, contract_inputs, one, {})
        assert not torch.equal(out, baseline), f"{name}: '{p.name}' of one model changes nothing"
        everywhere = [{k: v for k, v in e.items() if k != p.name} for e in experts]
        # weight has no default to fall back to; with one model, one model's value is every model's
        if p.name != "weight" and len(experts) > 1:
            globally = _contract_run(name, contract_inputs, everywhere, {p.name: _changed(p, name)})
            assert not torch.equal(out, globally), f"{name}: '{p.name}' of one model acts on every model"
    for p in method.global_params:
        if (name, p.name) in UPSTREAM:
            continue
        out = _contract_run(name, contract_inputs, experts, {p.name: _changed(p, name)})
        assert not torch.equal(out, baseline), f"{name}: '{p.name}' changes nothing"
    for inert in method.inert_params:
        value = True if isinstance(inert.param.default, bool) else 0.3
        for experts_given, params_given in (([{**experts[0], inert.param.name: value}, *experts[1:]], {}),
                                            (experts, {inert.param.name: value})):
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="merging"):
                out = _contract_run(name, contract_inputs, experts_given, params_given)
            assert torch.equal(out, baseline), f"{name}: '{inert.param.name}' is declared inert but acts"
            assert f"'{inert.param.name}' has no effect with method '{name}'" in caplog.text
    for p in method.global_params:  # mergekit reads a shared parameter only under `parameters`
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="merging"):
            out = _contract_run(name, contract_inputs, [{**experts[0], p.name: _changed(p, name)}, *experts[1:]], {})
        assert torch.equal(out, baseline)
        assert f"model 'm0': '{p.name}' is a global parameter" in caplog.text


def test_an_honoured_parameter_gives_no_warning(contract_inputs, caplog):
    with caplog.at_level(logging.WARNING, logger="merging"):
        _contract_run("breadcrumbs", contract_inputs, [{"weight": 0.7, "density": 0.5, "gamma": 0.1},
                                                       {"weight": 0.5, "density": 0.5}], {"lambda": 0.9})
    assert caplog.text == ""


def test_breadcrumbs_gamma_per_model_is_that_models(tensors):
    """Issue #17: a per-model gamma (mergekit's form) was accepted and silently ignored."""
    base, deltas = tensors
    out = _run("breadcrumbs", base, deltas[:1], [{"weight": 1.0, "density": 0.5, "gamma": 0.1}])
    assert torch.equal(out, _run("breadcrumbs", base, deltas[:1], [{"weight": 1.0, "density": 0.5}], {"gamma": 0.1}))


def test_unknown_method_is_named():
    with pytest.raises(MergeError, match="unknown merge method 'nope'"):
        get_method("nope")


def test_missing_weight_names_the_model():
    with pytest.raises(MergeError, match="model 'm0'.*weight"):
        get_method("task_arithmetic").resolve([{}], {}, ["m0"])
