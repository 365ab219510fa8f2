"""A study trial's live model equals ``mmmo merge`` of the same config, on eight architectures.

The trial path (``TrialRunner`` -> ``Merger.apply``) merges into a model transformers has loaded, whose
parameter names and layout can differ from the checkpoint's (GPT-NeoX's output head, Mixtral's and
Qwen2-MoE's fused experts); the file path (``merge_to_dir``) merges checkpoint tensors. Both must give
the same model, tensor for tensor and bit for bit, in the checkpoint's dtype, and the trial's sparsity
score must be the file merge's ``sum |merged - base|``.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from evals.objective import Objective
from merging.config import ExpertRef, MergeConfig
from merging.files import merge_to_dir
from merging.io import CheckpointReader, load_state_dict
from service.runner import TrialRunner
from tests.tiny_archs import ARCHS, RENAMED_ARCHS, ArchSet, build_arch_set

# Per expert (in order): different weights, so a swapped or dropped expert shows.
METHODS = {
    "task_arithmetic": [{"weight": 0.6}, {"weight": 0.9}],
    "ties": [{"weight": 0.8, "density": 0.5}, {"weight": 0.5, "density": 0.5}],
    "dare_ties": [{"weight": 0.7, "density": 0.5}, {"weight": 0.9, "density": 0.5}],
}
SEED = 7  # DARE's masks
SPARSITY = Objective(kind="sparsity", direction="minimize")


@pytest.fixture(scope="module")
def arch_sets(tmp_path_factory) -> dict[str, ArchSet]:
    root = tmp_path_factory.mktemp("archs")
    return {arch: build_arch_set(root / arch, arch) for arch in ARCHS}


@pytest.fixture(scope="module")
def runner() -> TrialRunner:
    """One worker for the module: a set stays resident across its methods' trials (tests run arch by arch),
    so each trial also checks that a merge overwrites the previous trial's weights completely."""
    return TrialRunner(device="cpu", trusted_task_paths=[])


def _config(arch_set: ArchSet, method: str) -> MergeConfig:
    experts = tuple(ExpertRef(name, str(path), params)
                    for (name, path), params in zip(arch_set.experts.items(), METHODS[method], strict=True))
    return MergeConfig(method=method, base=str(arch_set.base), experts=experts, seed=SEED)


# The builder: the layouts the trial test relies on.

@pytest.mark.parametrize("arch", RENAMED_ARCHS)
def test_renamed_archs_keep_checkpoint_names_in_files(arch_sets, arch):
    arch_set = arch_sets[arch]
    files = set(CheckpointReader(arch_set.base).keys())
    live = set(AutoModelForCausalLM.from_pretrained(arch_set.base).state_dict())
    assert files - live, f"{arch}: every file tensor is a live parameter name; the test would cover no rename"
    if arch == "mixtral":
        assert "model.layers.0.block_sparse_moe.experts.0.w1.weight" in files
        assert "model.layers.0.mlp.experts.gate_up_proj" in live
    elif arch == "qwen2_moe":
        assert "model.layers.0.mlp.experts.0.gate_proj.weight" in files
        assert "model.layers.0.mlp.experts.gate_up_proj" in live
    else:
        assert "embed_out.weight" in files and "lm_head.weight" in live


@pytest.mark.parametrize("arch", sorted(set(ARCHS) - set(RENAMED_ARCHS)))
def test_other_archs_load_under_their_file_names(arch_sets, arch):
    arch_set = arch_sets[arch]
    files = set(CheckpointReader(arch_set.base).keys())
    assert files <= set(AutoModelForCausalLM.from_pretrained(arch_set.base).state_dict())


def test_special_layouts(arch_sets):
    for arch in ("qwen2_tied", "gemma2"):
        assert "lm_head.weight" not in CheckpointReader(arch_sets[arch].base).keys(), arch
    mistral = arch_sets["mistral_bf16_sharded"]
    index = json.loads((mistral.base / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    reader = CheckpointReader(mistral.base)
    assert {reader.dtype(n) for n in reader.keys()} == {torch.bfloat16}
    for arch, arch_set in arch_sets.items():
        if arch != "mistral_bf16_sharded":
            reader = CheckpointReader(arch_set.base)
            assert {reader.dtype(n) for n in reader.keys()} == {torch.float32}, arch


# The acceptance test: trial == file merge.

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_trial_model_equals_file_merge(arch_sets, runner, tmp_path, arch, method):
    arch_set = arch_sets[arch]
    config = _config(arch_set, method)

    out = merge_to_dir(config, tmp_path / "merged")
    expected = AutoModelForCausalLM.from_pretrained(out)
    assert expected.dtype == arch_set.dtype, "transformers should load the merged checkpoint in its own dtype"

    scores = runner.run(config, [SPARSITY])
    live = runner.last_model
    assert live.dtype == arch_set.dtype, f"the live model is {live.dtype}, the checkpoint {arch_set.dtype}"

    got, want = live.state_dict(), expected.state_dict()
    assert sorted(got) == sorted(want)
    wrong_dtype = {n: (got[n].dtype, want[n].dtype) for n in want if got[n].dtype != want[n].dtype}
    assert not wrong_dtype, f"dtypes (live, file merge) differ: {dict(list(wrong_dtype.items())[:5])}"
    differ = sorted(n for n in want if not torch.equal(got[n].cpu(), want[n]))
    assert not differ, f"{len(differ)} of {len(want)} tensors differ from the file merge: {differ[:5]}"

    base, merged = load_state_dict(arch_set.base), load_state_dict(out)
    assert sorted(merged) == sorted(base), "the file merge keeps the checkpoint's tensor names"
    l1 = sum(float((merged[n].double() - b.double()).abs().sum()) for n, b in base.items())
    assert l1 > 0
    assert scores["sparsity"] == pytest.approx(l1, rel=1e-5)
