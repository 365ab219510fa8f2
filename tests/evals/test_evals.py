"""Objectives and the in-memory evaluator on the tiny zoo (on the demo zoo where a score needs skill)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evals.catalog import TaskCatalog
from evals.evaluator import EvaluationError, Evaluator, bundled_task_names
from evals.objective import Objective
from merging.config import ExpertRef, MergeConfig
from service.runner import TrialRunner


def test_fixed_subset_is_identical_across_calls_and_seeded():
    o = Objective(task="mmmo_add", samples=50)
    assert o.doc_ids(300) == o.doc_ids(300) == Objective(task="mmmo_add", samples=50).doc_ids(300)
    assert len(set(o.doc_ids(300))) == 50 and max(o.doc_ids(300)) < 300
    assert Objective(task="mmmo_add", samples=50, seed=1).doc_ids(300) != o.doc_ids(300)
    assert Objective(task="mmmo_add", samples=None).doc_ids(7) == list(range(7))


def test_bundled_suite_has_generation_and_choice_forms():
    names = set(bundled_task_names())
    for task in ("add", "reverse", "sort", "upper"):
        assert {f"mmmo_{task}", f"mmmo_{task}_mc"} <= names


def test_catalog_rejects_unknown_task_metric_and_filter():
    catalog = TaskCatalog()
    assert catalog.problem(Objective(task="mmmo_add")) is None
    assert catalog.problem(Objective(task="nope"))[0] == "task"
    assert catalog.problem(Objective(task="mmmo_add", metric="acc"))[0] == "metric"
    assert catalog.problem(Objective(task="mmmo_add", filter="maj@8"))[0] == "filter"
    assert catalog.problem(Objective(task="mmmo_add_mc", metric="acc")) is None


@pytest.fixture(scope="module")
def base_model(tiny_zoo):
    model = AutoModelForCausalLM.from_pretrained(tiny_zoo.base, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_zoo.base)


def test_evaluator_scores_both_output_types_and_repeats_exactly(base_model):
    model, tok = base_model
    objectives = [Objective(task="mmmo_reverse", samples=30),
                  Objective(task="mmmo_reverse_mc", metric="acc", samples=30)]
    ev = Evaluator(model, tok, objectives)
    first = ev.score()
    assert set(first) == {"mmmo_reverse:exact_match", "mmmo_reverse_mc:acc"}
    assert all(0.0 <= v <= 1.0 for v in first.values())
    assert ev.score() == first


def test_evaluator_names_a_metric_the_task_does_not_produce(base_model):
    model, tok = base_model
    ev = Evaluator(model, tok, [Objective(task="mmmo_add", metric="acc", samples=5)])
    with pytest.raises(EvaluationError, match="no 'acc,none'"):
        ev.score()


def test_evaluator_refuses_unknown_tasks_up_front(base_model):
    model, tok = base_model
    with pytest.raises(EvaluationError, match="unknown task"):
        Evaluator(model, tok, [Objective(task="not_a_task")])


@pytest.mark.slow  # the add expert must out-score the reverse expert on add: trained models
def test_trial_runner_scores_depend_on_the_merge(zoo):
    runner = TrialRunner()
    objectives = [Objective(task="mmmo_add", samples=60), Objective(task="mmmo_reverse", samples=60)]

    def config(w_add: float, w_rev: float) -> MergeConfig:
        return MergeConfig(method="task_arithmetic", base=str(zoo.base),
                           experts=(ExpertRef("add", str(zoo.experts["add"]), {"weight": w_add}),
                                    ExpertRef("reverse", str(zoo.experts["reverse"]), {"weight": w_rev})))

    add_heavy = runner.run(config(1.0, 0.0), objectives)
    rev_heavy = runner.run(config(0.0, 1.0), objectives)
    assert runner.loads == 1, "the same base/experts must stay resident between trials"
    assert add_heavy["mmmo_add:exact_match"] > rev_heavy["mmmo_add:exact_match"]
    assert rev_heavy["mmmo_reverse:exact_match"] >= add_heavy["mmmo_reverse:exact_match"]


def test_perplexity_and_sparsity_objectives(tiny_zoo):
    from evals.synthetic import DATA_DIR

    runner = TrialRunner()
    data = str(DATA_DIR / "add" / "validation.jsonl")
    objectives = [Objective(kind="perplexity", data=data, direction="minimize"),
                  Objective(kind="sparsity", direction="minimize")]

    def config(w: float) -> MergeConfig:
        return MergeConfig(method="task_arithmetic", base=str(tiny_zoo.base),
                           experts=(ExpertRef("add", str(tiny_zoo.experts["add"]), {"weight": w}),))

    at_base = runner.run(config(0.0), objectives)
    at_expert = runner.run(config(1.0), objectives)
    assert at_base["sparsity"] == 0.0 and at_expert["sparsity"] > 0.0
    # (the experts learn answers, not prompts: on whole texts an expert's perplexity may be higher)
    assert at_expert["perplexity:validation"] != at_base["perplexity:validation"]
    assert runner.run(config(0.0), objectives) == at_base, "a merge back to the base scores as the base"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evals.evaluator import Perplexity

    base = AutoModelForCausalLM.from_pretrained(tiny_zoo.base).eval()
    direct = Perplexity(data).score(base, AutoTokenizer.from_pretrained(tiny_zoo.base))
    assert at_base["perplexity:validation"] == pytest.approx(direct, rel=1e-5)
    expert = AutoModelForCausalLM.from_pretrained(tiny_zoo.experts["add"]).eval()
    direct = Perplexity(data).score(expert, AutoTokenizer.from_pretrained(tiny_zoo.base))
    assert at_expert["perplexity:validation"] == pytest.approx(direct, rel=1e-4)


def test_auto_batch_size_scores_like_a_fixed_one(base_model):
    model, tok = base_model
    objectives = [Objective(task="mmmo_sort", samples=20), Objective(task="mmmo_sort_mc", metric="acc", samples=20)]
    fixed = Evaluator(model, tok, objectives, batch_size=8).score()
    assert Evaluator(model, tok, objectives, batch_size="auto").score() == fixed


@pytest.mark.parametrize("budget,loads,resident", [(None, 4, 1), (10**12, 2, 2), (1, 4, 1)])
def test_resident_sets_are_kept_within_the_memory_budget(tiny_zoo, budget, loads, resident):
    runner = TrialRunner(max_resident_bytes=budget)
    objectives = [Objective(task="mmmo_add", samples=5)]

    def config(expert: str) -> MergeConfig:
        return MergeConfig(method="task_arithmetic", base=str(tiny_zoo.base),
                           experts=(ExpertRef(expert, str(tiny_zoo.experts[expert]), {"weight": 0.5}),))

    for expert in ("add", "sort", "add", "sort"):
        runner.run(config(expert), objectives)
    assert runner.loads == loads
    assert len(runner.resident_keys) == resident


def test_tokens_and_latency_are_measured_in_the_scoring_pass(base_model):
    """Tokens per item are the continuations lm-eval itself records (its logged samples), counted
    by the tokenizer; the multiple-choice task generates nothing and is not counted."""
    from lm_eval.evaluator import evaluate

    model, tok = base_model
    objectives = [Objective(task="mmmo_reverse", samples=12), Objective(task="mmmo_add", samples=8),
                  Objective(task="mmmo_reverse_mc", metric="acc", samples=6),
                  Objective(kind="tokens", direction="minimize"),
                  Objective(kind="tokens", task="mmmo_add", direction="minimize"),
                  Objective(kind="latency", direction="minimize")]
    ev = Evaluator(model, tok, objectives)
    scores = ev.score()
    logged = evaluate(lm=ev.lm, task_dict=ev.task_dict, samples=ev.samples, bootstrap_iters=0,
                      log_samples=True)["samples"]

    def lengths(task):
        return [len(tok(s["resps"][0][0], add_special_tokens=False)["input_ids"]) for s in logged[task]]
    both = lengths("mmmo_reverse") + lengths("mmmo_add")
    assert len(both) == 20
    assert scores["tokens"] == pytest.approx(sum(both) / 20)
    assert scores["tokens:mmmo_add"] == pytest.approx(sum(lengths("mmmo_add")) / 8)
    assert scores["latency"] > 0
    assert scores["mmmo_reverse:exact_match"] == ev.score()["mmmo_reverse:exact_match"]
    with pytest.raises(EvaluationError, match="no generation task"):
        Evaluator(model, tok, [Objective(task="mmmo_add_mc", metric="acc", samples=4),
                               Objective(kind="tokens", task="mmmo_add_mc")]).score()


def test_cost_objectives_need_an_lm_eval_objective():
    from pydantic import ValidationError

    from search.spec import ObjectiveSpec, StudySpec

    base = {"base": "/m/base", "experts": [{"name": "a", "path": "/m/a"}]}
    with pytest.raises(ValidationError, match="measured on the lm_eval objectives' items"):
        StudySpec.model_validate(base | {"objectives": [{"kind": "latency"}, {"kind": "sparsity"}]})
    with pytest.raises(ValidationError, match="must be one of the lm_eval objectives' tasks"):
        StudySpec.model_validate(base | {"objectives": [{"task": "mmmo_add"}, {"kind": "tokens", "task": "x"}]})
    spec = StudySpec.model_validate(base | {"objectives": [{"task": "mmmo_add"}, {"kind": "tokens"}]})
    assert [o.key for o in spec.objectives] == ["mmmo_add:exact_match", "tokens"]
    assert spec.objectives[1].direction == "minimize"
    with pytest.raises(ValidationError, match="takes no 'task'"):
        ObjectiveSpec(kind="latency", task="mmmo_add")
