"""The fused merge kernels against the methods' plain torch code (the reference), eagerly and
compiled; the counter-based draws; selection by counting against a full sort."""

from __future__ import annotations

import pytest
import torch

from merging.budget import saliency_histogram, threshold
from merging.kernels.fused import KernelOptions, Kernels, fusable, fused_merge
from merging.kernels.rng import expert_key, keep_draw, tensor_key, uniform
from merging.methods import METHODS, TensorInputs, get_method
from merging.methods.obim import obm_saliency
from merging.select import row_topk_mask, top_cut, topk_mask

SHAPE = (96, 64)
KEY = tensor_key(7, "model.layers.0.mlp.down_proj.weight")
CASES = {
    "task_arithmetic": ([{"weight": 0.7}, {"weight": -0.3}, {"weight": 1.1}], {"lambda": 0.9}),
    "ties": ([{"weight": 0.7, "density": 0.5}, {"weight": 0.3, "density": 0.2}, {"weight": 1.1, "density": 1.0}],
             {"lambda": 1.3}),
    "ties_rescaled": ([{"weight": 0.7, "density": 0.5}, {"weight": 0.3, "density": 0.0},
                       {"weight": 1.1, "density": 0.001}], {"rescale": True, "normalize": False}),
    "dare_ties": ([{"weight": 0.7, "density": 0.5}, {"weight": 0.3, "density": 0.3}, {"weight": 1.1, "density": 0.9}],
                  {}),
    "dare_linear": ([{"weight": 0.7, "density": 0.5}, {"weight": 0.3, "density": 0.3}], {"normalize": True}),
    "della": ([{"weight": 0.7, "density": 0.5}, {"weight": 0.3, "density": 0.4, "epsilon": 0.1}], {}),
    "della_linear": ([{"weight": 0.7, "density": 0.5}, {"weight": 0.3, "density": 0.6}], {"lambda": 0.8}),
    "obim": ([{"weight": 1.0, "density": 0.5}, {"weight": 0.8, "density": 0.3}, {"weight": 1.2, "density": 1.0}], {}),
    "obim_row_saliency": ([{"weight": 1.0, "density": 0.5}, {"weight": 0.8, "density": 0.3}],
                          {"granularity": "row", "order": "saliency"}),
    "obim_saliency": ([{"weight": 1.0, "density": 0.4}, {"weight": 0.8, "density": 0.6},
                       {"weight": 1.0, "density": 0.0}], {"order": "saliency"}),
    "obim_magnitude": ([{"weight": 1.0, "density": 0.4}, {"weight": 0.8, "density": 0.6}], {"saliency": "magnitude"}),
    "obim_rescaled": ([{"weight": 1.0, "density": 0.4}, {"weight": 0.8, "density": 0.2},
                       {"weight": 0.5, "density": 1.0}], {"rescale": True, "order": "saliency"}),
    "obim_global": ([{"weight": 1.0, "density": 0.4}, {"weight": 0.8, "density": 0.2},
                     {"weight": 0.5, "density": 1.0}], {"granularity": "global", "rescale": True}),
}
EXACT = set(CASES)


def _inputs(dtype: torch.dtype, k: int, shape=SHAPE, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    experts = [base + s * torch.randn(shape, generator=g) for s in (0.02, 0.05, 0.03)[:k]]
    if dtype == torch.bfloat16:  # quantised deltas: many ties at every threshold
        return base.to(dtype), [e.to(dtype) for e in experts]
    return base, experts


def _stats(shape, k):
    g = torch.Generator().manual_seed(5)
    return [torch.rand(shape[1], generator=g) * 10 for _ in range(k)]


def _thresholds(base, experts, stats, params_k, params):
    """OBIM's global scope over this one tensor: each expert's threshold from its saliency histogram."""
    if params.get("granularity") != "global":
        return None
    b32 = base.float()
    return [threshold(saliency_histogram(obm_saliency(e.float() - b32, s)), int(p["density"] * base.numel()))
            for e, s, p in zip(experts, stats, params_k, strict=True)]


def _reference(name, base, experts, stats, params_k, params):
    method = get_method(name)
    b32 = base.float()
    t = TensorInputs("w", b32, [e.float() - b32 for e in experts], None, stats, key=KEY,
                     thresholds=_thresholds(base, experts, stats, params_k, params))
    return method.merge(t, params_k, params).to(base.dtype)


def _fused(name, base, experts, stats, params_k, params, kernels):
    method = get_method(name)
    return fused_merge(kernels, method, KEY, base, experts, stats, params_k, params, base.dtype,
                       thresholds=_thresholds(base, experts, stats, params_k, params))


def _resolved(case):
    experts, params = CASES[case]
    name = case.split("_")[0] if case.startswith(("ties", "obim")) else case
    method = get_method(name)
    resolved, shared = method.resolve(experts, params, [f"m{i}" for i in range(len(experts))])
    return name, resolved, shared


def _compare(case, out, ref):
    if case in EXACT:
        assert torch.equal(out, ref)
    else:  # the L1 rescale's norms are summed in another order: its factor may differ in the last bit
        torch.testing.assert_close(out.float(), ref.float(), rtol=2e-6, atol=1e-7 if out.dtype == torch.float32
                                   else 0.0, msg=case)
        assert torch.count_nonzero(out != ref) <= out.numel() // 100


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_equals_the_reference_eagerly(case, dtype):
    name, resolved, shared = _resolved(case)
    base, experts = _inputs(dtype, len(resolved))
    stats = _stats(SHAPE, len(resolved))
    # exact_max_numel 0: every selection goes through the sampled bracket and the counting pass
    kernels = Kernels(KernelOptions(compile=False, exact_max_numel=0))
    out = _fused(name, base, experts, stats, resolved, shared, kernels)
    _compare(case, out, _reference(name, base, experts, stats, resolved, shared))
    assert out.dtype == dtype and out.shape == base.shape
    assert kernels.calls and not any(compiled for _, compiled in kernels.calls)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", ["ties_rescaled", "dare_ties", "della", "obim_saliency", "obim_global"])
def test_fused_equals_the_reference_compiled(case, dtype):
    """torch.compile's generated code (vectorised C++ here) gives the reference's bits."""
    name, resolved, shared = _resolved(case)
    shape = (700, 600)  # beyond the exact selection size: the counting pass runs compiled too
    base, experts = _inputs(dtype, len(resolved), shape)
    stats = _stats(shape, len(resolved))
    kernels = Kernels(KernelOptions(compile=True, compile_min_numel=0, exact_max_numel=1 << 12))
    out = _fused(name, base, experts, stats, resolved, shared, kernels)
    _compare(case, out, _reference(name, base, experts, stats, resolved, shared))
    assert any(compiled for _, compiled in kernels.calls), kernels.calls


def test_every_fusable_method_is_covered_here():
    covered = {_resolved(c)[0] for c in CASES}
    assert {n for n in METHODS if fusable(get_method(n))} == covered


def test_counter_draws_are_a_function_of_key_and_position_only():
    full = keep_draw((300, 70), 12345)
    part = uniform(torch.arange(5000, 9000), 12345)
    assert torch.equal(full.view(-1)[5000:9000], part)  # any chunk, any order: the same numbers
    assert full.min() >= 0 and full.max() < 1
    assert abs(float((full < 0.3).float().mean()) - 0.3) < 0.01
    assert not torch.equal(full, keep_draw((300, 70), 12346))
    keys = [expert_key(tensor_key(0, "w"), i) for i in range(3)]
    assert len(set(keys)) == 3 and all(0 <= k < 2**63 for k in keys)
    # neighbouring entries are not correlated
    x = full.view(-1)
    assert abs(float(torch.corrcoef(torch.stack([x[:-1], x[1:]]))[0, 1])) < 0.02


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("frac", [0.001, 0.3, 0.9])
def test_top_cut_by_counting_selects_the_exact_top_k(dtype, frac):
    values = torch.randn(400_000, generator=torch.Generator().manual_seed(1)).abs().to(dtype).float()
    k = int(frac * values.numel())
    mask = top_cut(values, k, small=0).mask(values)
    assert int(mask.sum()) == k
    assert values[mask].min() >= values[~mask].max()
    # ties at the threshold: the first ones by position
    tied = (values == values[mask].min()).nonzero().squeeze(1)
    kept = mask[tied]
    assert torch.equal(kept, kept.sort(descending=True).values)
    assert torch.equal(mask, topk_mask(values, k))


def test_row_topk_mask_keeps_k_per_row_ties_by_column():
    rows = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.5], [2.0, 2.0, 2.0, 2.0, 2.0]])
    mask = row_topk_mask(rows, 2)
    assert mask.tolist() == [[False, True, True, False, False], [True, True, False, False, False]]


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="no CUDA device: the Triton kernels torch.compile generates for a GPU run only there")
@pytest.mark.parametrize("case", ["ties", "dare_ties", "obim_saliency"])
def test_fused_on_cuda_equals_the_reference_on_cpu(case):
    """The same bits on a GPU: counter-based draws and selection by counting do not depend on the device."""
    name, resolved, shared = _resolved(case)
    shape = (700, 600)
    base, experts = _inputs(torch.bfloat16, len(resolved), shape)
    stats = _stats(shape, len(resolved))
    kernels = Kernels(KernelOptions(compile=True, compile_min_numel=0, exact_max_numel=1 << 12))
    out = _fused(name, base.cuda(), [e.cuda() for e in experts], [s.cuda() for s in stats], resolved, shared, kernels)
    _compare(case, out.cpu(), _reference(name, base, experts, stats, resolved, shared))
