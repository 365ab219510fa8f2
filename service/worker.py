"""The worker: lease a trial over HTTP, merge into the resident model, evaluate, post the result.

Base, expert deltas, the live model and the evaluator stay resident between trials of the
same (base, experts, objectives); nothing is written to disk per trial.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from evals.evaluator import Evaluator
from evals.objective import Objective
from merging.config import MergeConfig
from merging.resident import Merger, expert_dirs
from merging.saliency import stats_for
from service.client import ApiClient, ApiError

log = logging.getLogger(__name__)


@dataclass
class _Resident:
    key: tuple
    merger: Merger
    model: Any
    evaluator: Evaluator


class TrialRunner:
    """Merges and scores trials, keeping one resident set of models (the last one used)."""

    def __init__(self, device: str = "cpu", batch_size: int | str = 64, cache_dir: Path | None = None) -> None:
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.cache_dir = cache_dir
        self._resident: _Resident | None = None
        self.last_timing: dict[str, float] = {}  # seconds of the last trial: load, merge, evaluate

    def _load(self, config: MergeConfig, objectives: list[Objective]) -> _Resident:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        key = (config.base, config.method == "obim", tuple(config.experts_identity()), tuple(objectives))
        if self._resident is not None and self._resident.key == key:
            return self._resident
        self._resident = None  # free the previous set before loading the next
        log.info("loading base %s and %d experts", config.base, len(config.experts))
        stats = stats_for(config.experts, self.cache_dir, str(self.device)) if config.method == "obim" else None
        merger = Merger.from_checkpoints(config.base, expert_dirs(config), stats=stats)
        model = AutoModelForCausalLM.from_pretrained(config.base, dtype=torch.float32).to(self.device).eval()
        tokenizer = AutoTokenizer.from_pretrained(config.base)
        evaluator = Evaluator(model, tokenizer, objectives, batch_size=self.batch_size)
        self._resident = _Resident(key, merger, model, evaluator)
        return self._resident

    def run(self, config: MergeConfig, objectives: list[Objective]) -> dict[str, float]:
        t0 = time.perf_counter()
        resident = self._load(config, objectives)
        t1 = time.perf_counter()
        resident.merger.apply(resident.model, config)
        t2 = time.perf_counter()
        scores = resident.evaluator.score()
        if any(o.kind == "sparsity" for o in objectives):
            scores["sparsity"] = resident.merger.sparsity_l1(resident.model)
        self.last_timing = {"load": t1 - t0, "merge": t2 - t1, "evaluate": time.perf_counter() - t2}
        return scores


class _Heartbeat:
    """Renews a lease until stopped; a refused renewal is logged (the result will be refused too)."""

    def __init__(self, client: ApiClient, token: str, every: float) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(client, token, every), name="heartbeat",
                                        daemon=True)

    def _beat(self, client: ApiClient, token: str, every: float) -> None:
        while not self._stop.wait(every):
            try:
                client.heartbeat(token)
            except (ApiError, OSError) as exc:
                log.warning("heartbeat failed: %s", exc)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class Worker:
    def __init__(self, client: ApiClient, runner: TrialRunner, name: str, poll_seconds: float = 1.0,
                 on_trial: Callable[[dict], None] | None = None) -> None:
        self.client, self.runner, self.name = client, runner, name
        self.poll_seconds = poll_seconds
        self.on_trial = on_trial

    def run_one(self) -> bool:
        """Lease and run one trial; False if there was none to run."""
        lease = self.client.lease(self.name)
        if lease is None:
            return False
        config = MergeConfig.from_dict(lease["merge_config"])
        objectives = [Objective(**o) for o in lease["objectives"]]
        with _Heartbeat(self.client, lease["token"], every=max(lease["lease_seconds"] / 3, 0.1)):
            try:
                values = self.runner.run(config, objectives)
            except Exception as exc:  # the trial fails with its reason; the worker and the study go on
                log.warning("trial %s failed: %s", lease["trial_number"], exc)
                result = self.client.fail(lease["token"], f"{type(exc).__name__}: {exc}")
            else:
                result = self.client.complete(lease["token"], values)
        if self.on_trial:
            self.on_trial(result)
        return True

    def run(self, stop: threading.Event) -> None:
        """Run trials until ``stop`` is set (the current trial is always finished first)."""
        while not stop.is_set():
            try:
                if not self.run_one():
                    stop.wait(self.poll_seconds)
            except (ApiError, OSError) as exc:
                log.warning("server unreachable or refused: %s; retrying", exc)
                stop.wait(self.poll_seconds)


def default_worker_name() -> str:
    import os
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


