"""mergekit's ``slices:`` (layer stacking, per-slice merges) and ``passthrough``, against mergekit 0.1.5 itself.

Every case's mergekit merge runs in one process of mergekit's side environment; each test merges the same
YAML with mmmo (``merging.slices``, what ``mmmo merge`` runs for a ``slices:`` YAML) and compares every
tensor with ``torch.equal``, the output's tensor names, and its layer count. Exact equality holds in
float32 and in bfloat16 alike: a passthrough copies (times ``scale``: mergekit multiplies in the inputs'
dtype, i.e. the float32 product rounded once, as mmmo rounds it), and the per-slice merges here compute
as in mergekit's ``models:`` form (tests/merging/test_mergekit_parity.py), the result rounded to the
inputs' dtype before ``out_dtype``.

The models have two layers (tests/tiny_archs.py), so the stacks are e.g. layers [0, 2) of A then [0, 1)
of B (three layers), or [0, 1) of A then [1, 2) of B (the embeddings from A, the final norm and lm_head
from B).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from merging.errors import MergeError
from merging.files import merge_to_dir
from merging.mergekit_yaml import parse_mergekit
from merging.methods import METHODS, TensorInputs, get_method
from merging.resident import Merger
from merging.slices import is_pre_weight, load_slices, merge_slices_to_dir, parse_slices
from tests.mergekit_side import run_jobs, side_python
from tests.mergekit_side.compare import load_tensors
from tests.tiny_archs import build_arch_set

SETS = {  # name -> (architecture, experts)
    "llama": ("llama", 2),
    "mistral_bf16_sharded": ("mistral_bf16_sharded", 2),
    "qwen2_tied": ("qwen2_tied", 2),
    "gemma2": ("gemma2", 2),  # layer_types: [sliding_attention, full_attention]
}


@dataclass(frozen=True)
class Case:
    id: str
    arch: str
    doc: dict[str, Any]  # the YAML, with model names (base, e0, e1) for paths
    layers: int | None  # the output's layer count; None: both refuse it
    method: str | None = None  # needed in mmmo's registry (None: the doc's own method, always there)
    refusal: str = ""  # what mmmo's refusal says (for layers=None)
    # mergekit keeps the donor's layer_types list, and transformers 5 refuses to save that config: its
    # run fails at the end, after writing every tensor (compared), with no config.json; mmmo rebuilds the list
    stale_layer_types: bool = False


def _src(model: str, a: int, b: int, **params) -> dict:
    return {"model": model, "layer_range": [a, b]} | ({"parameters": params} if params else {})


SLERP_T = [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"filter": "mlp", "value": [1, 0.5, 0]}, {"value": 0.5}]

CASES = [
    Case("frankenmerge-fp32", "llama", {"merge_method": "passthrough", "slices": [
        {"sources": [_src("e0", 0, 2)]}, {"sources": [_src("e1", 0, 1)]}]}, 3),
    # the embeddings from the first slice's model, the final norm and lm_head from the last slice's
    Case("passthrough-scale-crossed", "llama", {"merge_method": "passthrough", "parameters": {"scale": 0.9}, "slices": [
        {"sources": [_src("e0", 0, 1)]}, {"sources": [_src("e1", 1, 2, scale=0.5)]},
        {"sources": [_src("base", 0, 2, scale=[0.25, 2.0])]}]}, 4),
    Case("passthrough-scale-filtered", "llama", {"merge_method": "passthrough", "slices": [
        {"sources": [_src("e0", 0, 2, scale=[{"filter": "mlp", "value": 0.5}, {"value": 1.5}])]}]}, 2),
    Case("frankenmerge-bf16-sharded", "mistral_bf16_sharded", {"merge_method": "passthrough", "slices": [
        {"sources": [_src("e0", 0, 2, scale=0.7)]}, {"sources": [_src("e1", 0, 2)]}], "parameters": {"scale": 1.3}},
        4),
    # float32 checkpoints read in bfloat16, written in float32: the product rounded to bfloat16 first
    Case("passthrough-dtype-bf16-out-f32", "llama", {"merge_method": "passthrough", "dtype": "bfloat16",
                                                     "out_dtype": "float32", "slices": [
        {"sources": [_src("e0", 0, 2, scale=0.7)]}, {"sources": [_src("e1", 1, 2)]}]}, 3),
    Case("frankenmerge-tied-embeddings", "qwen2_tied", {"merge_method": "passthrough", "slices": [
        {"sources": [_src("e0", 0, 2)]}, {"sources": [_src("e1", 0, 2)]}], "dtype": "bfloat16"}, 4,
        stale_layer_types=True),
    Case("frankenmerge-layer-types", "gemma2", {"merge_method": "passthrough", "slices": [
        {"sources": [_src("e0", 1, 2)]}, {"sources": [_src("e1", 0, 2)]}]}, 3, stale_layer_types=True),
    # a merge per slice: per-source weights, a slice's parameters, a gradient over a slice's layers
    Case("linear-per-slice", "llama", {"merge_method": "linear", "slices": [
        {"sources": [_src("e0", 0, 2, weight=0.3), _src("e1", 0, 2, weight=[0.2, 0.9])]},
        {"sources": [_src("e1", 1, 2), _src("e0", 0, 1)], "parameters": {"weight": 0.5}}]}, 3),
    Case("linear-per-slice-bf16", "mistral_bf16_sharded", {"merge_method": "linear", "parameters": {"weight": 1.0},
                                                           "slices": [
        {"sources": [_src("e0", 0, 2, weight=0.7), _src("e1", 0, 2)]}, {"sources": [_src("e1", 0, 1)]}]}, 3),
    Case("ties-per-slice", "llama", {"merge_method": "ties", "base_model": "base", "parameters": {"density": 0.5},
                                     "slices": [
        {"sources": [_src("base", 0, 2), _src("e0", 0, 2, weight=0.7), _src("e1", 0, 2, weight=0.4, density=0.3)]},
        {"sources": [_src("base", 1, 2), _src("e0", 1, 2, weight=1.0)], "parameters": {"normalize": False}}]}, 3),
    # the classic slerp frankenmerge config (once mmmo has slerp)
    Case("slerp-per-slice", "llama", {"merge_method": "slerp", "base_model": "e0", "parameters": {"t": SLERP_T},
                                      "slices": [{"sources": [_src("e0", 0, 2), _src("e1", 0, 2)]}]}, 2,
         method="slerp"),
    Case("slerp-per-slice-bf16", "mistral_bf16_sharded", {"merge_method": "slerp", "base_model": "e0",
                                                          "parameters": {"t": SLERP_T}, "dtype": "bfloat16",
                                                          "slices": [{"sources": [_src("e0", 0, 2), _src("e1", 0, 2)]},
                                                                     {"sources": [_src("e0", 1, 2),
                                                                                  _src("e1", 0, 1)]}]}, 3,
         method="slerp"),
    # refused by both
    Case("passthrough-two-sources", "llama", {"merge_method": "passthrough", "slices": [
        {"sources": [_src("e0", 0, 2), _src("e1", 0, 2)]}]}, None, refusal="copies one model's tensors"),
    Case("ties-base-not-a-source", "llama", {"merge_method": "ties", "base_model": "base", "slices": [
        {"sources": [_src("e0", 0, 2, weight=1.0), _src("e1", 0, 2, weight=1.0)]}]}, None,
         refusal="not among the slice's sources"),
]
BY_ID = {c.id: c for c in CASES}
assert len(BY_ID) == len(CASES)

# passthrough through `models:` (one model, no other base): the normal file path and the resident one
MODELS_CASES = {
    "passthrough-models-fp32": ("llama", {"merge_method": "passthrough", "models": [
        {"model": "e0", "parameters": {"scale": 0.3}}]}),
    "passthrough-models-bf16": ("mistral_bf16_sharded", {"merge_method": "passthrough", "base_model": "e1",
                                                         "models": [{"model": "e1"}], "parameters": {"scale": 1.7}}),
    "passthrough-models-base-too": ("llama", {"merge_method": "passthrough", "base_model": "base", "models": [
        {"model": "e0"}]}),  # two inputs: both refuse
}


def _paths(doc: Any, s) -> Any:
    """``doc`` with the model names base/e0/e1 replaced by the set's directories."""
    names = {"base": str(s.base), **{k: str(v) for k, v in s.experts.items()}}
    if isinstance(doc, dict):
        return {k: (names.get(v, v) if k in ("model", "base_model") else _paths(v, s)) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_paths(v, s) for v in doc]
    return doc


@pytest.fixture(scope="module")
def parity(tmp_path_factory, mergekit_python):
    root = tmp_path_factory.mktemp("slices")
    sets = {name: build_arch_set(root / "models" / name, arch, experts=n, seed=i)
            for i, (name, (arch, n)) in enumerate(SETS.items())}
    jobs = []
    for case_id, (arch, doc) in [(c.id, (c.arch, c.doc)) for c in CASES] + list(MODELS_CASES.items()):
        config = root / "yaml" / f"{case_id}.yml"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(yaml.safe_dump(_paths(doc, sets[arch]), sort_keys=False))
        jobs.append({"id": case_id, "kind": "yaml", "config": str(config), "out": str(root / "mergekit" / case_id)})
    return {"root": root, "sets": sets, "results": run_jobs(mergekit_python, jobs, root / "side")}



def _assert_equal(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert sorted(ours) == sorted(theirs)
    for name, expected in theirs.items():
        assert ours[name].dtype == expected.dtype, name
        assert torch.equal(ours[name], expected), f"{name}: max |diff| {(ours[name] - expected).abs().max():.3g}"


def _layers(model_dir: Path) -> int:
    return json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]


@pytest.mark.parametrize("case_id", list(BY_ID))
def test_slices_merge_as_mergekit_merges_them(parity, case_id, tmp_path):
    case = BY_ID[case_id]
    if case.method is not None and case.method not in METHODS:
        pytest.skip(f"mmmo has no '{case.method}' yet")
    result = parity["results"][case_id]
    config = parity["root"] / "yaml" / f"{case_id}.yml"
    plan = load_slices(config.read_text())
    if case.layers is None:
        assert not result["ok"], f"mergekit merged {case_id}, which mmmo refuses"
        with pytest.raises(MergeError, match=case.refusal):
            merge_slices_to_dir(plan, tmp_path / "out")
        assert not (tmp_path / "out").exists()
        return
    theirs_dir = parity["root"] / "mergekit" / case_id
    if case.stale_layer_types:
        assert not result["ok"] and "layer_types" in result["error"], result
    else:
        assert result["ok"], f"mergekit refused {case_id}: {result['error']}\n{result.get('traceback', '')}"
        assert _layers(theirs_dir) == case.layers
    ours_dir = merge_slices_to_dir(plan, tmp_path / "out")
    _assert_equal(load_tensors(ours_dir), load_tensors(theirs_dir))
    assert _layers(ours_dir) == case.layers
    # every layer of the output is there, numbered 0 .. layers - 1
    indices = {int(n.split(".")[2]) for n in load_tensors(ours_dir) if n.startswith("model.layers.")}
    assert indices == set(range(case.layers))


def _layer_types(case: Case, sets) -> list[str] | None:
    s = sets[case.arch]
    listed = json.loads((s.base / "config.json").read_text()).get("layer_types")
    if listed is None:
        return None
    return [listed[i] for sl in case.doc["slices"] for i in range(*sl["sources"][0]["layer_range"])]


@pytest.mark.parametrize("case_id", ["frankenmerge-fp32", "frankenmerge-bf16-sharded", "frankenmerge-tied-embeddings",
                                     "frankenmerge-layer-types", "linear-per-slice"])
def test_the_output_loads_with_transformers_with_its_layers(parity, case_id, tmp_path):
    from transformers import AutoModelForCausalLM

    case = BY_ID[case_id]
    out = merge_slices_to_dir(load_slices((parity["root"] / "yaml" / f"{case_id}.yml").read_text()), tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert len(model.model.layers) == model.config.num_hidden_layers == case.layers
    # where transformers writes a layer_types list (qwen2, gemma2), it is rebuilt for the new layers
    assert json.loads((out / "config.json").read_text()).get("layer_types") == _layer_types(case, parity["sets"])
    state = load_tensors(out)
    for name, p in model.state_dict().items():  # what loaded is what was written (tied lm_head: the embeddings)
        written = state.get(name, state.get("model.embed_tokens.weight") if name == "lm_head.weight" else None)
        assert torch.equal(p, written.to(p.dtype)), name
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()


def test_mmmo_merge_runs_a_slices_yaml(parity, tmp_path):
    from service.cli import main

    config = parity["root"] / "yaml" / "passthrough-scale-crossed.yml"
    assert main(["merge", str(config), str(tmp_path / "out"), "--dtype", "bfloat16"]) == 0
    theirs = load_tensors(parity["root"] / "mergekit" / "passthrough-scale-crossed")
    theirs = {k: v.to(torch.bfloat16) for k, v in theirs.items()}
    _assert_equal(load_tensors(tmp_path / "out"), theirs)  # float32 results, rounded once to bfloat16
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 4 and cfg.get("torch_dtype", cfg.get("dtype")) == "bfloat16"
    assert "slices:" in (tmp_path / "out" / "README.md").read_text()


@pytest.mark.parametrize("case_id", list(MODELS_CASES))
def test_passthrough_through_models_in_both_paths(parity, case_id, tmp_path):
    result = parity["results"][case_id]
    plan = parse_mergekit((parity["root"] / "yaml" / f"{case_id}.yml").read_text())
    if case_id.endswith("base-too"):
        assert not result["ok"]
        with pytest.raises(MergeError, match="copies one model's tensors, and this merge has 2"):
            merge_to_dir(plan.config, tmp_path / "out", dtype=plan.dtype)
        return
    assert result["ok"], result.get("error")
    ours_dir = merge_to_dir(plan.config, tmp_path / "out", dtype=plan.dtype)
    theirs = load_tensors(parity["root"] / "mergekit" / case_id)
    _assert_equal(load_tensors(ours_dir), theirs)
    (expert,) = plan.config.experts
    for dtype in (None, torch.bfloat16):  # the resident path: the checkpoints' dtype, and held in bfloat16
        merger = Merger.from_checkpoints(plan.config.base, {expert.name: expert.path}, dtype=dtype)
        resident = dict(merger.merged_tensors(plan.config))
        if dtype is None:
            _assert_equal(resident, theirs)
        else:  # the file path with the same held dtype (the config's: mergekit's `dtype`)
            held = merge_to_dir(replace(plan.config, dtype="bfloat16"), tmp_path / "bf16")
            _assert_equal(resident, load_tensors(held))


# ---- mmmo's own: the method's contract, the plan's checks, the pre/post split, the study refusal ----

def _passthrough(experts, params, x):
    m = get_method("passthrough")
    rows, shared = m.resolve(experts, params, ["m0"])
    return m.merge(TensorInputs("t", x, [], models=[x.clone()]), rows, shared)


def test_passthrough_scale_is_per_model_with_a_global_default_and_none_copies():
    x = torch.randn(8, 4)
    assert torch.equal(_passthrough([{}], {}, x), x)
    assert torch.equal(_passthrough([{"scale": 0.5}], {"scale": 3.0}, x), x * 0.5)
    assert torch.equal(_passthrough([{}], {"scale": 3.0}, x), x * 3.0)
    with pytest.raises(MergeError, match="'scale' must be a number"):
        _passthrough([{"scale": "big"}], {}, x)
    with pytest.raises(MergeError, match="has 2"):
        get_method("passthrough").resolve([{}, {}], {}, ["m0", "m1"])


def _doc(**kw) -> dict:
    return {"merge_method": "passthrough", "slices": [{"sources": [_src("a", 0, 2)]}]} | kw


@pytest.mark.parametrize("doc,message", [
    (_doc(models=[{"model": "a"}]), "exactly one of 'models' and 'slices'"),
    (_doc(slices=[{"sources": [_src("a", 0, 2), _src("b", 0, 1)]}]), "same number of layers"),
    (_doc(slices=[{"sources": [_src("a", 2, 1)]}]), "0 <= START <= END"),
    (_doc(slices=[{"sources": [{"model": "a", "layer_range": [0]}]}]), "'layer_range' must be"),
    (_doc(slices=[{"sources": [_src("a", 0, 1), _src("a", 1, 2)]}]), "appears twice"),
    (_doc(slices=[{"sources": [_src("a", 0, 1)], "weight": 1}]), "unknown key"),
    (_doc(tokenizer_source="union"), "tokenizer"),
    (_doc(merge_method="obim"), "obim"),
    (_doc(dtype="int8"), "'dtype' must be one of"),
    (_doc(slices=[]), "non-empty list"),
])
def test_malformed_slices_are_refused_with_the_reason(doc, message):
    with pytest.raises(MergeError, match=message):
        parse_slices(doc)


def test_a_range_beyond_the_model_and_a_bad_parameter_fail_before_any_output(tmp_path):
    s = build_arch_set(tmp_path / "m", "llama", experts=1)
    beyond = parse_slices(_paths(_doc(slices=[{"sources": [_src("e0", 1, 3)]}]), s))
    with pytest.raises(MergeError, match=r"layer_range \[1, 3\] goes beyond the 2 layers"):
        merge_slices_to_dir(beyond, tmp_path / "out")
    with pytest.raises(MergeError, match="gradient mixes"):  # its shape: when the YAML is read
        parse_slices(_paths(_doc(slices=[{"sources": [_src("e0", 0, 2, scale=[1.0, "x"])]}]), s))
    bad = parse_slices(_paths(_doc(slices=[{"sources": [_src("e0", 0, 2, scale=[{"filter": "mlp", "value": "x"},
                                                                                {"value": 1.0}])]}]), s))
    with pytest.raises(MergeError, match=r"slices\[0\], tensor 'model.layers.0.mlp.*'scale' must be a number"):
        merge_slices_to_dir(bad, tmp_path / "out")  # its values: for every tensor, before any is merged
    unknown = parse_slices(_paths(_doc(slices=[{"sources": [_src("e0", 0, 2, weight=1.0)]}]), s))
    with pytest.raises(MergeError, match=r"slices\[0\].*unknown parameter"):
        merge_slices_to_dir(unknown, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_a_yaml_without_slices_is_left_to_parse_mergekit():
    assert load_slices("merge_method: linear\nmodels: [{model: a}]\n") is None


def test_tensors_before_the_layers_are_placed_as_mergekits_architecture_definitions_place_them():
    """Every single-stack architecture mergekit 0.1.5 ships: its pre weights come before the layers (from the
    first slice), its post weights after (from the last)."""
    python, problem = side_python()
    if python is None:
        pytest.skip(problem)
    found = list(python.parent.parent.glob("lib/python*/site-packages/mergekit/_data/architectures/*.json"))
    assert found, "mergekit's architecture definitions not found in its side environment"
    checked = 0
    for path in found:
        arch = json.loads(path.read_text())
        if "pre_weights" not in arch or path.name == "phi-1.json":  # multi-module ones; phi-1 numbers them as layers
            continue
        for w in arch["pre_weights"]:
            assert is_pre_weight(w["name"]), (path.name, w["name"])
        for w in arch["post_weights"]:
            assert not is_pre_weight(w["name"]), (path.name, w["name"])
        checked += 1
    assert checked > 40


def test_a_study_cannot_search_passthrough(tiny_zoo, cache_dir, data_roots, tmp_path):
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings
    from tests.conftest import authorize, zoo_spec

    settings = Settings(home=tmp_path / "home", cache_dir=cache_dir, database_url=f"sqlite:///{tmp_path / 'db'}",
                        data_roots=data_roots)
    spec = zoo_spec(tiny_zoo, method="passthrough")
    with TestClient(create_app(settings)) as api:
        authorize(api)
        response = api.post("/api/v1/studies", json=spec)
    assert response.status_code == 422, response.text
    (problem,) = [p for p in response.json()["detail"] if p["loc"][-1] == "method"]
    assert "passthrough/slices change the architecture; a study cannot search them" in problem["msg"]
