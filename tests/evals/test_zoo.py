"""The demo zoo's two properties, and the build's mechanics at a tiny size."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evals.evaluator import Evaluator
from evals.objective import Objective
from evals.zoo import ZooRecipe, build_zoo
from merging.config import ExpertRef, MergeConfig
from merging.resident import Merger

pytestmark = pytest.mark.slow
SAMPLES = 150


@pytest.fixture(scope="module")
def scored(zoo):
    """Per-task scores of each expert and of a small grid of merges (test split subset)."""
    names = list(zoo.experts)
    model = AutoModelForCausalLM.from_pretrained(zoo.base, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(zoo.base)
    objectives = [Objective(task=t, samples=SAMPLES) for n in names for t in zoo.expert_tasks[n]]
    ev = Evaluator(model, tok, objectives)
    merger = Merger.from_checkpoints(str(zoo.base), {n: str(p) for n, p in zoo.experts.items()})

    def score(method: str, per_expert: list[dict], params: dict | None = None) -> dict[str, float]:
        experts = tuple(ExpertRef(n, str(zoo.experts[n]), p) for n, p in zip(names, per_expert, strict=True))
        merger.apply(model, MergeConfig(method=method, base=str(zoo.base), experts=experts, params=params or {}))
        return ev.score()

    experts = {}
    for i, n in enumerate(names):
        experts[n] = score("task_arithmetic", [{"weight": float(i == j)} for j in range(len(names))])
    grid = {
        "ta 0.75": score("task_arithmetic", [{"weight": 0.75}] * len(names)),
        "ta 1/.5": score("task_arithmetic", [{"weight": 1.0}] + [{"weight": 0.5}] * (len(names) - 1)),
        "ties d.7": score("ties", [{"weight": 1.0, "density": 0.7}] * len(names), {"lambda": 1.5}),
    }
    return names, zoo.expert_tasks, experts, grid


def test_each_expert_is_clearly_best_on_its_own_task(scored):
    names, tasks, experts, _ = scored
    for n in names:
        key = f"{tasks[n][0]}:exact_match"
        others = max(experts[m][key] for m in names if m != n)
        assert experts[n][key] >= others + 0.05, (n, experts[n][key], others)


def test_some_merge_beats_every_expert_on_the_mean(scored):
    _, _, experts, grid = scored

    def mean(s: dict[str, float]) -> float:
        return sum(s.values()) / len(s)

    best_expert = max(mean(s) for s in experts.values())
    best_merge = max(mean(s) for s in grid.values())
    assert best_merge > best_expert + 0.03, (best_merge, best_expert)


def test_tiny_build_writes_a_loadable_zoo_atomically(tmp_path):
    recipe = ZooRecipe(tasks=("add", "reverse"), base_mix=(0.5, 0.5), hidden_size=32, intermediate_size=64,
                       num_layers=1, num_heads=2, batch_size=8, base_steps=3, expert_steps=2, base_warmup=1,
                       expert_warmup=1)
    out = tmp_path / "zoo"
    zoo = build_zoo(out, recipe)
    meta = json.loads((out / "zoo.json").read_text())
    assert [e["name"] for e in meta["experts"]] == ["add", "reverse"]
    assert meta["experts"][0]["tasks"] == ["mmmo_add"]
    assert zoo.base == out / "base"
    assert AutoModelForCausalLM.from_pretrained(zoo.experts["reverse"]).config.hidden_size == 32
    assert [p.name for p in tmp_path.iterdir()] == ["zoo"], "no staging directory may be left behind"
