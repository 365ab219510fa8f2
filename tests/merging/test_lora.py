"""LoRA experts: a PEFT adapter is the model PEFT's merge_and_unload makes, in both merge paths,
without a merged copy on disk; the resident path keeps only the factors."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from evals.objective import Objective
from merging.config import ExpertRef, MergeConfig
from merging.errors import MergeError
from merging.files import merge_to_dir
from merging.io import CheckpointReader, LoraReader, open_reference
from merging.mergekit_yaml import parse_mergekit
from merging.placement import PlanKind
from merging.resident import Merger
from tests.tiny_archs import build_arch_set


def _adapter(base_dir: Path, out: Path, seed: int, **lora) -> Path:
    """A trained-looking PEFT adapter of ``base_dir``: random A and B (PEFT starts B at zero)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    options = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj"]} | lora
    peft_model = get_peft_model(model, LoraConfig(**options))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
            elif "modules_to_save" in name:
                p.add_(0.01 * torch.randn(p.shape, generator=gen))
    peft_model.save_pretrained(out)
    return out


def _peft_merged(base_dir: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    return PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()


@pytest.fixture(scope="module")
def lora_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    fp32 = build_arch_set(root / "fp32", "llama", experts=1)
    bf16 = build_arch_set(root / "bf16", "mistral_bf16_sharded", experts=1)
    return {
        "fp32": fp32, "bf16": bf16,
        "plain": _adapter(fp32.base, root / "plain", 1),
        "rslora": _adapter(fp32.base, root / "rslora", 2, use_rslora=True, alpha_pattern={"v_proj": 32},
                           rank_pattern={"up_proj": 2}, modules_to_save=["lm_head"]),
        "bf16_adapter": _adapter(bf16.base, root / "bf16-adapter", 3),
    }


@pytest.mark.parametrize("which,base", [("plain", "fp32"), ("rslora", "fp32"), ("bf16_adapter", "bf16")])
def test_an_adapter_reads_as_peft_merges_it(lora_set, which, base):
    base_dir, adapter = lora_set[base].base, lora_set[which]
    reader = open_reference(str(adapter), str(base_dir))
    assert isinstance(reader, LoraReader)
    expected = _peft_merged(base_dir, adapter)
    names = reader.keys()
    assert reader.low_ranks, "the adapter adapts something"
    for name in names:
        got = reader.get(name)
        assert got.dtype == expected[name].dtype, name
        assert torch.equal(got, expected[name]), name
    if which == "rslora":
        assert "lm_head.weight" in reader.replaced
        assert {lr.a.shape[0] for k, lr in reader.low_ranks.items() if "up_proj" in k} == {2}


def test_lora_experts_merge_alike_in_both_paths_and_every_plan(lora_set, tmp_path):
    base = lora_set["fp32"]
    full = next(iter(base.experts.values()))
    experts = (ExpertRef("plain", str(lora_set["plain"]), {"weight": 0.6, "density": 0.5}),
               ExpertRef("rs", str(lora_set["rslora"]), {"weight": 0.5, "density": 0.7}),
               ExpertRef("full", str(full), {"weight": 0.3, "density": 0.5}))
    config = MergeConfig(method="ties", base=str(base.base), experts=experts)
    written = CheckpointReader(merge_to_dir(config, tmp_path / "merged"))
    assert not list(tmp_path.glob("**/adapter_config.json")), "no merged copy, no adapter copied"
    for plan in PlanKind:
        merger = Merger(open_reference(str(base.base)), {e.name: open_reference(e.path, str(base.base))
                                                        for e in experts}, plan=plan)
        assert sorted(merger.low_rank) == [0, 1]  # the adapters keep their factors
        for name, merged in merger.merged_tensors(config):
            assert torch.equal(merged, written.get(name)), (plan, name)
    resident = Merger(open_reference(str(base.base)), {e.name: open_reference(e.path, str(base.base))
                                                      for e in experts[:2]})
    def nbytes(tensors):
        return sum(t.numel() * t.element_size() for t in tensors)

    readers = [open_reference(e.path, str(base.base)) for e in experts[:2]]
    factors = nbytes(t for r in readers for lr in r.low_ranks.values() for t in (lr.a, lr.b))
    replaced = nbytes(t for r in readers for t in r.replaced.values())
    # the base, the factors and the replaced lm_head: no expanded copy of either adapter's model
    assert resident.device_bytes == nbytes(resident.base.values()) + factors + replaced


def test_a_study_trial_with_a_lora_expert_equals_its_file_merge(lora_set, tmp_path):
    from transformers import AutoModelForCausalLM

    from service.runner import TrialRunner

    base = lora_set["bf16"]
    config = MergeConfig(method="dare_ties", base=str(base.base), seed=3,
                         experts=(ExpertRef("lora", str(lora_set["bf16_adapter"]), {"weight": 0.8, "density": 0.5}),
                                  ExpertRef("full", str(next(iter(base.experts.values()))),
                                            {"weight": 0.4, "density": 0.5})))
    runner = TrialRunner(trusted_task_paths=[])
    runner.run(config, [Objective(kind="sparsity", direction="minimize")])
    loaded = AutoModelForCausalLM.from_pretrained(merge_to_dir(config, tmp_path / "m")).state_dict()
    live = runner.last_model.state_dict()
    assert all(torch.equal(loaded[k], live[k]) for k in loaded)


def test_mergekits_model_plus_adapter_form(lora_set, tmp_path):
    base, adapter = lora_set["fp32"].base, lora_set["plain"]
    yaml_text = (f"merge_method: task_arithmetic\nbase_model: {base}\n"
                 f"models:\n  - model: {base}+{adapter}\n    parameters: {{weight: 0.7}}\n")
    via_plus = CheckpointReader(merge_to_dir(parse_mergekit(yaml_text).config, tmp_path / "plus"))
    config = MergeConfig(method="task_arithmetic", base=str(base),
                         experts=(ExpertRef("a", str(adapter), {"weight": 0.7}),))
    via_dir = CheckpointReader(merge_to_dir(config, tmp_path / "dir"))
    assert all(torch.equal(via_plus.get(n), via_dir.get(n)) for n in via_dir.keys())


def test_the_same_yaml_gives_mergekits_tensors(lora_set, tmp_path):
    """`model+lora` in mergekit 0.1.5 itself (it merges the adapter with PEFT first)."""
    venv = Path(os.environ.get("MMMO_MERGEKIT_VENV", Path.home() / ".cache/mmmo/mergekit-venv"))
    exe = venv / "bin" / "mergekit-yaml"
    if not exe.exists():
        if os.environ.get("MMMO_REQUIRE_MERGEKIT") == "1":
            pytest.fail(f"mergekit 0.1.5 side environment not found at {venv}")
        pytest.skip(f"mergekit 0.1.5 side environment not found at {venv}; run `make mergekit`")
    base, adapter = lora_set["fp32"].base, lora_set["rslora"]
    full = next(iter(lora_set["fp32"].experts.values()))
    yaml_text = (f"merge_method: ties\nbase_model: {base}\nmodels:\n"
                 f"  - model: {base}+{adapter}\n    parameters: {{weight: 0.6, density: 0.5}}\n"
                 f"  - model: {full}\n    parameters: {{weight: 0.4, density: 0.5}}\ndtype: float32\n")
    (tmp_path / "merge.yml").write_text(yaml_text)
    subprocess.run([str(exe), str(tmp_path / "merge.yml"), str(tmp_path / "mergekit"), "--lora-merge-cache",
                    str(tmp_path / "lora-cache")], check=True, capture_output=True)
    theirs = CheckpointReader(tmp_path / "mergekit")
    ours = CheckpointReader(merge_to_dir(parse_mergekit(yaml_text).config, tmp_path / "ours"))
    assert sorted(ours.keys()) == sorted(theirs.keys())
    for name in ours.keys():
        torch.testing.assert_close(ours.get(name), theirs.get(name), rtol=1e-6, atol=1e-7, msg=name)


def test_bad_adapters_are_refused_with_the_reason(lora_set, tmp_path):
    import shutil

    dora = tmp_path / "dora"
    shutil.copytree(lora_set["plain"], dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps(config | {"use_dora": True}))
    with pytest.raises(MergeError, match="DoRA adapters are not supported"):
        open_reference(str(dora), str(lora_set["fp32"].base))
    with pytest.raises(MergeError, match=r"it adapts 'model\.layers\.0\..*is it an adapter of this base"):
        LoraReader(_Renamed(CheckpointReader(lora_set["fp32"].base)), lora_set["plain"])
    with pytest.raises(MergeError, match="is a LoRA adapter: it needs a base model"):
        open_reference(str(lora_set["plain"]))


class _Renamed:
    """A reader whose tensor names an adapter of the real base does not know."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def keys(self):
        return [f"other.{k}" for k in self.inner.keys()]

    def shape(self, name):
        return self.inner.shape(name.removeprefix("other."))


def test_obim_calibrates_a_lora_expert_as_its_merged_model(lora_set, tmp_path):
    from transformers import AutoModelForCausalLM

    from merging.saliency import calibration_stats
    from service.materialize import obim_stats
    from service.runner import TrialRunner

    base = lora_set["fp32"].base
    data = tmp_path / "calibration.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("1+1=2", "abc", "sort 3 1 2")))
    config = MergeConfig(method="obim", base=str(base), experts=(
        ExpertRef("lora", str(lora_set["plain"]), {"weight": 1.0, "density": 0.5}, calibration=str(data)),
        ExpertRef("full", str(next(iter(lora_set["fp32"].experts.values()))), {"weight": 0.5, "density": 0.5})))
    stats = obim_stats(config, tmp_path / "cache", "cpu")
    # the same statistics as the adapter merged into its base by PEFT and saved as a model
    merged_dir = tmp_path / "peft-merged"
    from peft import PeftModel

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), lora_set["plain"]) \
        .merge_and_unload().save_pretrained(merged_dir)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(base).save_pretrained(merged_dir)
    reference = calibration_stats(merged_dir, ["1+1=2", "abc", "sort 3 1 2"], None)
    assert sorted(stats["obd/own"]["lora"]) == sorted(reference)
    assert all(torch.equal(stats["obd/own"]["lora"][k], reference[k]) for k in reference)
    runner = TrialRunner(trusted_task_paths=[], cache_dir=tmp_path / "cache")
    runner.run(config, [Objective(kind="sparsity", direction="minimize")])
    loaded = AutoModelForCausalLM.from_pretrained(merge_to_dir(config, tmp_path / "m", stats=stats)).state_dict()
    live = runner.last_model.state_dict()
    assert all(torch.equal(loaded[k], live[k]) for k in loaded)
