"""Scoring a live (in-memory) model with lm-eval, re-using one TaskManager and one HFLM.

lm-eval's ``simple_evaluate`` rebuilds tasks and collects environment info on every call;
here the task objects are built once and ``lm_eval.evaluator.evaluate`` is called per trial
on the same documents, so a trial pays for the model's forward passes and little else.

Importing this module does not decide whether lm-eval may reach the hub: the command that
imports it calls ``evals.offline.set_offline`` first.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from lm_eval.evaluator import evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from evals.objective import COST_KINDS, Objective
from evals.taskdirs import BUNDLED_TASKS_DIR, install_guards
from evals.texts import read_calibration_texts

log = logging.getLogger(__name__)


class EvaluationError(RuntimeError):
    """An objective could not be scored (missing task or metric, NaN score)."""


class Perplexity:
    """Perplexity of a live model on fixed calibration texts (token-weighted mean NLL, exponentiated)."""

    def __init__(self, data: str | None, limit: int = 256, batch_size: int = 32) -> None:
        if data is None:
            raise EvaluationError("a perplexity objective needs 'data' (a jsonl or text file)")
        self.texts = read_calibration_texts(data, limit=limit)
        self.batch_size = batch_size

    def score(self, model, tokenizer) -> float:
        import torch

        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        device = next(model.parameters()).device
        nll, count = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(self.texts), self.batch_size):
                enc = tokenizer(self.texts[i : i + self.batch_size], return_tensors="pt", padding=True,
                                truncation=True, max_length=getattr(model.config, "max_position_embeddings", 512))
                ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
                logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()  # (B, T-1, V)
                target, keep = ids[:, 1:], mask[:, 1:].bool()
                losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
                nll += float(losses[keep].sum())
                count += int(keep.sum())
        return math.exp(nll / max(count, 1))


def task_manager(include_paths: Sequence[Path] = (), defaults: bool = False) -> TaskManager:
    """Bundled tasks plus the caller's YAML dirs; lm-eval's ~14,700 built-in tasks (about 10 s to
    index) only with ``defaults``, and then indexed once per process and set of directories.

    Every task mmmo loads comes through here, so this is where lm-eval is made to run ``!function``
    modules from trusted task directories only and to render templates in a Jinja sandbox
    (``evals/taskdirs.py``), before any task is indexed."""
    install_guards()
    paths = (str(BUNDLED_TASKS_DIR), *map(str, include_paths))
    if defaults:
        return _with_defaults(paths)
    return TaskManager(include_path=list(paths), include_defaults=False)


@functools.lru_cache(maxsize=4)
def _with_defaults(paths: tuple[str, ...]) -> TaskManager:
    return TaskManager(include_path=list(paths), include_defaults=True)


def manager_for(tasks: Sequence[str], include_paths: Sequence[Path] = ()) -> TaskManager:
    """The cheapest manager that knows every task: without lm-eval's built-ins when it can."""
    local = task_manager(include_paths)
    if all(t in local.all_tasks for t in tasks):
        return local
    return task_manager(include_paths, defaults=True)


def bundled_task_names() -> list[str]:
    return sorted(n for n in task_manager().all_tasks if n.startswith("mmmo_"))


class _QuietHFLM(HFLM):
    """HFLM without its per-call tqdm bars (they pass ``disable`` explicitly, so TQDM_DISABLE can't),
    keeping each generation's ``(task, continuation)`` in ``generated`` where that is a list."""

    generated: list[tuple[str | None, str]] | None = None

    def generate_until(self, requests, disable_tqdm: bool = False):
        out = super().generate_until(requests, disable_tqdm=True)
        if self.generated is not None:
            self.generated.extend((r.task_name, c) for r, c in zip(requests, out, strict=True))
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return super().loglikelihood(requests, disable_tqdm=True)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return super().loglikelihood_rolling(requests, disable_tqdm=True)


class Evaluator:
    """Scores the current weights of ``model`` on its lm-eval and perplexity objectives.

    (Sparsity needs the base weights, so the worker's TrialRunner scores it.)
    """

    def __init__(self, model, tokenizer, objectives: Sequence[Objective], *, batch_size: int | str = 64,
                 include_paths: Sequence[Path] = (), manager: TaskManager | None = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.objectives = [o for o in objectives if o.kind == "lm_eval"]
        self.costs = [o for o in objectives if o.kind in COST_KINDS]
        if self.costs and not self.objectives:
            raise EvaluationError("tokens and latency objectives are measured on the lm_eval objectives' items: "
                                  "add one")
        self.perplexity = {o.key: Perplexity(o.data) for o in objectives if o.kind == "perplexity"}
        self.manager = manager or manager_for([o.task for o in self.objectives], include_paths)
        unknown = sorted({o.task for o in self.objectives} - set(self.manager.all_tasks))
        if unknown:
            raise EvaluationError(f"unknown task(s) {unknown}")
        self.lm = _QuietHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        self.task_dict = self.manager.load(sorted({o.task for o in self.objectives})) if self.objectives else None
        self.tasks = self.task_dict["tasks"] if self.task_dict else {}
        self.samples = {}
        for obj in self.objectives:
            self.samples[obj.task] = obj.doc_ids(len(self.tasks[obj.task].eval_docs))
        self._scored = self.samples  # what the current or last ``score`` evaluates

    @property
    def items(self) -> int:
        """lm-eval items the last ``score`` evaluated (by default each objective's subset of its task)."""
        return sum(len(ids) for ids in self._scored.values())

    def _results(self) -> dict[str, dict]:
        out = evaluate(lm=self.lm, task_dict=self.task_dict, samples=self._scored,
                       bootstrap_iters=0, log_samples=False)
        return out["results"]

    def _costs(self, seconds: float, generated: list[tuple[str | None, str]]) -> dict[str, float]:
        """The cost objectives of one evaluation pass: ``seconds`` over its items, and the tokens of
        its generations (each continuation as returned, cut at the task's stop sequence)."""
        out = {}
        items = self.items
        for o in self.costs:
            if o.kind == "latency":
                out[o.key] = seconds / max(items, 1)
                continue
            texts = [c for task, c in generated if o.task is None or task == o.task]
            if not texts:
                raise EvaluationError(f"objective '{o.key}': no generation task among the lm_eval objectives"
                                      + (f" is '{o.task}'" if o.task else ""))
            lengths = [len(self.tokenizer(c, add_special_tokens=False)["input_ids"]) for c in texts]
            out[o.key] = sum(lengths) / len(lengths)
        return out

    def all_metrics(self) -> dict[str, dict[str, float]]:
        """Every metric each task produces: ``{task: {metric: value}}`` (``metric,filter`` if filtered)."""
        table: dict[str, dict[str, float]] = {}
        for task, row in self._results().items():
            for field, value in row.items():
                if "," not in field or "_stderr" in field:
                    continue
                metric, filt = field.split(",", 1)
                table.setdefault(task, {})[metric if filt == "none" else field] = float(value)
        return table

    def score(self, window: Mapping[str, tuple[int, int]] | None = None) -> dict[str, float]:
        """Evaluate the model as it is now; keys are ``Objective.key``. ``window``: per task, score only
        items ``first`` .. ``end`` of its subset in its fixed order (``Objective.window_ids``: a
        multi-fidelity rung); the scores are then those items' alone."""
        self._scored = self.samples if window is None else {
            o.task: o.window_ids(len(self.tasks[o.task].eval_docs), *window[o.task]) for o in self.objectives}
        scores: dict[str, float] = {key: p.score(self.model, self.tokenizer) for key, p in self.perplexity.items()}
        for key, value in scores.items():
            if not math.isfinite(value):
                raise EvaluationError(f"perplexity objective '{key}' is {value}")
        if not self.objectives:
            return scores
        generated: list[tuple[str | None, str]] = []
        self.lm.generated = generated
        start = time.perf_counter()
        try:
            results = self._results()
        finally:
            self.lm.generated = None
        scores |= self._costs(time.perf_counter() - start, generated)
        for obj in self.objectives:
            row = results.get(obj.task, {})
            field = f"{obj.metric},{obj.filter}"
            if field not in row:
                produced = sorted(k for k in row if "," in k and not k.endswith("_stderr"))
                raise EvaluationError(f"task '{obj.task}' produced no '{field}' (it has {produced})")
            value = float(row[field])
            if math.isnan(value):
                raise EvaluationError(f"task '{obj.task}' scored NaN on '{field}'")
            scores[obj.key] = value
        return scores
