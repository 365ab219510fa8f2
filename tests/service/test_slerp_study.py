"""A study that searches slerp's ``t`` per layer group and filter (issue #18): in process, on tiny
models, each trial's ``t`` differs by group and its live model is the file merge of its exported
mergekit config; and on the demo zoo (slow)."""

from __future__ import annotations

import pytest
import torch

from merging.config import MergeConfig
from merging.files import merge_to_dir
from merging.io import CheckpointReader
from merging.mergekit_yaml import parse_mergekit, to_mergekit
from merging.plan import MergePlan
from search.spec import StudySpec
from service import local, studies
from service.runner import TrialRunner
from service.services import Services

GROUPS = {"layer_groups": 2, "filters": ["self_attn", "mlp"]}


def _slerp_spec(zoo, objectives: list[dict], trials: int) -> StudySpec:
    return StudySpec.model_validate({
        "name": "slerp over layer groups",
        "base": str(zoo.base),
        "experts": [{"name": "add", "path": str(zoo.experts["add"])}],
        "method": "slerp",
        "search_space": {"weight": None, "density": None, "method_params": {"t": {"low": 0.0, "high": 1.0}}} | GROUPS,
        "objectives": objectives,
        # the groups' own values from the first trial (the default warm-up ties them)
        "sampler": {"name": "nsga2", "population_size": 4, "tie_groups": False},
        "budget": {"trials": trials},
    })


def _run(settings, spec: StudySpec, runner: TrialRunner) -> tuple[dict, list[dict], int]:
    """The study run to the end: its final state, its trials' merge configs, the last trial run."""
    ran: list[int] = []
    services = Services.start(settings)
    try:
        study_id = local.create(services, spec)
        final = local.run(services, study_id, runner, on_trial=lambda number, *_: ran.append(number))
        with services.sessions() as session:
            configs = {t.number: t.merge_config for t in studies.get_study(session, study_id, None).trials}
    finally:
        services.close()
    return final, configs, ran[-1]


def test_a_slerp_study_searches_t_per_layer_group_and_its_trials_are_their_mergekit_exports(settings, tiny_zoo,
                                                                                           tmp_path):
    objectives = [{"kind": "sparsity"}, {"kind": "perplexity", "data": str(tiny_zoo.calibration["add"])}]
    spec = _slerp_spec(tiny_zoo, objectives, trials=6)
    runner = TrialRunner(cache_dir=tmp_path / "cache", trusted_task_paths=[])
    final, configs, last = _run(settings, spec, runner)

    assert final["status"] == "done", final.get("error")
    assert [t["state"] for t in final["trials"]] == ["complete"] * 6
    groups = [f"L{a}-{b}/{f}" for a, b in ((0, 1), (2, 3)) for f in ("self_attn", "mlp", "other")] + ["rest/other"]
    names = CheckpointReader(tiny_zoo.base).keys()
    for trial in final["trials"]:
        assert sorted(trial["params"]) == sorted(f"method.t@{g}" for g in groups)
        assert len(set(trial["params"].values())) > 1, "the groups' t differ"
        # every tensor merges with its group's searched t
        config = MergeConfig.from_dict(configs[trial["number"]])
        plan = MergePlan(config, names=names)
        for name in names:
            group = config.grouping.group_of(name)
            group = "rest/other" if group.startswith("rest/") else group
            assert plan.params_for(name)[1]["t"] == trial["params"][f"method.t@{group}"], name
    assert any(len(set(t["params"].values())) == len(groups) for t in final["trials"])
    for key in final["trials"][0]["params"]:
        assert len({t["params"][key] for t in final["trials"]}) > 1, f"{key} is not searched"
    assert len({tuple(t["values"].values()) for t in final["trials"]}) > 1, "different t, different scores"

    # the last trial's live model is the file merge of its exported mergekit YAML
    config = MergeConfig.from_dict(configs[last])
    exported = parse_mergekit(to_mergekit(config)).config
    written = CheckpointReader(merge_to_dir(exported, tmp_path / "exported"))
    live = runner.last_model.state_dict()
    assert sorted(live) == sorted(written.keys())
    differ = [n for n in written.keys() if not torch.equal(live[n], written.get(n))]
    assert not differ, f"{len(differ)} tensors differ from the exported config's merge: {differ[:5]}"


@pytest.mark.slow
def test_a_slerp_study_over_layer_groups_runs_on_the_demo_zoo(settings, zoo, cache_dir):
    objectives = [{"task": "mmmo_add", "samples": 20}, {"kind": "sparsity"}]
    final, _, _ = _run(settings, _slerp_spec(zoo, objectives, trials=8), TrialRunner(cache_dir=cache_dir))
    assert final["status"] == "done", final.get("error")
    assert [t["state"] for t in final["trials"]] == ["complete"] * 8
    assert all(len(t["params"]) == 7 and len(set(t["params"].values())) > 1 for t in final["trials"])
    assert len({tuple(t["values"].values()) for t in final["trials"]}) > 1
