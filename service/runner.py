"""One trial on a worker: the resident set (base, deltas, live model, evaluator) -> merge -> evaluate.

Base, expert deltas, the live model and the evaluator stay resident between trials of the
same (base, experts, objectives); nothing is written to disk per trial.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from evals.evaluator import Evaluator
from evals.objective import Objective
from evals.taskdirs import check_task_dir, trusting
from merging.checks import check_compatible
from merging.config import MergeConfig
from merging.errors import IncompatibleCheckpoints
from merging.files import parse_dtype
from merging.io import TensorReader, model_dir, open_reference
from merging.placement import PLAN_CHOICES, Placement, SetSize, available_host_bytes, choose, device_budget
from merging.resident import Merger, expert_dirs
from merging.saliency import readings_of
from merging.vocab import aligned, fit_model
from service.lease_source import Cost
from service.materialize import obim_stats

if TYPE_CHECKING:
    from service.settings import Settings

log = logging.getLogger(__name__)


class SetLoadError(Exception):
    """A resident set (base, experts, live model, evaluator) could not be loaded on this worker.

    The trial fails with this reason; the server fails the study after a few identical ones, as
    every later trial of it would load the same doomed set."""


@dataclass
class _Resident:
    key: tuple
    merger: Merger
    model: Any
    evaluator: Evaluator

    placement: Placement

    @property
    def device_nbytes(self) -> int:
        """What evicting the set frees on the device (pinned host memory aside)."""
        return self.merger.device_bytes + sum(t.numel() * t.element_size() for t in self.model.parameters())

    @property
    def nbytes(self) -> int:
        """What the set holds: base, experts (on the device or in host memory) and the live model."""
        model = sum(t.numel() * t.element_size() for t in self.model.parameters())
        return self.merger.device_bytes + self.merger.host_bytes + model


class TrialRunner:
    """Merges and scores trials, keeping sets of models resident between trials.

    A set is the base, the expert deltas, a live model and its evaluator for one (base, experts,
    objectives). Without ``max_resident_bytes`` only the last set used stays; with it, sets stay
    until a new one needs their room, the least recently used going first.
    """

    def __init__(self, device: str = "cpu", batch_size: int | str = 64, cache_dir: Path | None = None,
                 max_resident_bytes: int | None = None, trusted_task_paths: list[Path] | None = None, *,
                 memory_plan: str = "auto", dtype: str | None = None) -> None:
        if trusted_task_paths is None:  # the worker's own settings: it cannot trust that the server checked
            from service.settings import Settings

            trusted_task_paths = Settings().trusted_task_paths
        self.trusted_task_paths = tuple(trusted_task_paths)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.cache_dir = cache_dir
        self.max_resident_bytes = max_resident_bytes
        if memory_plan not in PLAN_CHOICES:
            raise ValueError(f"unknown memory plan '{memory_plan}'; known: {list(PLAN_CHOICES)}")
        self.memory_plan = memory_plan
        self.dtype = dtype  # held and merged-into dtype when the spec names none; None: the checkpoint's
        self._sets: OrderedDict[tuple, _Resident] = OrderedDict()
        self.loads = 0  # sets loaded so far (a reload after eviction counts again)
        self.last_timing: dict[str, float] = {}  # seconds of the last trial: load, merge, evaluate
        self.last_cost: Cost | None = None  # what the last trial's evaluation took
        self.on_timing: Callable[[dict[str, float]], None] | None = None  # e.g. a benchmark's recorder
        self.last_model: Any = None  # the live model of the last trial run (tests compare it with file merges)
        self.placement: Placement | None = None  # the memory plan of the last set loaded

    @property
    def placement_summary(self) -> str | None:
        """The memory plan of the last set loaded, in one line (the workers page shows it)."""
        return self.placement.summary() if self.placement else None

    @classmethod
    def from_settings(cls, settings: Settings) -> TrialRunner:
        """A worker's runner as configured (``mmmo worker``, ``mmmo study run``)."""
        return cls(device=settings.resolved_device(), batch_size=settings.batch_size, cache_dir=settings.cache_dir,
                   max_resident_bytes=settings.max_memory, trusted_task_paths=settings.trusted_task_paths,
                   memory_plan=settings.memory_plan, dtype=settings.dtype)

    def _load(self, config: MergeConfig, objectives: list[Objective], task_paths: tuple[str, ...]) -> _Resident:
        vocabulary = json.dumps(config.tokenizer, sort_keys=True) if config.tokenizer is not None else None
        # Everything that decides what is loaded and how it was checked (a set checked leniently, for a
        # linear or allow_unrelated study, is not reused by one that must refuse an unrelated base).
        key = (config.base, config.method == "obim", tuple(config.experts_identity()), tuple(objectives), task_paths,
               config.dtype or self.dtype, vocabulary, config.ancestry)
        if key in self._sets:
            self._sets.move_to_end(key)
            return self._sets[key]
        if self.max_resident_bytes is None:
            self._drop_all()  # free the previous set before loading the next
        # A task directory the operator has not trusted runs no Python here, whatever the server checked
        # (its files may have changed since): refused up front, and lm-eval's own guard backs it up.
        for path in task_paths:
            check_task_dir(path, trusted=self.trusted_task_paths)
        try:
            resident = self._load_set(key, config, objectives, task_paths)
        except IncompatibleCheckpoints:
            raise  # the study itself cannot run: it fails at once
        except Exception as exc:
            raise SetLoadError(f"loading the models failed: {type(exc).__name__}: {exc}") from exc
        self.loads += 1
        self._sets[key] = resident
        return resident

    def _load_set(self, key: tuple, config: MergeConfig, objectives: list[Objective],
                  task_paths: tuple[str, ...]) -> _Resident:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        dtype_name = config.dtype or self.dtype
        dtype = parse_dtype(dtype_name)
        base_dir = model_dir(config.base)  # a clear error naming the model if this worker cannot find it
        base = open_reference(config.base)
        experts = {name: open_reference(path, config.base) for name, path in expert_dirs(config).items()}
        # With a tokenizer setting every model is read in the output vocabulary, the live model resized to it.
        base, experts, vocab = aligned(config, base, experts, dtype=dtype)
        # IncompatibleCheckpoints from here fails the whole study: every worker would see the same.
        # Checked before anything is evicted for it: a doomed set costs the healthy ones nothing.
        check_compatible(base, experts, ancestry=config.ancestry)
        placement = self._place(base, len(experts), dtype)
        self._make_room(placement, _model_bytes(base, dtype))
        log.info("loading base %s and %d experts: %s", config.base, len(experts), placement.summary())
        with trusting(self.trusted_task_paths):
            stats = obim_stats(config, self.cache_dir, str(self.device), dtype)
            # The live model first: while transformers reads the files (memory-mapped, counted as resident)
            # nothing else of the set is in memory yet, so the load's peak stays under the set's size.
            model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype or "auto").to(self.device).eval()
            if vocab is not None:
                fit_model(model, vocab)
            merger = Merger(base, experts, dtype=dtype, stats=stats, device=self.device, plan=placement.kind,
                            check_ancestry=False)  # checked above
            merger.layout(model)  # every parameter accounted for before the first trial
            try:
                tokenizer = vocab.tokenizer if vocab is not None else AutoTokenizer.from_pretrained(base_dir)
            except Exception as exc:  # say which files: the bare parser error names none
                raise ValueError(f"the tokenizer in '{base_dir}' cannot be loaded: "
                                 f"{type(exc).__name__}: {exc}") from exc
            evaluator = Evaluator(model, tokenizer, objectives, batch_size=self.batch_size,
                                  include_paths=[Path(p) for p in task_paths])
        self.placement = placement
        return _Resident(key, merger, model, evaluator, placement)

    def _make_room(self, placement: Placement, model_bytes: int) -> None:
        """Evict the least recently used sets until the new one fits: in ``max_resident_bytes``, and
        in what is free on the device now (with the evaluation's headroom), which ``_place``
        counted the resident sets into."""
        need = placement.device_bytes + placement.host_bytes
        room = SetSize(model_bytes, 0).headroom + placement.device_bytes
        free = device_budget(self.device, None)
        freed = 0
        while self._sets:
            held = sum(r.nbytes for r in self._sets.values())
            over_budget = self.max_resident_bytes is not None and held + need > self.max_resident_bytes
            short = free is not None and free + freed < room
            if not (over_budget or short):
                return
            evicted = self._sets.popitem(last=False)[1]
            freed += evicted.device_nbytes
            log.info("evicting the resident models of %s", evicted.key[0])
            if evicted.model is self.last_model:
                self.last_model = None

    def _drop_all(self) -> None:
        self._sets.clear()
        self.last_model = None  # nor does the last trial's model outlive its set

    def _place(self, base: TensorReader, experts: int, dtype: torch.dtype | None) -> Placement:
        """The set's memory plan, within what this worker may use: ``max_resident_bytes`` and what is
        free on the device, counting the sets resident now as free (they are evicted to make room)."""
        size = SetSize(_model_bytes(base, dtype), experts)
        held = sum(r.nbytes for r in self._sets.values())
        free = device_budget(self.device, None)
        budget = None if free is None else free + held
        if self.max_resident_bytes is not None:
            budget = self.max_resident_bytes if budget is None else min(budget, self.max_resident_bytes)
        host = available_host_bytes() if self.device.type == "cuda" else None
        return choose(size, self.device, budget=budget, host_budget=host, requested=self.memory_plan)

    @property
    def resident_keys(self) -> list[tuple]:
        return list(self._sets)

    def run(self, config: MergeConfig, objectives: list[Objective], task_paths: tuple[str, ...] = (),
            check: Callable[[], None] | None = None,
            window: Mapping[str, tuple[int, int]] | None = None) -> dict[str, float]:
        """Merge and score; ``check`` is called between the steps and may raise to abandon the trial.
        ``window``: per task, the items of a multi-fidelity rung (``Evaluator.score``)."""
        check = check or (lambda: None)
        t0 = time.perf_counter()
        resident = self._load(config, objectives, tuple(task_paths))
        self._ensure_stats(resident, config)
        check()
        t1 = time.perf_counter()
        sparsity = resident.merger.apply(resident.model, config,
                                         sparsity=any(o.kind == "sparsity" for o in objectives))
        self.last_model = resident.model
        check()
        t2 = time.perf_counter()
        scores = resident.evaluator.score(window)
        if any(o.kind == "sparsity" for o in objectives):
            scores["sparsity"] = sparsity
        self.last_timing = {"load": t1 - t0, "merge": t2 - t1, "evaluate": time.perf_counter() - t2}
        self.last_cost = Cost(resident.evaluator.items, self.last_timing["evaluate"])
        if self.on_timing:
            self.on_timing(self.last_timing)
        return scores


    def _ensure_stats(self, resident: _Resident, config: MergeConfig) -> None:
        """The calibration statistics this trial's merge reads, computed (or read from the disk cache)
        when the set has not held them yet: a study may search OBIM's saliency or calibration."""
        if any(r not in resident.merger.stats for r in readings_of(config)):
            with trusting(self.trusted_task_paths):
                stats = obim_stats(config, self.cache_dir, str(self.device), parse_dtype(config.dtype or self.dtype))
            for reading, of_experts in stats.items():
                resident.merger.add_stats(reading, of_experts)


def _model_bytes(reader: TensorReader, dtype: torch.dtype | None) -> int:
    """One copy of the checkpoint in ``dtype`` (None: as stored), from its headers alone."""
    total = 0
    for name in reader.keys():
        stored = reader.dtype(name)
        held = dtype if dtype is not None and stored.is_floating_point else stored
        total += math.prod(reader.shape(name)) * held.itemsize
    return total
