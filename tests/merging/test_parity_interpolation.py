"""slerp, nuslerp, multislerp and nearswap against mergekit 0.1.5 itself, on the same YAML and the
same tiny checkpoints (every mergekit merge in one side process), and the resident path against
the file path.

How each comparison is made, and why:

* ``exact``: ``torch.equal`` on every tensor. mmmo runs mergekit's kernels operation for operation
  on the models' own float32 tensors (``takes = "models"``), slerp with mergekit's 1 Mi-entry
  chunks of the norms and the dot product, so float32 merges give its bits. slerp is exact on
  bfloat16 checkpoints too: mergekit computes it in float32 whatever the inputs' dtype and rounds
  once, as mmmo does.
* ``bf16``: nuslerp, multislerp and nearswap compute in the inputs' dtype in mergekit (bfloat16 for
  bfloat16 checkpoints), mmmo in float32, rounding once when it writes; relative L2 error per
  tensor within ``BF16_TOLERANCE`` (see there). The same cases are compared ``exact`` with mergekit
  told to compute in float32 and write bfloat16 (``dtype: float32, out_dtype: bfloat16``).
* ``refused``: mergekit refuses the YAML, and so does mmmo, with mergekit's own words.

Without a ``base_model`` mergekit merges nuslerp and multislerp on the models themselves; so does
mmmo (the first model only gives the layout), checked with ``mmmo merge`` on the same YAML.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from evals.tiny_zoo import build_tiny_zoo
from merging.config import ExpertRef, MergeConfig
from merging.errors import MergeError
from merging.files import merge_to_dir
from merging.io import CheckpointReader, open_reference
from merging.mergekit_yaml import parse_mergekit, to_mergekit
from merging.methods import TensorInputs, get_method
from merging.methods.multislerp import multislerp
from merging.methods.nuslerp import nuslerp_models
from merging.placement import PlanKind
from merging.resident import Merger
from tests.mergekit_side import run_jobs
from tests.mergekit_side.compare import load_tensors, mergekit_output, mmmo_merge
from tests.tiny_archs import build_arch_set

F32_ON_BF16 = {"dtype": "float32", "out_dtype": "bfloat16"}  # mergekit computing as mmmo does
FILTERED_T = [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
              {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]  # slerp configs in the wild

# Relative L2 error per tensor against mergekit's bfloat16 arithmetic, where mergekit computes in
# bfloat16 (every intermediate rounded, unit roundoff 2^-8) and mmmo in float32, rounding once.
# The inputs' magnitude dominates each tensor's norm, and mergekit rounds two or three terms of that
# size (nearswap's ``weight * b`` and ``(1 - weight) * a`` and their sum; nuslerp's and multislerp's
# base plus the task vector, itself from norms and angles in bfloat16): measured up to 0.39 %
# (nearswap), 0.35 % (multislerp), 0.15 % (nuslerp), within two unit roundoffs.
BF16_TOLERANCE = {"nuslerp": 2**-7, "multislerp": 2**-7, "nearswap": 2**-7}


@dataclass(frozen=True)
class Case:
    id: str
    set: str  # a key of SETS
    method: str
    models: tuple[dict[str, Any] | None, ...]  # per-model parameters, one entry per model used (besides the base)
    params: dict[str, Any] | None = None  # the YAML's global `parameters`
    dtype: str | None = None  # the YAML's `dtype`
    check: str = "exact"  # exact | bf16 | refused
    mergekit_extra: dict[str, Any] = field(default_factory=dict)  # keys only mergekit's YAML gets
    base_listed: bool = False  # the base_model also listed among the models (the classic slerp form)
    base_model: bool = True  # whether the YAML names one
    refusal: str = ""  # the words of mergekit's refusal, which mmmo's must contain
    warns: tuple[str, ...] = ()  # what mmmo's warnings must name


SETS = {  # name -> (architecture or "zoo", experts)
    "llama": ("llama", 3),
    "zoo": ("zoo", 4),  # the tiny zoo: a 4-layer Llama, so gradients land between their entries
    "qwen2_tied": ("qwen2_tied", 2),
    "mistral_bf16_sharded": ("mistral_bf16_sharded", 2),
}
W2 = ({"weight": 0.3}, {"weight": 0.8})

CASES = [
    # slerp: the base_model at t = 0, one other model at t = 1
    Case("slerp-scalar", "llama", "slerp", (None,), {"t": 0.3}),
    Case("slerp-base-listed", "llama", "slerp", (None,), {"t": 0.3}, base_listed=True),
    Case("slerp-extrapolated", "llama", "slerp", (None,), {"t": 1.25}),
    Case("slerp-gradient", "zoo", "slerp", (None,), {"t": [0, 0.5, 1]}, base_listed=True),
    Case("slerp-filters", "zoo", "slerp", (None,), {"t": FILTERED_T}, base_listed=True),
    Case("slerp-tied-embeddings", "qwen2_tied", "slerp", (None,), {"t": 0.6}),
    Case("slerp-bf16", "mistral_bf16_sharded", "slerp", (None,), {"t": [0.2, 0.9]}),  # float32 math there too
    Case("slerp-dtype-bf16", "llama", "slerp", (None,), {"t": 0.4}, dtype="bfloat16"),
    Case("slerp-t-under-a-model", "llama", "slerp", ({"t": 0.9},), {"t": 0.3},
         warns=("'t' is a global parameter",)),
    # nuslerp: t = weight_2 / (weight_1 + weight_2), on the task vectors from the base
    Case("nuslerp-flattened", "llama", "nuslerp", W2),
    Case("nuslerp-rows", "llama", "nuslerp", W2, {"nuslerp_flatten": False}),
    Case("nuslerp-columns", "llama", "nuslerp", W2, {"nuslerp_flatten": False, "nuslerp_row_wise": True}),
    Case("nuslerp-weights-cancel", "llama", "nuslerp", ({"weight": 0.5}, {"weight": -0.5})),  # t = 0.5
    Case("nuslerp-gradient-weight", "zoo", "nuslerp", ({"weight": [0.2, 1.0]}, {"weight": 0.6})),
    Case("nuslerp-bf16-f32-math", "mistral_bf16_sharded", "nuslerp", W2, mergekit_extra=F32_ON_BF16),
    Case("nuslerp-bf16", "mistral_bf16_sharded", "nuslerp", W2, check="bf16"),
    # multislerp: any number of models' task vectors, on the hypersphere
    Case("multislerp-three", "llama", "multislerp", ({"weight": 0.3}, {"weight": 0.8}, {"weight": 0.5})),
    Case("multislerp-unnormalized", "llama", "multislerp", W2, {"normalize_weights": False, "eps": 1e-6}),
    Case("multislerp-one-model", "llama", "multislerp", ({"weight": 0.7},)),  # that model, as it is
    Case("multislerp-filters", "zoo", "multislerp", ({"weight": [{"filter": "mlp", "value": 0.9}, {"value": 0.2}]},
                                                     {"weight": 0.5}, {"weight": [0.1, 0.6]})),
    Case("multislerp-bf16-f32-math", "mistral_bf16_sharded", "multislerp", W2, mergekit_extra=F32_ON_BF16),
    Case("multislerp-bf16", "mistral_bf16_sharded", "multislerp", W2, check="bf16"),
    # nearswap: the other model's value where it is within t of the base's
    Case("nearswap", "llama", "nearswap", (None,), {"t": 0.002}),
    Case("nearswap-gradient", "zoo", "nearswap", (None,), {"t": [0.0005, 0.005]}, base_listed=True),
    Case("nearswap-bf16-f32-math", "mistral_bf16_sharded", "nearswap", (None,), {"t": 0.002},
         mergekit_extra=F32_ON_BF16),
    Case("nearswap-bf16", "mistral_bf16_sharded", "nearswap", (None,), {"t": 0.002}, check="bf16"),
    # shapes mergekit refuses
    Case("slerp-two-other-models", "llama", "slerp", (None, None), {"t": 0.5}, check="refused",
         refusal="Merge method requires exactly 2 inputs"),
    Case("slerp-without-t", "llama", "slerp", (None,), check="refused",
         refusal="Missing required parameter t"),
    Case("nearswap-two-other-models", "llama", "nearswap", (None, None), {"t": 0.01}, check="refused",
         refusal="Merge method requires exactly 2 inputs"),
    Case("nuslerp-one-other-model", "llama", "nuslerp", ({"weight": 1.0},), check="refused",
         refusal="Merge method requires at least 2 non-base inputs"),
    Case("nuslerp-three-other-models", "llama", "nuslerp", W2 + ({"weight": 1.0},), check="refused",
         refusal="Merge method requires exactly 2 non-base inputs"),
    Case("nuslerp-without-weight", "llama", "nuslerp", (None, None), check="refused",
         refusal="weight"),
]
BY_ID = {c.id: c for c in CASES}
assert len(BY_ID) == len(CASES), "case ids must be unique"

# Without a base_model: mergekit merges the models themselves, and so does mmmo
BASELESS = [
    ("nuslerp-no-base", "nuslerp", W2, {}),
    ("nuslerp-no-base-rows", "nuslerp", W2, {"nuslerp_flatten": False}),
    ("multislerp-no-base", "multislerp", ({"weight": 0.3}, {"weight": 0.8}, {"weight": 0.5}), {}),
]


def _paths(root: Path, name: str) -> tuple[Path, list[Path]]:
    arch, experts = SETS[name]
    if arch == "zoo":
        zoo = build_tiny_zoo(root / name)
        return zoo.base, list(zoo.experts.values())[:experts]
    built = build_arch_set(root / name, arch, experts=experts)
    return built.base, list(built.experts.values())


def _yaml(case: Case, sets: dict, extra: dict[str, Any]) -> str:
    base, experts = sets[case.set]
    doc: dict[str, Any] = {"merge_method": case.method}
    if case.base_model:
        doc["base_model"] = str(base)
    models = [{"model": str(base)}] if case.base_listed else []
    models += [{"model": str(experts[i])} | ({"parameters": p} if p else {}) for i, p in enumerate(case.models)]
    doc["models"] = models
    if case.params:
        doc["parameters"] = case.params
    if case.dtype:
        doc["dtype"] = case.dtype
    return yaml.safe_dump(doc | extra, sort_keys=False)


def _baseless_yaml(method: str, models: tuple, params: dict, sets: dict) -> str:
    _, experts = sets["llama"]
    doc = {"merge_method": method, "models": [{"model": str(experts[i]), "parameters": p}
                                              for i, p in enumerate(models)]}
    return yaml.safe_dump(doc | ({"parameters": params} if params else {}), sort_keys=False)


@pytest.fixture(scope="module")
def parity(tmp_path_factory, mergekit_python):
    """Every case merged by mergekit in one side process; the model sets, YAMLs and results."""
    root = tmp_path_factory.mktemp("interpolation_parity")
    sets = {name: _paths(root / "models", name) for name in SETS}
    (root / "yaml").mkdir()
    jobs = []
    for case in CASES:
        config = root / "yaml" / f"{case.id}.mergekit.yml"
        config.write_text(_yaml(case, sets, case.mergekit_extra))
        (root / "yaml" / f"{case.id}.yml").write_text(_yaml(case, sets, {}))
        jobs.append({"id": case.id, "kind": "yaml", "config": str(config), "out": str(root / "mergekit" / case.id)})
    for job_id, method, models, params in BASELESS:
        config = root / "yaml" / f"{job_id}.yml"
        config.write_text(_baseless_yaml(method, models, params, sets))
        jobs.append({"id": job_id, "kind": "yaml", "config": str(config), "out": str(root / "mergekit" / job_id)})
    jobs.append({"id": "specs", "kind": "specs", "out": str(root / "specs.json")})
    results = run_jobs(mergekit_python, jobs, root / "side")
    return {"root": root, "sets": sets, "results": results}





@pytest.mark.parametrize("case_id", [c.id for c in CASES if c.check != "refused"])
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
            worst = (got.double() - expected.double()).abs().max()
            assert torch.equal(got, expected), f"{name}: max |diff| {worst:.3g}"
        else:
            diff = (got.double() - expected.double()).norm() / expected.double().norm()
            tolerance = BF16_TOLERANCE[case.method]
            assert diff <= tolerance, f"{name}: relative L2 error {diff.item():.3g} above {tolerance:.3g}"
    warned = " ".join(r.getMessage() for r in caplog.records if r.name.startswith("merging"))
    for expected in case.warns:
        assert expected in warned
    if not case.warns:
        assert warned == ""


def test_the_merges_are_not_trivial(parity):
    """slerp at t = 0.3 lies strictly between its ends; nearswap at this t swaps some entries and not others."""
    base_dir, expert_dirs = parity["sets"]["llama"]
    base, e0 = load_tensors(base_dir), load_tensors(expert_dirs[0])
    name = "model.layers.0.mlp.up_proj.weight"
    merged = load_tensors(mergekit_output(parity, "slerp-scalar"))[name]
    assert not torch.equal(merged, base[name]) and not torch.equal(merged, e0[name])
    swapped = load_tensors(mergekit_output(parity, "nearswap"))[name]
    assert 0 < (swapped == e0[name]).float().mean() < 1


@pytest.mark.parametrize("case_id", [c.id for c in CASES if c.check == "refused"])
def test_shapes_mergekit_refuses_are_refused_in_its_words(parity, case_id, tmp_path):
    case = BY_ID[case_id]
    result = parity["results"][case_id]
    assert not result["ok"], f"mergekit merged {case_id}"
    assert case.refusal in result["error"]
    plan = parse_mergekit((parity["root"] / "yaml" / f"{case.id}.yml").read_text())
    with pytest.raises(MergeError, match=case.refusal):
        merge_to_dir(plan.config, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("job_id,method,models,params", BASELESS, ids=[b[0] for b in BASELESS])
def test_without_a_base_model_the_models_themselves_merge_as_in_mergekit(parity, job_id, method, models, params,
                                                                         tmp_path):
    text = (parity["root"] / "yaml" / f"{job_id}.yml").read_text()
    theirs = load_tensors(mergekit_output(parity, job_id))
    config = parse_mergekit(text).config
    assert not config.base_input and "base_model" not in to_mergekit(config)
    ours = load_tensors(merge_to_dir(config, tmp_path / "ours"))
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[n], theirs[n]) for n in theirs)
    resident = dict(Merger(open_reference(config.base), {e.name: open_reference(e.path) for e in config.experts},
                           check_ancestry=config.ancestry).merged_tensors(config))
    assert all(torch.equal(resident[n], theirs[n]) for n in theirs)
    experts = [load_tensors(p) for p in parity["sets"]["llama"][1][:len(models)]]
    weights = [m["weight"] for m in models]
    for name, expected in theirs.items():
        inputs = [e[name] for e in experts]
        if method == "nuslerp":
            got = nuslerp_models(inputs, weights, None, row_wise=params.get("nuslerp_row_wise", False),
                                 flatten=params.get("nuslerp_flatten", True))
        else:
            got = multislerp(inputs, weights, None)
        assert torch.equal(got, expected), name


def test_parameters_are_declared_as_mergekit_declares_them(parity):
    import json

    specs = json.loads((parity["root"] / "specs.json").read_text())
    for name in ("slerp", "nuslerp", "multislerp", "nearswap"):
        method = get_method(name)
        theirs = {p["name"]: p for p in specs[name]}
        ours = {p.name: p for p in (*method.expert_params, *method.global_params)}
        assert sorted(ours) == sorted(theirs), name
        for p in method.expert_params:
            assert theirs[p.name]["scope"] in ("input", "non_base"), (name, p.name)
        for p in method.global_params:
            assert theirs[p.name]["scope"] == "shared", (name, p.name)
        for key, p in ours.items():
            assert p.default == theirs[key]["default"], (name, key)


# ---- every parameter acts, and where it should ----

def _merge(name: str, models: list[torch.Tensor], base: torch.Tensor, experts: list[dict], params: dict):
    method = get_method(name)
    resolved, global_params = method.resolve(experts, params, [f"m{i}" for i in range(len(models))])
    return method.merge(TensorInputs("t", base, [], models=models), resolved, global_params)


@pytest.mark.parametrize("name,experts,params,changes", [
    ("slerp", [{}], {"t": 0.3}, [({}, {"t": 0.6})]),
    ("nearswap", [{}], {"t": 0.05}, [({}, {"t": 0.2})]),
    ("nuslerp", [{"weight": 0.3}, {"weight": 0.8}], {"nuslerp_flatten": False},
     [({0: {"weight": 0.6}}, {}), ({}, {"nuslerp_flatten": True}), ({}, {"nuslerp_row_wise": True})]),
    ("multislerp", [{"weight": 0.3}, {"weight": 0.8}], {},
     [({0: {"weight": 0.6}}, {}), ({}, {"normalize_weights": False}), ({}, {"eps": 0.5})]),
])
def test_every_parameter_changes_the_merge(name, experts, params, changes):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(24, 16, generator=g)
    models = [base + 0.3 * torch.randn(24, 16, generator=g) for _ in experts]
    baseline = _merge(name, models, base, experts, params)
    for per_model, shared in changes:
        changed = [{**e, **per_model.get(i, {})} for i, e in enumerate(experts)]
        assert not torch.equal(_merge(name, models, base, changed, {**params, **shared}), baseline), \
            (name, per_model, shared)


def test_slerp_ends_are_the_models_and_t_is_required():
    g = torch.Generator().manual_seed(4)
    base = torch.randn(8, 8, generator=g)
    other = base + torch.randn(8, 8, generator=g)
    assert torch.allclose(_merge("slerp", [other], base, [{}], {"t": 0.0}), base, atol=1e-6)
    assert torch.allclose(_merge("slerp", [other], base, [{}], {"t": 1.0}), other, atol=1e-6)
    with pytest.raises(MergeError, match="'t' is required by method 'slerp'"):
        get_method("slerp").resolve([{}], {}, ["m0"])
    with pytest.raises(MergeError, match="exactly 2 inputs; got 3"):
        get_method("slerp").resolve([{}, {}], {"t": 0.5}, ["m0", "m1"])


# ---- the resident path gives the file path's tensors ----

def _config(base: Path, experts: list[Path], method: str, dtype: str | None = None) -> MergeConfig:
    shapes = {"slerp": ([{}], {"t": [0.2, 0.7]}), "nearswap": ([{}], {"t": 0.002}),
              "nuslerp": ([{"weight": 0.3}, {"weight": 0.8}], {"nuslerp_flatten": False}),
              "multislerp": ([{"weight": 0.3}, {"weight": 0.8}], {})}
    models, params = shapes[method]
    refs = tuple(ExpertRef(f"e{i}", str(p), m) for i, (p, m) in enumerate(zip(experts, models, strict=False)))
    return MergeConfig(method=method, base=str(base), experts=refs, params=params, dtype=dtype)


@pytest.mark.parametrize("method", ["slerp", "nuslerp", "multislerp", "nearswap"])
@pytest.mark.parametrize("set_name,dtype", [("llama", None), ("mistral_bf16_sharded", None), ("llama", "bfloat16")])
def test_resident_merge_equals_file_merge(parity, tmp_path, method, set_name, dtype):
    base, experts = parity["sets"][set_name]
    config = _config(base, experts, method, dtype)
    written = CheckpointReader(merge_to_dir(config, tmp_path / "merged"))
    held = torch.bfloat16 if dtype == "bfloat16" else None
    used = {e.name: CheckpointReader(e.path) for e in config.experts}
    for plan in PlanKind:
        merger = Merger(CheckpointReader(base), used, plan=plan, dtype=held)
        seen = 0
        for name, merged in merger.merged_tensors(config):
            expected = written.get(name)
            assert merged.dtype == expected.dtype, (plan, name)
            assert torch.equal(merged, expected), (plan, name)
            seen += 1
        assert seen == len(written.keys())
