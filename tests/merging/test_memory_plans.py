"""Memory plans and dtypes of resident sets: the plan chosen from a budget, every plan giving the
same merged tensors, tensors held in the checkpoint's dtype, and LRU eviction across plans."""

from __future__ import annotations

import pytest
import torch

from evals.objective import Objective
from merging.config import ExpertRef, MergeConfig
from merging.files import merge_to_dir
from merging.io import CheckpointReader
from merging.placement import GiB, PlanKind, SetSize, choose
from merging.resident import Merger
from tests.tiny_archs import build_arch_set

SPARSITY = [Objective(kind="sparsity", direction="minimize")]


def _config(arch_set, method="dare_ties", dtype=None) -> MergeConfig:
    experts = tuple(ExpertRef(name, str(path), {"weight": 0.7 - 0.2 * i, "density": 0.5})
                    for i, (name, path) in enumerate(arch_set.experts.items()))
    return MergeConfig(method=method, base=str(arch_set.base), experts=experts, seed=5, dtype=dtype)


@pytest.fixture(scope="module")
def bf16_set(tmp_path_factory):
    return build_arch_set(tmp_path_factory.mktemp("bf16"), "mistral_bf16_sharded")


@pytest.fixture(scope="module")
def fp32_set(tmp_path_factory):
    return build_arch_set(tmp_path_factory.mktemp("fp32"), "llama")


def test_auto_takes_the_fastest_plan_that_fits():
    size = SetSize(model_bytes=4 * GiB, experts=3)
    cpu, gpu = torch.device("cpu"), torch.device("cuda:0")
    assert size.needs(PlanKind.RESIDENT) == (20 * GiB, 0)
    assert size.needs(PlanKind.HOST) == (8 * GiB, 12 * GiB)
    assert size.needs(PlanKind.FILES) == (8 * GiB, 0)
    assert choose(size, cpu, budget=None).kind == PlanKind.RESIDENT  # nothing known: nothing to save
    assert choose(size, cpu, budget=22 * GiB).kind == PlanKind.RESIDENT
    assert choose(size, cpu, budget=20 * GiB).kind == PlanKind.FILES  # no room left for the evaluation
    # On CPU the host plan holds the same bytes as resident: never chosen there.
    assert choose(size, cpu, budget=12 * GiB).kind == PlanKind.FILES
    assert choose(size, gpu, budget=80 * GiB, host_budget=100 * GiB).kind == PlanKind.RESIDENT
    assert choose(size, gpu, budget=12 * GiB, host_budget=100 * GiB).kind == PlanKind.HOST
    assert choose(size, gpu, budget=12 * GiB, host_budget=8 * GiB).kind == PlanKind.FILES
    asked = choose(size, gpu, budget=80 * GiB, requested="files")
    assert (asked.kind, asked.chosen) == (PlanKind.FILES, False)
    assert "files on cuda:0: 8.0 GiB" in asked.summary() and "asked for" in asked.summary()


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_every_plan_gives_the_file_merges_tensors(bf16_set, tmp_path, method):
    config = _config(bf16_set, method)
    out = merge_to_dir(config, tmp_path / "merged")
    written = CheckpointReader(out)
    for plan in PlanKind:
        merger = Merger(CheckpointReader(bf16_set.base),
                        {n: CheckpointReader(p) for n, p in bf16_set.experts.items()}, plan=plan)
        seen = 0
        for name, merged in merger.merged_tensors(config):
            assert merged.dtype == torch.bfloat16, (plan, name)
            assert torch.equal(merged, written.get(name)), (plan, name)
            seen += 1
        assert seen == len(written.keys())


def test_tensors_are_held_in_the_checkpoints_dtype_unless_asked(bf16_set, fp32_set):
    bf16 = {n: CheckpointReader(p) for n, p in bf16_set.experts.items()}
    held = Merger(CheckpointReader(bf16_set.base), bf16)
    assert {t.dtype for t in held.base.values()} == {torch.bfloat16}
    assert {t.dtype for ts in held.store.tensors.values() for t in ts} == {torch.bfloat16}
    one_copy = sum(t.numel() * 2 for t in held.base.values())
    assert held.device_bytes == 3 * one_copy  # base + 2 experts, no float32 copies
    files = Merger(CheckpointReader(bf16_set.base), bf16, plan="files")
    assert files.device_bytes == one_copy  # the experts stay in their files
    wide = Merger(CheckpointReader(fp32_set.base), {n: CheckpointReader(p) for n, p in fp32_set.experts.items()},
                  dtype=torch.bfloat16)
    assert {t.dtype for t in wide.base.values()} == {torch.bfloat16}


def test_the_spec_dtype_reaches_the_live_model_and_the_file_merge(fp32_set, tmp_path):
    from transformers import AutoModelForCausalLM

    from service.runner import TrialRunner

    config = _config(fp32_set, "ties", dtype="bfloat16")
    runner = TrialRunner(trusted_task_paths=[])
    runner.run(config, SPARSITY)
    live = runner.last_model.state_dict()
    assert {t.dtype for t in live.values() if t.is_floating_point()} == {torch.bfloat16}
    loaded = AutoModelForCausalLM.from_pretrained(merge_to_dir(config, tmp_path / "m")).state_dict()
    assert all(torch.equal(loaded[k], live[k]) for k in loaded)


def test_the_worker_dtype_applies_when_the_spec_names_none(fp32_set):
    from service.runner import TrialRunner

    runner = TrialRunner(trusted_task_paths=[], dtype="float16")
    runner.run(_config(fp32_set), SPARSITY)
    assert next(runner.last_model.parameters()).dtype == torch.float16
    runner.run(_config(fp32_set, dtype="float32"), SPARSITY)  # the spec's wins
    assert next(runner.last_model.parameters()).dtype == torch.float32


def test_trials_agree_across_plans_and_eviction_counts_each_plans_bytes(bf16_set, fp32_set):
    from service.runner import TrialRunner

    results = {}
    for plan in ("resident", "host", "files"):
        runner = TrialRunner(trusted_task_paths=[], memory_plan=plan)
        scores = runner.run(_config(bf16_set), SPARSITY)
        results[plan] = (scores["sparsity"], {k: v.clone() for k, v in runner.last_model.state_dict().items()})
        assert runner.placement.kind == plan and runner.placement_summary.startswith(plan)
    ref_l1, ref_state = results["resident"]
    for l1, state in results.values():
        assert l1 == ref_l1
        assert all(torch.equal(state[k], ref_state[k]) for k in ref_state)

    # Room for a files-plan set of each, not for two resident sets: the LRU keeps what fits.
    probe = TrialRunner(trusted_task_paths=[], memory_plan="files")
    probe.run(_config(bf16_set), SPARSITY)
    files_bytes = probe._sets[probe.resident_keys[0]].nbytes
    probe.run(_config(fp32_set), SPARSITY)
    assert len(probe.resident_keys) == 1  # without a budget only the last set stays
    both = files_bytes + probe._sets[probe.resident_keys[0]].nbytes
    runner = TrialRunner(trusted_task_paths=[], memory_plan="files", max_resident_bytes=both)
    runner.run(_config(bf16_set), SPARSITY)
    runner.run(_config(fp32_set), SPARSITY)
    assert len(runner.resident_keys) == 2 and runner.loads == 2
    resident = TrialRunner(trusted_task_paths=[], memory_plan="resident", max_resident_bytes=both)
    resident.run(_config(bf16_set), SPARSITY)
    resident.run(_config(fp32_set), SPARSITY)  # a resident set of each is more than `both`: the first goes
    assert [k[0] for k in resident.resident_keys] == [str(fp32_set.base)]
    assert files_bytes < both
