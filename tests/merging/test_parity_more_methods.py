"""model_stock, karcher, arcee_fusion, sce, breadcrumbs_ties and della_linear against mergekit 0.1.5
itself, on the same YAML and the same tiny checkpoints (``test_mergekit_parity.py`` does the same
for the older methods; every mergekit merge here runs in one side process).

How each case is compared, and why:

* ``exact``: ``torch.equal`` on every tensor. mmmo computes in float32 with mergekit's operations in
  mergekit's order, so float32 merges (float32 checkpoints, or bfloat16 ones read with ``dtype:
  float32``) give its bits.
* ``f32``: relative L2 1e-6 per tensor. karcher with a ``base_model``: mergekit appends the base
  after the listed models, ``parse_mergekit`` puts it first, and the Karcher mean sums the models
  in that order (an ulp here and there).
* ``bf16``: bfloat16 checkpoints without ``dtype``: mergekit computes in bfloat16 (every step
  rounded to it), mmmo in float32, rounding once when it writes. The tolerances
  (``BF16_TOLERANCE``) are relative L2 errors per tensor, with their reasons there. arcee_fusion's
  bfloat16 choice of entries is rounding noise in mergekit: ``choice`` checks only that every entry
  is the base's or the model's (``_same_choice``).

The random method (della_linear) is compared on what is deterministic: at density 1 through the
YAML, exactly; and on one large tensor through mergekit's method API, its keep rate and L1
rescale. arcee_fusion draws a sample only for tensors of more than 1,000,000 entries (mergekit
from torch's global state, mmmo from the tensor's seeded generator): on such a tensor the two
thresholds come from different samples, so the two keep about the same share and agree wherever
both keep.

Each method's resident merge (``Merger.merged_tensors``, what a study trial runs) equals its file
merge (``merge_to_dir``, what ``mmmo merge`` runs), float32 and bfloat16.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from merging.errors import MergeError
from merging.files import merge_to_dir
from merging.io import CheckpointReader
from merging.mergekit_yaml import parse_mergekit
from merging.methods import TensorInputs, get_method
from merging.resident import Merger
from tests.mergekit_side import run_jobs
from tests.mergekit_side.compare import load_tensors, mergekit_output, mmmo_merge
from tests.tiny_archs import build_arch_set

F32_ON_BF16 = {"dtype": "float32", "out_dtype": "bfloat16"}  # mergekit computing as mmmo does

# Relative L2 error per tensor against mergekit's bfloat16 arithmetic, measured on these checkpoints
# and given about twice the room:
# * model_stock, karcher: the result is an interpolation of the weights, each of mergekit's steps
#   rounded to bfloat16 (unit roundoff 2^-8 of the weights, which dominate each tensor's norm):
#   measured up to 0.50 % (model_stock), 0.51 % (karcher).
# * sce, breadcrumbs_ties: base + a merged delta; the deltas are ~5 % of the weights and keep only a
#   few significant bits in bfloat16, and the selections (top variance, breadcrumbs' magnitude bands,
#   the sign election) flip at some entries near their thresholds, each flip a whole delta:
#   measured up to 0.65 % (sce), 0.34 % (breadcrumbs_ties).
# * della_linear at density 1 is task arithmetic: measured 0.08 %, given task arithmetic's 2^-7.
# arcee_fusion is not compared this way: see ``_same_choice``.
BF16_TOLERANCE = {"model_stock": 0.01, "karcher": 0.01, "sce": 0.015, "breadcrumbs_ties": 0.01,
                  "della_linear": 2**-7}


@dataclass(frozen=True)
class Case:
    id: str
    arch: str  # a key of SETS
    method: str
    models: tuple[dict[str, Any] | None, ...]  # per-model parameters, one entry per expert used
    params: dict[str, Any] | None = None  # the YAML's global `parameters`
    check: str = "exact"  # exact | f32 | bf16 | choice (arcee_fusion in bfloat16: see _same_choice)
    mergekit_extra: dict[str, Any] = field(default_factory=dict)  # keys only mergekit's YAML gets
    warns: tuple[str, ...] = ()  # what mmmo's warnings must name
    base_model: str = "yes"  # yes | no | listed (named as base_model and among the models, first)


SETS = {  # name -> (architecture, experts, shard_bytes)
    "llama": ("llama", 3, None),
    "qwen2_tied": ("qwen2_tied", 2, None),
    "bf16": ("mistral_bf16_sharded", 2, None),
}

BC = ({"weight": 0.7, "density": 0.5, "gamma": 0.1}, {"weight": 0.35, "density": 0.3, "gamma": 0.02},
      {"weight": 0.5, "density": 0.8})
BC2 = BC[:2]

CASES = [
    # model_stock: no per-model parameter; filter_wise shared
    Case("model_stock-3", "llama", "model_stock", (None, None, None)),
    Case("model_stock-2-filter-wise", "llama", "model_stock", (None, None), {"filter_wise": True}),
    Case("model_stock-base-listed", "llama", "model_stock", (None, None), base_model="listed"),
    Case("model_stock-tied-embeddings", "qwen2_tied", "model_stock", (None, None), {"filter_wise": True}),
    # karcher: no base; max_iter and tol shared
    Case("karcher-3", "llama", "karcher", (None, None, None), base_model="no"),
    Case("karcher-iterations", "llama", "karcher", (None, None, None), {"max_iter": 2, "tol": 1e-4},
         base_model="no"),
    Case("karcher-tied-embeddings", "qwen2_tied", "karcher", (None, None), base_model="no"),
    # a base_model is one more model to average; listed first among the models, in mergekit's order
    Case("karcher-base-listed", "llama", "karcher", (None, None), base_model="listed"),
    Case("karcher-with-base-model", "llama", "karcher", (None, None)),
    # arcee_fusion: the base and exactly one model, no parameters
    Case("arcee_fusion", "llama", "arcee_fusion", (None,)),
    Case("arcee_fusion-tied-embeddings", "qwen2_tied", "arcee_fusion", (None,)),
    # sce: select_topk shared; int8_mask declared by mergekit and without effect
    Case("sce-3", "llama", "sce", (None, None, None)),
    Case("sce-select-topk", "llama", "sce", (None, None, None), {"select_topk": 0.3}),
    Case("sce-2-int8-mask", "llama", "sce", (None, None), {"select_topk": 0.6, "int8_mask": True},
         warns=("'int8_mask'",)),
    # breadcrumbs_ties: breadcrumbs' per-model weight, density and gamma; TIES' consensus
    Case("breadcrumbs_ties-per-model", "llama", "breadcrumbs_ties", BC),
    Case("breadcrumbs_ties-global", "llama", "breadcrumbs_ties", (None, None),
         {"weight": 0.6, "density": 0.6, "gamma": 0.05, "normalize": True, "lambda": 0.8}),
    Case("breadcrumbs_ties-tied-embeddings", "qwen2_tied", "breadcrumbs_ties", BC2),
    # della_linear at density 1 (nothing drawn): weights, normalize, lambda
    Case("della_linear-density-1", "llama", "della_linear",
         ({"weight": 0.7, "epsilon": 0.1}, {"weight": 0.35, "density": 1.0}), {"lambda": 0.9}),
    Case("della_linear-density-1-normalized", "llama", "della_linear", (None, None, None),
         {"weight": 0.5, "normalize": True}),
    # bfloat16 checkpoints: mergekit computing in float32 (as mmmo does), then in bfloat16
    Case("model_stock-bf16-f32-math", "bf16", "model_stock", (None, None), mergekit_extra=F32_ON_BF16),
    Case("karcher-bf16-f32-math", "bf16", "karcher", (None, None), base_model="no", mergekit_extra=F32_ON_BF16),
    Case("arcee_fusion-bf16-f32-math", "bf16", "arcee_fusion", (None,), mergekit_extra=F32_ON_BF16),
    Case("sce-bf16-f32-math", "bf16", "sce", (None, None), {"select_topk": 0.5}, mergekit_extra=F32_ON_BF16),
    Case("breadcrumbs_ties-bf16-f32-math", "bf16", "breadcrumbs_ties", BC2, mergekit_extra=F32_ON_BF16),
    Case("della_linear-bf16-f32-math", "bf16", "della_linear", ({"weight": 0.7}, {"weight": 0.35}),
         mergekit_extra=F32_ON_BF16),
    Case("model_stock-bf16", "bf16", "model_stock", (None, None), check="bf16"),
    Case("karcher-bf16", "bf16", "karcher", (None, None), base_model="no", check="bf16"),
    # mergekit's arcee_fusion multiplies the bfloat16 delta by a float32 mask, so it writes float32
    # unless told otherwise; mmmo writes the checkpoints' dtype
    Case("arcee_fusion-bf16", "bf16", "arcee_fusion", (None,), check="choice",
         mergekit_extra={"out_dtype": "bfloat16"}),
    Case("sce-bf16", "bf16", "sce", (None, None), {"select_topk": 0.5}, check="bf16"),
    Case("breadcrumbs_ties-bf16", "bf16", "breadcrumbs_ties", BC2, check="bf16"),
    Case("della_linear-bf16", "bf16", "della_linear", ({"weight": 0.7}, {"weight": 0.35}), check="bf16"),
]
BY_ID = {c.id: c for c in CASES}
assert len(BY_ID) == len(CASES), "case ids must be unique"

# Configurations both refuse: (id, method, number of models, per-model parameters)
REFUSED = [
    ("model_stock-one-model", "model_stock", 1, None),
    ("arcee_fusion-two-models", "arcee_fusion", 2, None),
]

# Large tensors through mergekit's method API: (job id, method, one expert's parameters, global parameters)
RANDOM_SHAPE = (512, 512)
SAMPLED_SHAPE = (1100, 1000)  # above arcee_fusion's 1,000,000 entries: its quantiles come from a sample
RANDOM_JOBS = [
    ("della_linear-rescaled", "della_linear", {"weight": 0.8, "density": 0.4, "epsilon": 0.2}, {}),
]


def _yaml(case: Case, sets: dict, extra: dict[str, Any]) -> str:
    s = sets[case.arch]
    doc: dict[str, Any] = {"merge_method": case.method}
    models = [{"model": str(s.experts[f"e{i}"])} | ({"parameters": p} if p else {})
              for i, p in enumerate(case.models)]
    if case.base_model != "no":
        doc["base_model"] = str(s.base)
    if case.base_model == "listed":
        models.insert(0, {"model": str(s.base)})
    doc["models"] = models
    if case.params:
        doc["parameters"] = case.params
    return yaml.safe_dump(doc | extra, sort_keys=False)


def _refused_yaml(method: str, n: int, sets: dict) -> str:
    s = sets["llama"]
    return yaml.safe_dump({"merge_method": method, "base_model": str(s.base),
                           "models": [{"model": str(s.experts[f"e{i}"])} for i in range(n)]}, sort_keys=False)


@pytest.fixture(scope="module")
def parity(tmp_path_factory, mergekit_python):
    """Every case merged by mergekit in one side process; the model sets, YAMLs and results."""
    root = tmp_path_factory.mktemp("mergekit_parity_more")
    sets = {name: build_arch_set(root / "models" / name, arch, experts=experts, shard_bytes=shard, seed=i)
            for i, (name, (arch, experts, shard)) in enumerate(SETS.items())}
    (root / "yaml").mkdir()
    jobs = []
    for case in CASES:
        config = root / "yaml" / f"{case.id}.mergekit.yml"
        config.write_text(_yaml(case, sets, case.mergekit_extra))
        (root / "yaml" / f"{case.id}.yml").write_text(_yaml(case, sets, {}))
        jobs.append({"id": case.id, "kind": "yaml", "config": str(config), "out": str(root / "mergekit" / case.id)})
    for job_id, method, n, _ in REFUSED:
        config = root / "yaml" / f"{job_id}.yml"
        config.write_text(_refused_yaml(method, n, sets))
        jobs.append({"id": job_id, "kind": "yaml", "config": str(config), "out": str(root / "mergekit" / job_id)})
    gen = torch.Generator().manual_seed(17)
    tensors = {}
    for key, shape in (("random", RANDOM_SHAPE), ("sampled", SAMPLED_SHAPE)):
        base = torch.randn(shape, generator=gen)
        tensors[key] = {"base": base, "x0": base + 0.05 * torch.randn(shape, generator=gen)}
        save_file(tensors[key], root / f"{key}.safetensors")
    for job_id, method, expert, params in RANDOM_JOBS:
        jobs.append({"id": job_id, "kind": "tensor", "method": method, "inputs": str(root / "random.safetensors"),
                     "out": str(root / f"{job_id}.safetensors"), "seed": 5,
                     "parameters": {**params, **{k: [v] for k, v in expert.items()}}})
    jobs.append({"id": "arcee_fusion-sampled", "kind": "tensor", "method": "arcee_fusion",
                 "inputs": str(root / "sampled.safetensors"), "out": str(root / "arcee_fusion-sampled.safetensors"),
                 "seed": 5})
    results = run_jobs(mergekit_python, jobs, root / "side")
    return {"root": root, "sets": sets, "results": results, "tensors": tensors}





def _relative_l2(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.double() - expected.double()).norm() / expected.double().norm()).item()


def _same_choice(arch_set, name: str, got: torch.Tensor, expected: torch.Tensor) -> None:
    """arcee_fusion of bfloat16 checkpoints: every entry, in both merges, is the base's or the model's
    (mergekit's: the base plus the model's delta rounded to bfloat16, as it subtracts in bfloat16).

    Which entries is not compared: a fine-tune's per-row KL divergence is ~1e-6 here, and mergekit
    computes it in bfloat16, where ``log(p / q)`` of ratios that close to 1 rounds to 0 or to
    multiples of 2^-8; its fence then sits ~1000x higher than the float32 one and the kept sets
    barely overlap (9 entries in common of 35 and 28 in one tensor). With ``dtype: float32`` the
    two give the same bits (``arcee_fusion-bf16-f32-math``)."""
    base = load_tensors(arch_set.base)[name]
    model = load_tensors(arch_set.experts["e0"])[name]
    theirs_kept = (base.float() + (model - base).float()).to(base.dtype)  # model - base: in bfloat16
    for merged, kept in ((got, model), (expected, theirs_kept)):
        assert bool(((merged == base) | (merged == kept)).all()), name


@pytest.mark.parametrize("case_id", list(BY_ID))
def test_mmmo_merge_matches_mergekit(parity, case_id, caplog):
    case = BY_ID[case_id]
    theirs = load_tensors(mergekit_output(parity, case_id))
    with caplog.at_level(logging.WARNING, logger="merging"):
        ours = load_tensors(mmmo_merge(parity, case.id))
    assert sorted(ours) == sorted(theirs)
    for name, expected in theirs.items():
        got = ours[name]
        assert got.dtype == expected.dtype, name
        if case.check == "exact":
            assert torch.equal(got, expected), f"{name}: max |diff| {(got - expected).abs().max():.3g}"
            continue
        if case.check == "choice":
            _same_choice(parity["sets"][case.arch], name, got, expected)
            continue
        tolerance = 1e-6 if case.check == "f32" else BF16_TOLERANCE[case.method]
        diff = _relative_l2(got, expected)
        assert diff <= tolerance, f"{name}: relative L2 error {diff:.3g} above {tolerance:.3g}"
    warned = " ".join(r.getMessage() for r in caplog.records if r.name.startswith("merging"))
    for expected in case.warns:
        assert expected in warned
    if not case.warns:
        assert warned == ""


@pytest.mark.parametrize("job_id,method,n,params", REFUSED, ids=[r[0] for r in REFUSED])
def test_what_mergekit_refuses_is_refused(parity, job_id, method, n, params):
    assert not parity["results"][job_id]["ok"]
    plan = parse_mergekit((parity["root"] / "yaml" / f"{job_id}.yml").read_text())
    with pytest.raises(MergeError, match=method):
        merge_to_dir(plan.config, parity["root"] / "mmmo" / job_id)


def _mmmo_tensor(method: str, expert: dict, params: dict, tensors: dict, seed: int = 5) -> torch.Tensor:
    m = get_method(method)
    experts, resolved = m.resolve([expert], params, ["x0"])
    gen = torch.Generator().manual_seed(seed)
    if m.takes == "models":
        t = TensorInputs("t", tensors["base"], [], gen, models=[tensors["x0"].clone()])
    else:
        t = TensorInputs("t", tensors["base"], [tensors["x0"] - tensors["base"]], gen)
    return m.merge(t, experts, resolved)


def _binomial_tolerance(p: float, n: int) -> float:
    return 5 * (p * (1 - p) / n) ** 0.5  # five standard deviations of a keep rate over n entries


@pytest.mark.parametrize("job_id,method,expert,params", RANDOM_JOBS, ids=[j[0] for j in RANDOM_JOBS])
def test_random_method_agrees_with_mergekit_on_what_is_deterministic(parity, job_id, method, expert, params):
    tensors = parity["tensors"]["random"]
    delta = tensors["x0"] - tensors["base"]
    theirs = load_file(parity["root"] / f"{job_id}.safetensors")["merged"] - tensors["base"]
    ours = _mmmo_tensor(method, expert, params, tensors) - tensors["base"]
    n, density, weight = delta.numel(), expert["density"], expert["weight"]
    for merged in (ours, theirs):
        kept = merged != 0
        assert abs(kept.float().mean().item() - density) < _binomial_tolerance(density, n)
        # not normalized: the weight times the delta rescaled to its L1 norm
        torch.testing.assert_close(merged.abs().sum(), weight * delta.abs().sum(), rtol=1e-4, atol=0)


def test_arcee_fusion_on_a_sampled_tensor(parity):
    """Above 1,000,000 entries the fence comes from a sample of the importances: the same share kept
    (within a sample's error), and the same values wherever both keep; reproducible from the seed."""
    tensors = parity["tensors"]["sampled"]
    assert parity["results"]["arcee_fusion-sampled"]["ok"], parity["results"]["arcee_fusion-sampled"]
    theirs = load_file(parity["root"] / "arcee_fusion-sampled.safetensors")["merged"]
    ours = _mmmo_tensor("arcee_fusion", {}, {}, tensors)
    base = tensors["base"]
    kept_ours, kept_theirs = ours != base, theirs != base
    assert abs(kept_ours.float().mean().item() - kept_theirs.float().mean().item()) < 0.005
    both = kept_ours & kept_theirs
    assert both.float().mean() > 0.9 * kept_theirs.float().mean()
    assert torch.equal(ours[both], theirs[both])
    assert torch.equal(ours[~kept_ours], base[~kept_ours])
    assert torch.equal(_mmmo_tensor("arcee_fusion", {}, {}, tensors), ours)


# One configuration per method: the resident path (a study trial) against the file path (`mmmo merge`)
RESIDENT = ["model_stock-2-filter-wise", "karcher-iterations", "karcher-with-base-model", "arcee_fusion",
            "sce-select-topk", "breadcrumbs_ties-per-model", "della_linear-density-1", "model_stock-bf16",
            "karcher-bf16", "arcee_fusion-bf16", "sce-bf16", "breadcrumbs_ties-bf16", "della_linear-bf16"]


@pytest.mark.parametrize("case_id", RESIDENT)
def test_resident_merge_equals_the_file_merge(parity, case_id, tmp_path):
    case = BY_ID[case_id]
    config = parse_mergekit((parity["root"] / "yaml" / f"{case_id}.yml").read_text()).config
    if case.method == "della_linear":  # where it draws: the same seed, the same draws on both paths
        experts = tuple(replace(e, params={**e.params, "density": 0.5}) for e in config.experts)
        config = replace(config, experts=experts, seed=3)
    written = CheckpointReader(merge_to_dir(config, tmp_path / "merged"))
    merger = Merger(CheckpointReader(config.base), {e.name: CheckpointReader(e.path) for e in config.experts})
    seen = 0
    for name, merged in merger.merged_tensors(config):
        assert merged.dtype == written.get(name).dtype, name
        assert torch.equal(merged, written.get(name)), name
        seen += 1
    assert seen == len(written.keys())


def test_karcher_max_iter_is_a_whole_number_as_in_mergekit():
    method = get_method("karcher")
    assert method.resolve([{}], {"max_iter": 3.0}, ["m0"])[1]["max_iter"] == 3  # mergekit's int takes 3.0
    with pytest.raises(MergeError, match="'max_iter' must be a whole number"):
        method.resolve([{}], {"max_iter": 2.5}, ["m0"])


@pytest.mark.parametrize("name", ["model_stock", "karcher", "arcee_fusion", "sce"])
def test_methods_without_per_model_parameters_name_theirs_when_given_a_weight(name):
    """mergekit ignores a parameter its method does not declare; mmmo refuses it, naming the known ones."""
    method = get_method(name)
    known = sorted(p.name for p in (*method.global_params, *(i.param for i in method.inert_params)))
    message = f"model 'm0': unknown parameter(s) ['weight'] for method '{name}'; known: {known}"
    with pytest.raises(MergeError, match=re.escape(message)):
        method.resolve([{"weight": 1.0}, {}], {}, ["m0", "m1"])
