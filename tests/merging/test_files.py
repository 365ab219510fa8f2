"""The streaming file path: same tensors as the resident path, loadable output, clean failures."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from merging.config import ExpertRef, MergeConfig
from merging.errors import MergeError
from merging.files import merge_to_dir
from merging.io import load_state_dict
from merging.mergekit_yaml import parse_mergekit, to_mergekit
from merging.resident import Merger

EXPERTS = ("add", "reverse", "sort")


def _config(tiny_zoo, method: str, **params) -> MergeConfig:
    per_expert = {"obim": {"density": 0.4, "weight": 1.0}, "ties": {"density": 0.5, "weight": 0.8},
                  "dare_ties": {"density": 0.6, "weight": 0.7}, "task_arithmetic": {"weight": 0.6}}[method]
    return MergeConfig(method=method, base=str(tiny_zoo.base), params=params, seed=5,
                       experts=tuple(ExpertRef(e, str(tiny_zoo.experts[e]), per_expert) for e in EXPERTS))


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties", "obim"])
def test_streamed_equals_resident(tiny_zoo, tmp_path, method):
    config = _config(tiny_zoo, method)
    out = merge_to_dir(config, tmp_path / "out")
    streamed = load_state_dict(out)
    merger = Merger.from_checkpoints(str(tiny_zoo.base), {e: str(tiny_zoo.experts[e]) for e in EXPERTS})
    resident = dict(merger.merged_tensors(config))
    assert sorted(streamed) == sorted(resident)
    for name, tensor in resident.items():
        assert torch.equal(streamed[name], tensor), name


def test_output_is_a_loadable_sharded_model_with_card_and_tokenizer(tiny_zoo, tmp_path):
    out = merge_to_dir(_config(tiny_zoo, "ties"), tmp_path / "out", max_shard_bytes=10_000, dtype="bfloat16")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert (out / "tokenizer.json").exists() and (out / "config.json").exists()
    card = (out / "README.md").read_text()
    assert "merge_method: ties" in card
    model = AutoModelForCausalLM.from_pretrained(out)
    assert next(model.parameters()).dtype == torch.bfloat16


def _copy_with(tiny_zoo, tmp_path, name: str, edit) -> str:
    dst = tmp_path / name
    shutil.copytree(tiny_zoo.experts["add"], dst)
    state = load_file(str(dst / "model.safetensors"))
    edit(state)
    save_file({k: v.contiguous() for k, v in state.items()}, str(dst / "model.safetensors"))
    return str(dst)


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda s: s.update({"lm_head.weight": torch.zeros(3, 3)}), r"tensor 'lm_head.weight' has shape"),
        (lambda s: s.pop("model.norm.weight"), r"missing \['model.norm.weight'\]"),
        (lambda s: s.update({k: torch.randn_like(v) for k, v in s.items()}), "does not look fine-tuned"),
    ],
)
def test_bad_inputs_fail_before_any_output(tiny_zoo, tmp_path, edit, match):
    bad = _copy_with(tiny_zoo, tmp_path, "bad", edit)
    config = MergeConfig(method="ties", base=str(tiny_zoo.base),
                         experts=(ExpertRef("good", str(tiny_zoo.experts["sort"]), {"weight": 1.0}),
                                  ExpertRef("bad", bad, {"weight": 1.0})))
    with pytest.raises(MergeError, match=match) as info:
        merge_to_dir(config, tmp_path / "out")
    assert "'bad'" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_density_out_of_range_is_refused(tiny_zoo, tmp_path):
    config = _config(tiny_zoo, "ties")
    bad = MergeConfig(method="ties", base=config.base,
                      experts=tuple(ExpertRef(e.name, e.path, {"weight": 1.0, "density": 1.5}) for e in config.experts))
    with pytest.raises(MergeError, match="density"):
        merge_to_dir(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_failure_mid_stream_leaves_nothing_behind(tiny_zoo, tmp_path):
    def explode(name, done, total):
        if done == 3:
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        merge_to_dir(_config(tiny_zoo, "ties"), tmp_path / "out", progress=explode)
    assert list(tmp_path.iterdir()) == []


def test_mergekit_yaml_round_trip_and_cli(tiny_zoo, tmp_path):
    config = _config(tiny_zoo, "ties", normalize=False)
    text = to_mergekit(config, "float32")
    plan = parse_mergekit(text)
    # what is written is mergekit's out_dtype; its `dtype`, what the inputs are read in, is the config's own
    assert plan.config.method == "ties" and plan.config.dtype is None and plan.dtype == "float32"
    held = parse_mergekit(to_mergekit(replace(config, dtype="bfloat16")))
    assert held.config.dtype == "bfloat16" and held.dtype is None
    assert [e.params for e in plan.config.experts] == [e.params for e in config.experts]
    assert plan.config.params == {"normalize": False}
    path = tmp_path / "merge.yaml"
    path.write_text(text)
    env = {**os.environ, "MMMO_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-m", "service.cli", "merge", str(path), str(tmp_path / "out")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out") is not None
    again = subprocess.run([sys.executable, "-m", "service.cli", "merge", str(path), str(tmp_path / "out")],
                           capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 1 and "not empty" in again.stderr


def test_obim_cli_with_calibration(tiny_zoo, tmp_path):
    from evals.synthetic import DATA_DIR

    doc = {"merge_method": "obim", "base_model": str(tiny_zoo.base),
           "models": [{"model": str(tiny_zoo.experts[e]), "parameters": {"density": 0.5},
                       "calibration": str(DATA_DIR / e / "train.jsonl")} for e in EXPERTS[:2]]}
    import yaml

    path = tmp_path / "obim.yaml"
    path.write_text(yaml.safe_dump(doc))
    env = {**os.environ, "MMMO_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-m", "service.cli", "merge", str(path), str(tmp_path / "out")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "cache" / "saliency").glob("*.safetensors"))) == 2


def test_ties_on_the_zoo_equals_the_mergekit_formulas(tiny_zoo):
    from tests.merging.test_methods import _ref_gta, _ref_magnitude

    config = _config(tiny_zoo, "ties", normalize=True, **{"lambda": 1.2})
    names = [e.name for e in config.experts]
    merger = Merger.from_checkpoints(str(tiny_zoo.base), {e: str(tiny_zoo.experts[e]) for e in names})
    p = config.experts[0].params
    for tensor, merged in merger.merged_tensors(config):
        trimmed = [_ref_magnitude(d, p["density"]) for d in merger.deltas_of(tensor)]
        ref = _ref_gta(merger.base[tensor], trimmed, [p["weight"]] * len(names), consensus=True, normalize=True,
                       lam=1.2)
        torch.testing.assert_close(merged, ref, rtol=1e-6, atol=1e-6, msg=tensor)


def test_obim_calibration_from_an_lm_eval_task(tiny_zoo, tmp_path):
    from evals.texts import calibration_texts
    from evals.tiny_zoo import TINY_INTERMEDIATE
    from merging.saliency import stats_for

    texts = calibration_texts("task:mmmo_add", limit=16)
    assert len(texts) == 16 and all("+" in t and "=" in t for t in texts)
    experts = (ExpertRef("add", str(tiny_zoo.experts["add"]), {}, calibration="task:mmmo_add"),)
    config = MergeConfig(method="obim", base=str(tiny_zoo.base), experts=experts)
    stats = stats_for(config, tmp_path, texts_of=calibration_texts)
    assert stats["obd/own"]["add"]["model.layers.0.mlp.down_proj.weight"].shape == (TINY_INTERMEDIATE,)
    with pytest.raises(ValueError, match="unknown"):
        calibration_texts("task:no_such_task")
