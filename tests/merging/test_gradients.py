"""Per-layer parameter gradients and filters, as mergekit reads them (``config.evaluate_setting`` and
its planner): a value, a list interpolated over the layers, or ``{filter, value}`` entries, the first
whose filter is in the tensor's name winning; per model and global; in YAML, in merges, and in the
export of searched layer groups and filters."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from merging.config import ExpertRef, Grouping, MergeConfig, Setting, interpolate, layer_position
from merging.errors import MergeError
from merging.files import merge_to_dir
from merging.io import CheckpointReader
from merging.mergekit_yaml import parse_mergekit, per_layer, to_mergekit
from merging.methods.base import MergeMethod
from merging.plan import MergePlan

LAYERS = 23  # layer 15 sits at 14.999999999999998 in mergekit's arithmetic: the export must not care
ATTN = "model.layers.{}.self_attn.q_proj.weight"
MLP = "model.layers.{}.mlp.up_proj.weight"
NORM = "model.layers.{}.input_layernorm.weight"
OUTSIDE = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")


def _by_hand(values: list[float], i: int | None, n: int) -> float:
    """mergekit's formula, restated: layer i of n at t = i / (n - 1) (1 for a single layer, 0 outside
    the layers), then linear between the two list entries around t * (len - 1)."""
    t = 0.0 if i is None else (i / (n - 1) if n > 1 else 1.0)
    scaled = t * (len(values) - 1)
    lo = int(scaled)
    hi = min(lo + 1, len(values) - 1)
    return (1 - (scaled - lo)) * values[lo] + (scaled - lo) * values[hi]


# ---- settings ----

def test_the_three_forms_parse_and_write_back():
    assert Setting.parse(0.5, "weight", "parameters").raw() == 0.5
    assert Setting.parse([0.2, 0.9], "weight", "parameters").raw() == [0.2, 0.9]
    assert Setting.parse({"filter": "mlp", "value": 0.3}, "weight", "parameters").raw() == [
        {"filter": "mlp", "value": 0.3}]
    entries = [{"filter": "self_attn", "value": [0.2, 0.9]}, {"value": 0.6}]
    assert Setting.parse(entries, "weight", "parameters").raw() == entries
    assert Setting.parse([{"value": 0.6}], "weight", "parameters").raw() == 0.6


@pytest.mark.parametrize("n", [1, 2, 5, 23, 80])
def test_a_gradient_is_interpolated_over_the_layers_as_mergekit_does(n):
    for values in ([0.2, 0.9], [0.0, 1.0, 0.5], [0.1, 0.4, 0.3, 0.8, 0.2, 0.6]):
        setting = Setting.parse(values, "weight", "parameters")
        for i in range(n):
            assert setting.at(ATTN.format(i), layer_position(ATTN.format(i), n)) == _by_hand(values, i, n)
        for name in OUTSIDE:  # planned at t = 0: the first value
            assert setting.at(name, layer_position(name, n)) == values[0]
    # by hand: 5 layers, [0, 1, 0.5]: layer 1 at 0.5 (halfway to 1), layer 3 at 1.5 (0.75); one layer: the last
    three = Setting.parse([0.0, 1.0, 0.5], "weight", "parameters")
    assert [three.at(ATTN.format(i), i / 4) for i in range(5)] == [0.0, 0.5, 1.0, 0.75, 0.5]
    assert three.at(ATTN.format(0), layer_position(ATTN.format(0), 1)) == 0.5
    # booleans and strings are picked, not blended
    assert interpolate((True, False), 0.4) is True and interpolate(("a", "b", "c"), 0.99) == "b"


def test_the_first_matching_filter_wins_and_an_entry_without_one_is_the_default():
    setting = Setting.parse([{"filter": "self_attn", "value": [0.2, 0.9]}, {"filter": "mlp", "value": 0.3},
                             {"value": 0.6}], "weight", "parameters")
    n = 5
    assert [setting.at(ATTN.format(i), layer_position(ATTN.format(i), n)) for i in range(n)] == [
        _by_hand([0.2, 0.9], i, n) for i in range(n)]
    assert setting.at(MLP.format(3), 0.75) == 0.3
    assert setting.at(NORM.format(3), 0.75) == 0.6 and setting.at("lm_head.weight", 0.0) == 0.6
    only = Setting.parse([{"filter": "mlp", "value": 0.3}], "weight", "parameters")
    assert only.at(ATTN.format(0), 0.0) is None  # nothing matches: the next scope decides
    assert Setting.parse([{"filter": "*", "value": 0.1}], "w", "p").at("x", 0.0) == 0.1


@pytest.mark.parametrize("raw,match", [
    ([{"filter": "mlp"}], r"model 'a': 'weight': entry 0 \(\{'filter': 'mlp'\}\) has no 'value'"),
    ([], r"model 'a': 'weight' is an empty list"),
    ([{"filter": "mlp", "value": []}], r"model 'a': 'weight': entry 0's value is an empty list"),
    ([0.1, "x"], r"model 'a': 'weight': a gradient mixes number and str values"),
    ([0.1, [0.2]], r"model 'a': 'weight': a gradient holds numbers, got \[0.2\]"),
    ([{"filter": "mlp", "value": [{"value": 1}]}], r"entry 0's value mixes filter entries"),
    ([{"filter": "mlp", "value": 1, "weight": 2}], r"entry 0 has unknown key\(s\) \['weight'\]"),
    ([{"filter": 3, "value": 1}], r"entry 0's filter must be a string"),
    ([{"value": 1}, 0.5], r"mixes filter entries with other values"),
    (None, r"model 'a': 'weight' has no value"),
])
def test_malformed_settings_are_one_line_errors_naming_the_parameter(raw, match):
    config = MergeConfig(method="ties", base="/nowhere", experts=(ExpertRef("a", "/a", {"weight": raw}),))
    with pytest.raises(MergeError, match=match) as info:
        MergePlan(config, num_layers=4)
    assert "\n" not in str(info.value)


def test_malformed_settings_in_yaml_are_refused_when_parsed():
    text = ("merge_method: ties\nbase_model: /b\nmodels:\n  - model: /m\n    parameters:\n"
            "      weight: [{filter: mlp}, {value: 1}]\nparameters: {density: []}\n")
    with pytest.raises(MergeError, match=r"^model '/m': 'weight': entry 0 \(\{'filter': 'mlp'\}\) has no 'value'$"):
        parse_mergekit(text)
    with pytest.raises(MergeError, match=r"^parameters: 'density' is an empty list$"):
        parse_mergekit(text.replace("{filter: mlp}", "{filter: mlp, value: 0.5}"))


def test_gradients_and_filters_round_trip_through_yaml():
    text = GRADIENT_YAML.format(base="/b", e0="/e0", e1="/e1")
    config = parse_mergekit(text).config
    assert config.experts[0].params["weight"][0] == {"filter": "self_attn", "value": [0.2, 0.9, 0.4]}
    assert config.params == {"weight": [0.7, 0.1], "density": [{"filter": "mlp", "value": 0.5}]}
    again = parse_mergekit(to_mergekit(config)).config
    assert again == config
    assert "value: [0.2, 0.9, 0.4]" in to_mergekit(config)  # lists of numbers in flow style, as mergekit writes


@pytest.mark.parametrize("params,match", [
    ({"weight": ["a", "b"]}, r"model 'a': 'weight' must be a number, got 'a'"),
    ({"weight": 1.0, "density": [0.5, 1.5]}, r"model 'a': 'density' = 1.16+7 is above 1.0 \(a value its gradient"),
    ({"weight": [{"filter": "mlp", "value": [0.5, True]}, {"value": 1}]}, r"a gradient mixes bool and number"),
])
def test_bad_values_anywhere_fail_before_any_tensor(params, match):
    config = MergeConfig(method="ties", base="/nowhere", experts=(ExpertRef("a", "/a", params),))
    with pytest.raises(MergeError, match=match):
        MergePlan(config, num_layers=4)


def test_a_value_bad_in_one_layer_only_fails_up_front():
    # density 1.2 only in the mlp of the last of 9 layers
    config = MergeConfig(method="ties", base="/nowhere", experts=(
        ExpertRef("a", "/a", {"weight": 1.0, "density": [{"filter": "mlp", "value": [0.5] * 8 + [1.2]},
                                                         {"value": 0.5}]}),))
    with pytest.raises(MergeError, match=r"'density' = 1.2 is above 1.0"):
        MergePlan(config, num_layers=9)
    with pytest.raises(MergeError, match=r"'density' = 1.2 is above 1.0"):
        MergePlan(config, num_layers=9, names=[MLP.format(8)])
    MergePlan(config, num_layers=9, names=[MLP.format(7), ATTN.format(8)])  # no tensor of these gets it
    ok = MergeConfig(method="ties", base="/nowhere", experts=(
        ExpertRef("a", "/a", {"weight": 1.0, "density": [{"filter": "mlp", "value": [0.5] * 8 + [1.0]},
                                                         {"value": 0.5}]}),))
    assert MergePlan(ok, num_layers=9).params_for(MLP.format(8))[0][0]["density"] == 1.0


def test_a_gradient_needs_the_layer_count():
    config = MergeConfig(method="ties", base="/nowhere/base", experts=(ExpertRef("a", "/a", {"weight": [0, 1]}),))
    with pytest.raises(MergeError, match=r"needs the base's layer count.*'/nowhere/base'"):
        MergePlan(config)
    with pytest.raises(MergeError, match=r"is in layer 7, but the model has 4 layers"):
        MergePlan(config, num_layers=4).params_for(ATTN.format(7))


def test_per_model_settings_fall_back_to_the_global_ones_per_tensor():
    """mergekit's scopes, per tensor: the model's setting, else the global ``parameters``, else the default."""
    n = 5
    config = MergeConfig(method="ties", base="/nowhere", params={
        "weight": [{"filter": "mlp", "value": [0.1, 0.5]}, {"value": 0.7}],
        "density": [0.2, 0.6], "normalize": [{"filter": "lm_head", "value": False}, {"value": True}]},
        experts=(ExpertRef("a", "/a", {"weight": [{"filter": "self_attn", "value": [1.0, 2.0]}]}),
                 ExpertRef("b", "/b", {"density": 0.9})))
    plan = MergePlan(config, num_layers=n)
    for i in range(n):
        (a, b), shared = plan.params_for(ATTN.format(i))
        assert a == {"weight": _by_hand([1.0, 2.0], i, n), "density": _by_hand([0.2, 0.6], i, n)}
        assert b == {"weight": 0.7, "density": 0.9} and shared["normalize"] is True
        (a, b), _ = plan.params_for(MLP.format(i))
        assert a["weight"] == b["weight"] == _by_hand([0.1, 0.5], i, n)
    (a, b), shared = plan.params_for("lm_head.weight")
    assert a == {"weight": 0.7, "density": 0.2} and shared["normalize"] is False


def test_a_required_parameter_no_entry_gives_fails_with_the_tensor():
    config = MergeConfig(method="ties", base="/nowhere",
                         experts=(ExpertRef("a", "/a", {"weight": [{"filter": "mlp", "value": 1.0}]}),))
    with pytest.raises(MergeError, match=r"tensor 'lm_head.weight': model 'a': parameter 'weight' is required"):
        MergePlan(config, names=[MLP.format(0), "lm_head.weight"])  # with the names: before any tensor
    plan = MergePlan(config)
    assert plan.params_for(MLP.format(0))[0][0]["weight"] == 1.0
    with pytest.raises(MergeError, match=r"tensor 'lm_head.weight'"):
        plan.params_for("lm_head.weight")


def test_resolved_once_per_distinct_value_not_per_tensor(monkeypatch):
    calls = []
    original = MergeMethod.resolve

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MergeMethod, "resolve", counting)
    n = 70
    names = [f"model.layers.{i}.{m}.weight" for i in range(n)
             for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                       "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm")] + list(OUTSIDE)
    config = MergeConfig(method="ties", base="/nowhere",
                         experts=(ExpertRef("a", "/a", {"weight": [{"filter": "self_attn", "value": [0.2, 0.9]},
                                                                   {"value": 0.6}], "density": 0.5}),))
    plan = MergePlan(config, names=names, num_layers=n)
    assert len(calls) <= n + 1  # one per layer of the gradient, and the default
    for name in names:
        plan.params_for(name)
    assert len(calls) <= n + 1


# ---- merges ----

def _tiny_llama(root: Path, layers: int, experts: int = 2) -> tuple[Path, list[Path]]:
    """A base and experts (the base plus seeded noise) of a tiny Llama with ``layers`` layers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                      tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    model = LlamaForCausalLM(cfg)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    dirs = []
    for i in range(experts + 1):
        out = root / ("base" if i == 0 else f"expert-{i}")
        out.mkdir(parents=True)
        cfg.save_pretrained(out)
        gen = torch.Generator().manual_seed(100 + i)
        tensors = state if i == 0 else {k: (v + 0.05 * v.std().clamp_min(0.1) * torch.randn(v.shape, generator=gen))
                                        .contiguous() for k, v in state.items()}
        save_file(tensors, str(out / "model.safetensors"))
        dirs.append(out)
    return dirs[0], dirs[1:]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _tiny_llama(tmp_path_factory.mktemp("gradients"), LAYERS)


def test_a_yaml_with_gradients_merges_with_different_weights_per_layer(llama, tmp_path):
    base, (expert, _) = llama
    text = (f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {expert}\n"
            "    parameters:\n      weight:\n        - {filter: self_attn, value: [0.2, 0.9]}\n"
            "        - {value: 0.6}\ndtype: float32\n")
    out = CheckpointReader(merge_to_dir(parse_mergekit(text).config, tmp_path / "out"))
    b, e = CheckpointReader(base), CheckpointReader(expert)
    for i in range(LAYERS):
        for name, w in ((ATTN.format(i), _by_hand([0.2, 0.9], i, LAYERS)), (MLP.format(i), 0.6)):
            expected = b.get(name) + torch.tensor(w, dtype=torch.float32) * (e.get(name) - b.get(name))
            torch.testing.assert_close(out.get(name), expected, rtol=1e-6, atol=1e-7, msg=name)
    first, last = (out.get(ATTN.format(i)) - b.get(ATTN.format(i)) for i in (0, LAYERS - 1))
    ratio = [float((out.get(ATTN.format(i)) - b.get(ATTN.format(i))).norm()
                   / (e.get(ATTN.format(i)) - b.get(ATTN.format(i))).norm()) for i in (0, LAYERS - 1)]
    assert ratio == pytest.approx([0.2, 0.9], rel=1e-5) and not torch.equal(first, last)


def test_per_layer_lists_hit_every_layer_exactly():
    for n in range(1, 130):
        for group in (1, 2, 3, 4, 5, 8):
            values = [round(0.1 + 0.05 * (i // group) % 1.3, 3) for i in range(n)]
            listed = per_layer(values)
            if isinstance(listed, list):
                got = [Setting.parse(listed, "w", "p").at(ATTN.format(i), layer_position(ATTN.format(i), n))
                       for i in range(n)]
                assert got == values, (n, group)
    assert len(per_layer([0.1] * 8 + [0.2] * 8)) == 16  # 16 layers: every position is exact
    assert len(per_layer([0.1] * 15 + [0.2] * 8)) == 3 * 22 + 1  # 23: layer 15 needs the three-fold list


def _grouped_config(base: Path, experts: list[Path], grouping: Grouping, seed: int = 0) -> MergeConfig:
    gen = torch.Generator().manual_seed(seed)

    def draw(low: float, high: float) -> float:
        return round(low + (high - low) * float(torch.rand((), generator=gen)), 4)

    refs = tuple(ExpertRef(f"e{i}", str(p), {"weight": 1.0, "density": 0.7},
                           group_params={g: {"weight": draw(0.1, 1.5), "density": draw(0.3, 1.0)}
                                         for g in grouping.groups()}) for i, p in enumerate(experts))
    return MergeConfig(method="ties", base=str(base), experts=refs, params={"normalize": True}, grouping=grouping)


@pytest.mark.parametrize("grouping", [
    Grouping(layer_groups=5, num_layers=LAYERS, filters=("self_attn", "mlp")),
    Grouping(layer_groups=1, num_layers=LAYERS),
    Grouping(filters=("self_attn",)),
    Grouping(layer_groups=4, num_layers=LAYERS, filters=("norm", "mlp")),  # model.norm.weight contains a filter
], ids=["groups-of-5+filters", "per-layer", "filters-only", "norm-filter"])
def test_an_exported_layer_group_trial_merges_to_the_same_tensors(llama, tmp_path, grouping):
    base, experts = llama
    config = _grouped_config(base, experts, grouping)
    text = to_mergekit(config, "float32")
    doc = yaml.safe_load(text)
    weight = doc["models"][0]["parameters"]["weight"]
    assert isinstance(weight, list) and all(isinstance(e, dict) and "value" in e for e in weight)
    if grouping.filters:
        assert [e.get("filter") for e in weight if e.get("filter") in grouping.filters] == list(grouping.filters)
    if grouping.layered:
        assert any(isinstance(e["value"], list) for e in weight)
    if "norm" in grouping.filters:
        assert weight[0] == {"filter": "model.norm.weight", "value": config.experts[0].group_params["rest/norm"]
                             ["weight"]}
    again = parse_mergekit(text).config
    assert again.grouping is None
    ours, theirs = (CheckpointReader(merge_to_dir(c, tmp_path / d)) for c, d in ((config, "grouped"), (again, "yaml")))
    assert sorted(ours.keys()) == sorted(theirs.keys())
    for name in ours.keys():
        assert torch.equal(ours.get(name), theirs.get(name)), name
    plan, replan = MergePlan(config), MergePlan(again, num_layers=LAYERS)
    for name in ours.keys():
        assert plan.params_for(name) == replan.params_for(name), name


def test_an_export_that_needs_the_bases_tensor_names_says_so(llama):
    base, experts = llama
    grouping = Grouping(layer_groups=4, num_layers=LAYERS, filters=("norm",))
    config = _grouped_config(base, experts, grouping)
    moved = dataclasses.replace(config, base="/nowhere/base")
    with pytest.raises(MergeError, match=r"needs the tensor names of the base '/nowhere/base'"):
        to_mergekit(moved)
    names = CheckpointReader(base).keys()
    assert to_mergekit(moved, tensor_names=names) == to_mergekit(config).replace(str(base), "/nowhere/base")
    # layer groups alone, or filters alone, need no names: the entries give every tensor its group's value
    for alone in (Grouping(layer_groups=4, num_layers=LAYERS), Grouping(filters=("norm",))):
        to_mergekit(MergeConfig(method="ties", base="/nowhere/base", grouping=alone,
                                experts=_grouped_config(base, experts, alone).experts))
    plain = Grouping(layer_groups=4, num_layers=LAYERS, filters=("self_attn",))
    partial = MergeConfig(method="ties", base=str(base), grouping=plain, experts=(
        ExpertRef("e", str(experts[0]), {}, group_params={"L0-3/self_attn": {"weight": 1.0}}),))
    with pytest.raises(MergeError, match=r"'weight' is set for some layer groups"):
        to_mergekit(partial)


# ---- against mergekit itself ----

SIDE = r'''
import json, sys
import yaml
from pydantic import TypeAdapter
from mergekit.config import MergeConfiguration, evaluate_setting
from mergekit.merge import run_merge
from mergekit.options import MergeOptions

jobs = json.load(open(sys.argv[1]))
validate = TypeAdapter(float).validate_python
values = []
for case in jobs["settings"]:
    doc = {"merge_method": "linear", "models": [{"model": "x", "parameters": {"p": case["setting"]}}]}
    setting = MergeConfiguration.model_validate(doc).models[0].parameters["p"]
    values.append(evaluate_setting(case["tensor"], setting, case["t"], validate=validate))
for merge in jobs["merges"]:
    config = MergeConfiguration.model_validate(yaml.safe_load(open(merge["config"])))
    run_merge(config, merge["out"], options=MergeOptions(device="cpu", copy_tokenizer=False, write_model_card=False,
                                                         quiet=True, lazy_unpickle=False))
json.dump({"settings": values}, open(sys.argv[2], "w"))
'''

SETTINGS = [
    [0.2, 0.9], [0.0, 1.0, 0.5], [0.1, 0.4, 0.3, 0.8, 0.2, 0.6], [1, 0, 2],
    [{"filter": "self_attn", "value": [0.2, 0.9]}, {"value": 0.6}],
    [{"filter": "mlp", "value": [0.3, 0.3, 0.7]}, {"filter": "self_attn", "value": 0.1}, {"value": [0.5, 0.25]}],
    {"filter": "norm", "value": [0.9, 0.1]},
]
GRADIENT_YAML = """merge_method: ties
base_model: {base}
models:
  - model: {e0}
    parameters:
      weight:
        - {{filter: self_attn, value: [0.2, 0.9, 0.4]}}
        - {{filter: mlp, value: [1.0, 0.3]}}
        - {{value: 0.6}}
      density: [0.9, 0.4]
  - model: {e1}
    parameters:
      weight: [{{filter: norm, value: 0.2}}]
parameters:
  weight: [0.7, 0.1]
  density: {{filter: mlp, value: 0.5}}
dtype: float32
"""


def _mergekit_python() -> Path:
    venv = Path(os.environ.get("MMMO_MERGEKIT_VENV", Path.home() / ".cache/mmmo/mergekit-venv"))
    exe = venv / "bin" / "python"
    if not (exe.exists() and list(venv.glob("lib/python*/site-packages/mergekit/config.py"))):
        if os.environ.get("MMMO_REQUIRE_MERGEKIT") == "1":
            pytest.fail(f"mergekit 0.1.5 side environment not found at {venv}")
        pytest.skip(f"mergekit 0.1.5 side environment not found at {venv}; run `make mergekit`")
    return exe


@pytest.fixture(scope="module")
def mergekit_run(llama, tmp_path_factory):
    """One run of mergekit's own python (it takes seconds to import): its evaluate_setting on
    SETTINGS for some tensors and layer counts, and mergekit-yaml on a YAML with gradients and on
    an exported layer-group trial."""
    exe = _mergekit_python()
    root = tmp_path_factory.mktemp("mergekit")
    base, experts = llama
    cases = [{"setting": s, "tensor": name, "t": layer_position(name, n), "n": n}
             for s in SETTINGS for n in (1, 2, 5, 23, 80)
             for name in [*(f.format(i) for f in (ATTN, MLP, NORM) for i in {0, 1, n // 2, n - 1} if i < n), *OUTSIDE]]
    (root / "gradients.yml").write_text(GRADIENT_YAML.format(base=base, e0=experts[0], e1=experts[1]))
    grouped = _grouped_config(base, experts, Grouping(layer_groups=5, num_layers=LAYERS,
                                                      filters=("self_attn", "mlp")), seed=3)
    (root / "exported.yml").write_text(to_mergekit(grouped, "float32"))
    merges = [{"config": str(root / f"{k}.yml"), "out": str(root / k)} for k in ("gradients", "exported")]
    (root / "jobs.json").write_text(json.dumps({"settings": cases, "merges": merges}))
    run = subprocess.run([str(exe), "-c", SIDE, str(root / "jobs.json"), str(root / "results.json")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return {"cases": cases, "values": json.loads((root / "results.json").read_text())["settings"], "root": root,
            "grouped": grouped}


def test_settings_evaluate_to_mergekits_numbers(mergekit_run):
    for case, theirs in zip(mergekit_run["cases"], mergekit_run["values"], strict=True):
        ours = Setting.parse(case["setting"], "p", "parameters").at(case["tensor"], case["t"])
        assert ours == theirs, case  # float for float


def test_a_yaml_with_gradients_gives_mergekits_tensors(mergekit_run, llama, tmp_path):
    base, experts = llama
    config = parse_mergekit(GRADIENT_YAML.format(base=base, e0=experts[0], e1=experts[1])).config
    ours = CheckpointReader(merge_to_dir(config, tmp_path / "ours"))
    theirs = CheckpointReader(mergekit_run["root"] / "gradients")
    assert sorted(ours.keys()) == sorted(theirs.keys())
    for name in ours.keys():  # every layer, and the embeddings, final norm and lm_head (planned at t = 0)
        torch.testing.assert_close(ours.get(name), theirs.get(name), rtol=1e-6, atol=1e-7, msg=name)


def test_an_exported_layer_group_trial_gives_mergekits_tensors(mergekit_run, tmp_path):
    ours = CheckpointReader(merge_to_dir(mergekit_run["grouped"], tmp_path / "ours"))
    theirs = CheckpointReader(mergekit_run["root"] / "exported")
    assert sorted(ours.keys()) == sorted(theirs.keys())
    for name in ours.keys():
        torch.testing.assert_close(ours.get(name), theirs.get(name), rtol=1e-6, atol=1e-7, msg=name)
