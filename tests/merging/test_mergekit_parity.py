"""``mmmo merge`` against mergekit 0.1.5 itself, on the same YAML and the same tiny checkpoints.

Every case's mergekit merge runs in one process of mergekit's side environment (its import alone
takes seconds); each test then merges its YAML with mmmo (``parse_mergekit`` + ``merge_to_dir``,
what ``mmmo merge`` runs) and compares every tensor. How each comparison is made, and why:

* ``exact``: ``torch.equal`` on every tensor. mmmo computes in float32 with mergekit's operations in
  mergekit's order (weights held in float32, deltas weighted then summed expert by expert), so
  float32 merges give its bits.
* ``f32``: relative 1e-6. ``rescale: true`` sums the L1 norms with
  ``torch.linalg.vector_norm``, mergekit with ``abs().sum()``: another order, ~1 ulp of the scale.
* ``tie-order``: exact, except at entries where an expert's ``|delta|`` equals its TIES threshold
  (its k-th largest). Both keep k entries; among equal magnitudes at the threshold mergekit keeps
  whichever its (unstable) full sort puts first, mmmo the first positions. Deltas of bfloat16
  checkpoints take few distinct values, so there such ties are common; in float32 they are rare.
* ``bf16``: mergekit computes in its ``dtype`` (the inputs cast to it, every step rounded to
  bfloat16, the weights too), mmmo always in float32, rounding once when it writes: the tolerance
  is ``BF16_TOLERANCE`` (see there). The bfloat16 checkpoints' cases are also compared ``exact``
  with mergekit told to compute in float32 and write bfloat16 (``dtype: float32, out_dtype:
  bfloat16``), so the only difference is where the rounding happens. Float32 checkpoints merged
  with ``dtype: bfloat16`` differ in the inputs too: mergekit rounds them to bfloat16 first, mmmo
  (``parse_mergekit`` takes ``dtype`` as the output's dtype) does not.

The random methods (DARE, DELLA) draw their masks from different generators in mmmo and mergekit,
so they are compared on what is deterministic: at density 1 (no drop) through the YAML, exactly;
and on one large tensor through mergekit's method API, the keep rate, the L1 rescale and DELLA's
magnitude ramp, each within the statistical tolerance of the expected value.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from merging.methods import METHODS, TensorInputs, get_method
from tests.mergekit_side import run_jobs
from tests.mergekit_side.compare import load_tensors, mergekit_output, mmmo_merge
from tests.tiny_archs import build_arch_set

W2 = ({"weight": 0.7}, {"weight": 0.35})
TD2 = ({"weight": 0.7, "density": 0.5}, {"weight": 0.35, "density": 0.3})
F32_ON_BF16 = {"dtype": "float32", "out_dtype": "bfloat16"}  # mergekit computing as mmmo does

# Relative L2 error per tensor against mergekit's bfloat16 arithmetic. Without a selection the
# two differ by bfloat16 roundings of the inputs and intermediates (unit roundoff 2^-8 of
# |base|, which dominates each tensor's norm): measured up to 0.41 %. TIES and breadcrumbs select
# by |delta|, and in bfloat16 a delta ``round(x) - round(base)`` keeps only a few significant
# bits (the deltas are ~5 % of the weights), so mergekit's selection differs from the float32 one
# near the density threshold; an entry selected by one and not the other differs by a whole
# delta: measured up to 1.6 % of a tensor's norm (TIES), 1.2 % (breadcrumbs).
BF16_TOLERANCE = {"linear": 2**-7, "task_arithmetic": 2**-7, "ties": 0.04, "breadcrumbs": 0.04}


@dataclass(frozen=True)
class Case:
    id: str
    arch: str  # a key of SETS
    method: str
    models: tuple[dict[str, Any] | None, ...]  # per-model parameters, one entry per expert used
    params: dict[str, Any] | None = None  # the YAML's global `parameters`
    dtype: str | None = None  # the YAML's `dtype`
    check: str = "exact"  # exact | f32 | tie-order | bf16
    mergekit_extra: dict[str, Any] = field(default_factory=dict)  # keys only mergekit's YAML gets
    warns: tuple[str, ...] = ()  # what mmmo's warnings must name
    base_model: bool | None = None  # whether the YAML names one (None: every method but linear)


SETS = {  # name -> (architecture, experts, shard_bytes)
    "llama": ("llama", 3, None),
    "llama_sharded": ("llama", 2, 8_000),
    "qwen2_tied": ("qwen2_tied", 2, None),
    "mistral_bf16_sharded": ("mistral_bf16_sharded", 2, None),
}

CASES = [
    # float32 checkpoints, parameters per model and global
    Case("linear-per-model", "llama", "linear", ({"weight": 0.7}, {"weight": 0.35}, {"weight": 0.2})),
    Case("linear-global-unnormalized", "llama", "linear", (None, None), {"weight": 0.6, "normalize": False}),
    # mergekit averages the base in too, weighted by the global default
    Case("linear-with-base-model", "llama", "linear", ({"weight": 0.7}, {"weight": 0.35}), {"weight": 0.5},
         base_model=True),
    Case("task_arithmetic-per-model", "llama", "task_arithmetic", ({"weight": 0.7}, {"weight": -0.35}),
         {"lambda": 0.9}),
    Case("task_arithmetic-global-normalized", "llama", "task_arithmetic", (None, None, None),
         {"weight": 0.5, "normalize": True, "lambda": 1.3}),
    # issue #17: mergekit declares density and rescale for task_arithmetic and ignores them
    Case("task_arithmetic-declared-and-ignored", "llama", "task_arithmetic", TD2, {"rescale": True, "int8_mask": True},
         warns=("'density'", "'rescale'", "'int8_mask'")),
    Case("ties-per-model", "llama", "ties",
         ({"weight": 0.7, "density": 0.5}, {"weight": 0.35, "density": 0.3}, {"weight": 0.5, "density": 0.8})),
    Case("ties-global", "llama", "ties", (None, None),
         {"weight": 0.6, "density": 0.4, "normalize": False, "lambda": 0.8}),
    Case("ties-rescale", "llama", "ties", TD2, {"rescale": True}, check="f32"),
    Case("ties-density-keeps-at-least-one", "llama", "ties", (None, None), {"weight": 1.0, "density": 0.01}),
    Case("ties-shared-parameter-under-a-model", "llama", "ties",
         ({"weight": 0.7, "density": 0.5, "normalize": False}, {"weight": 0.35, "density": 0.3}),
         {"int8_mask": True}, warns=("'normalize' is a global parameter", "'int8_mask'")),
    # issue #17: gamma per model, mergekit's own form
    Case("breadcrumbs-per-model-gamma", "llama", "breadcrumbs",
         ({"weight": 0.7, "density": 0.5, "gamma": 0.1}, {"weight": 0.35, "density": 0.3, "gamma": 0.02})),
    Case("breadcrumbs-global-gamma", "llama", "breadcrumbs", (None, None),
         {"weight": 0.5, "density": 0.6, "gamma": 0.05}),
    # default gamma 0.01: int(gamma * numel) is 0 in the 16-entry norms
    Case("breadcrumbs-default-gamma", "llama", "breadcrumbs", ({"weight": 1.0, "density": 0.5},) * 2),
    Case("breadcrumbs-gamma-beyond-density", "llama", "breadcrumbs", (None, None),
         {"weight": 0.5, "density": 0.9, "gamma": 0.2}),
    Case("dare_ties-density-1", "llama", "dare_ties", W2),
    Case("dare_linear-density-1", "llama", "dare_linear", ({"weight": 0.7, "density": 1.0}, {"weight": 0.35}),
         {"normalize": True}),
    Case("della-density-1", "llama", "della", ({"weight": 0.7, "epsilon": 0.1}, {"weight": 0.35})),
    # sharded inputs, tied embeddings
    Case("ties-sharded", "llama_sharded", "ties", TD2),
    Case("linear-sharded", "llama_sharded", "linear", W2),
    Case("ties-tied-embeddings", "qwen2_tied", "ties", TD2),
    Case("task_arithmetic-tied-embeddings", "qwen2_tied", "task_arithmetic", W2, {"lambda": 1.1}),
    # bfloat16 checkpoints (in several shards): mergekit computing in float32, then in bfloat16
    Case("linear-bf16", "mistral_bf16_sharded", "linear", W2),  # mergekit's linear computes in float32
    Case("task_arithmetic-bf16-f32-math", "mistral_bf16_sharded", "task_arithmetic", W2, {"lambda": 0.9},
         mergekit_extra=F32_ON_BF16),
    Case("ties-bf16-f32-math", "mistral_bf16_sharded", "ties", TD2, check="tie-order", mergekit_extra=F32_ON_BF16),
    Case("breadcrumbs-bf16-f32-math", "mistral_bf16_sharded", "breadcrumbs",
         ({"weight": 0.7, "density": 0.5, "gamma": 0.1}, {"weight": 0.35, "density": 0.3}),
         mergekit_extra=F32_ON_BF16),
    Case("task_arithmetic-bf16", "mistral_bf16_sharded", "task_arithmetic", W2, {"lambda": 0.9}, check="bf16"),
    Case("ties-bf16", "mistral_bf16_sharded", "ties", TD2, check="bf16"),
    Case("breadcrumbs-bf16", "mistral_bf16_sharded", "breadcrumbs",
         ({"weight": 0.7, "density": 0.5, "gamma": 0.1}, {"weight": 0.35, "density": 0.3}), check="bf16"),
    # float32 checkpoints merged with `dtype: bfloat16`
    Case("linear-dtype-bf16", "llama", "linear", W2, dtype="bfloat16", check="bf16"),
    Case("task_arithmetic-dtype-bf16", "llama", "task_arithmetic", W2, dtype="bfloat16", check="bf16"),
    Case("ties-dtype-bf16", "llama", "ties", TD2, dtype="bfloat16", check="bf16"),
    Case("breadcrumbs-dtype-bf16", "llama", "breadcrumbs",
         ({"weight": 0.7, "density": 0.5, "gamma": 0.1}, {"weight": 0.35, "density": 0.3}), dtype="bfloat16",
         check="bf16"),
]
BY_ID = {c.id: c for c in CASES}
assert len(BY_ID) == len(CASES), "case ids must be unique"

# The random methods on one large tensor: (job id, method, one expert's parameters, global parameters)
RANDOM_SHAPE = (512, 512)
RANDOM_JOBS = [
    ("dare_linear-rescaled", "dare_linear", {"weight": 0.8, "density": 0.3}, {}),
    ("dare_ties-unrescaled", "dare_ties", {"weight": 0.8, "density": 0.3}, {"rescale": False}),
    ("della-ramp", "della", {"weight": 0.8, "density": 0.4, "epsilon": 0.2}, {}),
]


def _yaml(case: Case, sets: dict, extra: dict[str, Any]) -> str:
    s = sets[case.arch]
    doc: dict[str, Any] = {"merge_method": case.method}
    if case.base_model if case.base_model is not None else case.method != "linear":
        doc["base_model"] = str(s.base)
    doc["models"] = [{"model": str(s.experts[f"e{i}"])} | ({"parameters": p} if p else {})
                     for i, p in enumerate(case.models)]
    if case.params:
        doc["parameters"] = case.params
    if case.dtype:
        doc["dtype"] = case.dtype
    return yaml.safe_dump(doc | extra, sort_keys=False)


@pytest.fixture(scope="module")
def parity(tmp_path_factory, mergekit_python):
    """Every case merged by mergekit in one side process; the model sets, YAMLs and results."""
    root = tmp_path_factory.mktemp("mergekit_parity")
    sets = {name: build_arch_set(root / "models" / name, arch, experts=experts, shard_bytes=shard, seed=i)
            for i, (name, (arch, experts, shard)) in enumerate(SETS.items())}
    jobs = []
    for case in CASES:
        config = root / "yaml" / f"{case.id}.mergekit.yml"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(_yaml(case, sets, case.mergekit_extra))
        (root / "yaml" / f"{case.id}.yml").write_text(_yaml(case, sets, {}))
        jobs.append({"id": case.id, "kind": "yaml", "config": str(config), "out": str(root / "mergekit" / case.id)})
    gen = torch.Generator().manual_seed(17)
    base = torch.randn(RANDOM_SHAPE, generator=gen)
    tensors = {"base": base, "x0": base + 0.05 * torch.randn(RANDOM_SHAPE, generator=gen)}
    save_file(tensors, root / "random.safetensors")
    for job_id, method, expert, params in RANDOM_JOBS:
        jobs.append({"id": job_id, "kind": "tensor", "method": method, "inputs": str(root / "random.safetensors"),
                     "out": str(root / f"{job_id}.safetensors"), "seed": 5,
                     "parameters": {**params, **{k: [v] for k, v in expert.items()}}})
    jobs.append({"id": "specs", "kind": "specs", "out": str(root / "specs.json")})
    results = run_jobs(mergekit_python, jobs, root / "side")
    return {"root": root, "sets": sets, "results": results, "random": tensors}





def _tied_at_threshold(case: Case, base: torch.Tensor, experts: list[torch.Tensor]) -> torch.Tensor:
    """Entries where some expert's |delta| equals its TIES threshold (its k-th largest |delta|)."""
    tied = torch.zeros(base.shape, dtype=torch.bool)
    for i, x in enumerate(experts):
        magnitude = (x.float() - base.float()).abs()
        density = (case.models[i] or {}).get("density", (case.params or {}).get("density", 1.0))
        k = max(1, int(density * magnitude.numel()))
        tied |= magnitude == magnitude.flatten().kthvalue(magnitude.numel() - k + 1).values
    return tied


def _compare(case: Case, ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], sets: dict) -> None:
    assert sorted(ours) == sorted(theirs)
    if case.check == "tie-order":
        s = sets[case.arch]
        base, experts = load_tensors(s.base), [load_tensors(s.experts[f"e{i}"]) for i in range(len(case.models))]
    for name, expected in theirs.items():
        got = ours[name]
        assert got.dtype == expected.dtype, name
        if case.check in ("exact", "tie-order"):
            same = torch.ones(got.shape, dtype=torch.bool)
            if case.check == "tie-order":
                same = ~_tied_at_threshold(case, base[name], [e[name] for e in experts])
            assert torch.equal(got[same], expected[same]), f"{name}: max |diff| {(got - expected).abs().max():.3g}"
            continue
        diff = (got.double() - expected.double()).norm() / expected.double().norm()
        tolerance = 1e-6 if case.check == "f32" else BF16_TOLERANCE[case.method]
        assert diff <= tolerance, f"{name}: relative L2 error {diff.item():.3g} above {tolerance:.3g}"


@pytest.mark.parametrize("case_id", list(BY_ID))
def test_mmmo_merge_matches_mergekit(parity, case_id, caplog):
    case = BY_ID[case_id]
    theirs = load_tensors(mergekit_output(parity, case_id))
    with caplog.at_level(logging.WARNING, logger="merging"):
        ours = load_tensors(mmmo_merge(parity, case.id))
    _compare(case, ours, theirs, parity["sets"])
    warned = " ".join(r.getMessage() for r in caplog.records if r.name.startswith("merging"))
    for expected in case.warns:
        assert expected in warned
    if not case.warns:
        assert warned == ""


def test_mmmo_merge_command_takes_mergekit_declared_and_ignored_keys(parity, caplog, tmp_path):
    """Issue #17: `density` on a task_arithmetic model stopped `mmmo merge`; mergekit takes it and ignores it."""
    from service.cli import main

    case = BY_ID["task_arithmetic-declared-and-ignored"]
    config = parity["root"] / "yaml" / f"{case.id}.yml"
    with caplog.at_level(logging.WARNING, logger="merging"):
        assert main(["merge", str(config), str(tmp_path / "out")]) == 0
    assert "'density' has no effect with method 'task_arithmetic'" in caplog.text
    _compare(case, load_tensors(tmp_path / "out"), load_tensors(mergekit_output(parity, case.id)), parity["sets"])


def test_parameters_are_declared_as_mergekit_declares_them(parity):
    """Names, scope (per model or shared) and defaults of every method both have."""
    specs = json.loads((parity["root"] / "specs.json").read_text())
    shared = {"shared"}
    per_model = {"input", "non_base"}
    for name, cls in METHODS.items():
        if name not in specs:
            assert name == "obim", f"mergekit 0.1.5 has no '{name}'"
            continue
        theirs = {p["name"]: p for p in specs[name]}
        inert = {i.param.name: i.param for i in cls.inert_params}
        ours = {p.name: p for p in (*cls.expert_params, *cls.global_params)} | inert
        assert sorted(ours) == sorted(theirs), name
        for p in cls.expert_params:
            assert theirs[p.name]["scope"] in per_model, (name, p.name)
        for p in cls.global_params:
            assert theirs[p.name]["scope"] in shared, (name, p.name)
        for key, p in ours.items():
            assert p.default == theirs[key]["default"], (name, key)


def _mmmo_random(method: str, expert: dict, params: dict, tensors: dict, seed: int = 5) -> torch.Tensor:
    m = get_method(method)
    experts, resolved = m.resolve([expert], params, ["x0"])
    gen = torch.Generator().manual_seed(seed)
    return m.merge(TensorInputs("t", tensors["base"], [tensors["x0"] - tensors["base"]], gen), experts, resolved)


def _binomial_tolerance(p: float, n: int) -> float:
    return 5 * (p * (1 - p) / n) ** 0.5  # five standard deviations of a keep rate over n entries


@pytest.mark.parametrize("job_id,method,expert,params", RANDOM_JOBS, ids=[j[0] for j in RANDOM_JOBS])
def test_random_methods_agree_with_mergekit_on_what_is_deterministic(parity, job_id, method, expert, params):
    tensors = parity["random"]
    delta = tensors["x0"] - tensors["base"]
    theirs = load_file(_mergekit_output_file(parity, job_id))["merged"] - tensors["base"]
    ours = _mmmo_random(method, expert, params, tensors) - tensors["base"]
    n, density, weight = delta.numel(), expert["density"], expert["weight"]
    for merged in (ours, theirs):
        kept = merged != 0
        assert abs(kept.float().mean().item() - density) < _binomial_tolerance(density, n)
        if method == "della":  # normalized by its one weight, rescaled to the delta's L1 norm
            torch.testing.assert_close(merged.abs().sum(), delta.abs().sum(), rtol=1e-4, atol=0)
            # keep probability ramps with the magnitude rank in each row: density - eps .. density + eps
            rank = delta.abs().argsort(dim=1).argsort(dim=1).float() / (delta.shape[1] - 1)
            eps = expert["epsilon"]
            for lo, hi in ((0.0, 0.1), (0.45, 0.55), (0.9, 1.0)):
                band = (rank >= lo) & (rank <= hi)
                expected = density - eps + 2 * eps * rank[band].mean().item()
                rate = kept[band].float().mean().item()
                assert abs(rate - expected) < _binomial_tolerance(expected, int(band.sum())), (lo, hi)
        elif params.get("rescale", True):  # L1 rescale: the kept entries carry the whole L1 norm
            torch.testing.assert_close(merged.abs().sum(), weight * delta.abs().sum(), rtol=1e-4, atol=0)
        else:  # kept entries unscaled: each is (base + weight * delta) - base, to the bit
            unscaled = (tensors["base"] + delta * weight) - tensors["base"]
            assert torch.equal(merged[kept], unscaled[kept])


def _mergekit_output_file(parity, job_id: str) -> Path:
    result = parity["results"][job_id]
    assert result["ok"], f"mergekit refused {job_id}: {result['error']}"
    return parity["root"] / f"{job_id}.safetensors"
