"""The worker: lease a trial over HTTP, merge into the resident model, evaluate, post the result.

Base, expert deltas, the live model and the evaluator stay resident between trials of the
same (base, experts, objectives); nothing is written to disk per trial.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from evals.calibration import calibration_texts
from evals.evaluator import Evaluator
from evals.objective import Objective
from merging.config import MergeConfig
from merging.locate import locate
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

    @property
    def nbytes(self) -> int:
        tensors = [*self.merger.base.values(), *(d for ds in self.merger.deltas.values() for d in ds),
                   *self.model.parameters()]
        return sum(t.numel() * t.element_size() for t in tensors)


class TrialRunner:
    """Merges and scores trials, keeping sets of models resident between trials.

    A set is the base, the expert deltas, a live model and its evaluator for one (base, experts,
    objectives). Without ``max_resident_bytes`` only the last set used stays; with it, sets stay
    until a new one needs their room, the least recently used going first.
    """

    def __init__(self, device: str = "cpu", batch_size: int | str = 64, cache_dir: Path | None = None,
                 max_resident_bytes: int | None = None) -> None:
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.cache_dir = cache_dir
        self.max_resident_bytes = max_resident_bytes
        self._sets: OrderedDict[tuple, _Resident] = OrderedDict()
        self.loads = 0  # sets loaded so far (a reload after eviction counts again)
        self.last_timing: dict[str, float] = {}  # seconds of the last trial: load, merge, evaluate
        self.on_timing: Callable[[dict[str, float]], None] | None = None  # e.g. a benchmark's recorder

    def _load(self, config: MergeConfig, objectives: list[Objective], task_paths: tuple[str, ...]) -> _Resident:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        key = (config.base, config.method == "obim", tuple(config.experts_identity()), tuple(objectives), task_paths)
        if key in self._sets:
            self._sets.move_to_end(key)
            return self._sets[key]
        if self.max_resident_bytes is None:
            self._sets.clear()  # free the previous set before loading the next
        log.info("loading base %s and %d experts", config.base, len(config.experts))
        stats = obim_stats(config, self.cache_dir, str(self.device))
        base_dir = locate(config.base)  # a clear error naming the model if this worker cannot find it
        experts = {name: str(locate(path)) for name, path in expert_dirs(config).items()}
        merger = Merger.from_checkpoints(str(base_dir), experts, stats=stats, device=self.device)
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).to(self.device).eval()
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        evaluator = Evaluator(model, tokenizer, objectives, batch_size=self.batch_size,
                              include_paths=[Path(p) for p in task_paths])
        resident = _Resident(key, merger, model, evaluator)
        self.loads += 1
        if self.max_resident_bytes is not None:
            while self._sets and sum(r.nbytes for r in self._sets.values()) + resident.nbytes > self.max_resident_bytes:
                evicted = self._sets.popitem(last=False)[1]
                log.info("evicting the resident models of %s", evicted.key[0])
        self._sets[key] = resident
        return resident

    @property
    def resident_keys(self) -> list[tuple]:
        return list(self._sets)

    def run(self, config: MergeConfig, objectives: list[Objective], task_paths: tuple[str, ...] = (),
            check: Callable[[], None] | None = None) -> dict[str, float]:
        """Merge and score; ``check`` is called between the steps and may raise to abandon the trial."""
        check = check or (lambda: None)
        t0 = time.perf_counter()
        resident = self._load(config, objectives, tuple(task_paths))
        check()
        t1 = time.perf_counter()
        resident.merger.apply(resident.model, config)
        check()
        t2 = time.perf_counter()
        scores = resident.evaluator.score()
        if any(o.kind == "sparsity" for o in objectives):
            scores["sparsity"] = resident.merger.sparsity_l1(resident.model)
        self.last_timing = {"load": t1 - t0, "merge": t2 - t1, "evaluate": time.perf_counter() - t2}
        if self.on_timing:
            self.on_timing(self.last_timing)
        return scores


def obim_stats(config: MergeConfig, cache_dir: Path | None, device: str) -> dict:
    """OBIM's calibration statistics of ``config``'s experts (cached on disk); other methods need none."""
    if config.method != "obim":
        return {}
    return stats_for(config.experts, cache_dir, device, calibration_texts)


def write_model(config: MergeConfig, out_dir: Path, *, dtype: str | None, device: str,
                cache_dir: Path | None, **kwargs) -> Path:
    """``config``'s merged model written through the merge engine's file path."""
    from merging.files import merge_to_dir

    return merge_to_dir(config, out_dir, dtype=dtype, device=device, stats=obim_stats(config, cache_dir, device),
                        **kwargs)


def materialize(config: MergeConfig, out_tar: Path, *, dtype: str | None, device: str,
                cache_dir: Path | None) -> int:
    """Write ``config``'s merged model through the merge engine's file path and pack it as a tar
    archive (safetensors do not compress: no gzip); returns the archive's size."""
    import tarfile
    import tempfile

    with tempfile.TemporaryDirectory(prefix="mmmo-materialize-") as tmp:
        model_dir = write_model(config, Path(tmp) / "model", dtype=dtype, device=device, cache_dir=cache_dir)
        with tarfile.open(out_tar, "w") as tar:
            for path in sorted(model_dir.iterdir()):
                tar.add(path, arcname=path.name)
    return out_tar.stat().st_size


class _Heartbeat:
    """Renews a lease until stopped. A refused renewal (lease lost, study cancelled) sets ``lost``:
    the work is abandoned at its next check and no result is posted."""

    def __init__(self, client: ApiClient, token: str, every: float) -> None:
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(client, token, every), name="heartbeat",
                                        daemon=True)
        self._thread.start()

    def _beat(self, client: ApiClient, token: str, every: float) -> None:
        while not self._stop.wait(every):
            try:
                client.heartbeat(token)
            except ApiError as exc:
                log.warning("lease lost: %s", exc)
                if exc.status == 409:
                    self.lost.set()
                    return
            except OSError as exc:
                log.warning("heartbeat failed: %s", exc)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class _Held:
    """A lease this worker holds, with its heartbeat running until the result is posted."""

    lease: dict[str, Any]
    heartbeat: _Heartbeat


@dataclass
class _Outcome:
    held: _Held
    values: dict[str, float] | None = None
    error: str | None = None
    done: bool = False  # nothing left to post (a job's upload was its result, or the lease was lost)


class _LeaseLost(Exception):
    pass


class Worker:
    """Leases, runs and reports trials.

    With ``prefetch``, ``run`` pipelines the HTTP round trips with the work: while trial i is
    merged and scored, a background thread posts the result of trial i-1 and leases trial i+1,
    so a worker's trials cost the merge and the evaluation, not the server's ask/tell latency.
    Leave it off where the server shares the worker's CPU cores (the in-process demo): there
    the server's work slows the evaluation more than the overlap saves.
    """

    def __init__(self, client: ApiClient, runner: TrialRunner, name: str, poll_seconds: float = 1.0,
                 prefetch: bool = True) -> None:
        self.client, self.runner, self.name = client, runner, name
        self.poll_seconds = poll_seconds
        self.prefetch = prefetch

    def _lease(self) -> _Held | None:
        lease = self.client.lease(self.name)
        if lease is None:
            return None
        every = max(lease["lease_seconds"] / 3, 0.1)
        return _Held(lease, _Heartbeat(self.client, lease["token"], every))

    def _execute(self, held: _Held) -> _Outcome:
        lease = held.lease
        if lease.get("kind") == "materialize":
            return self._materialize(held)

        def check() -> None:
            if held.heartbeat.lost.is_set():
                raise _LeaseLost

        try:
            values = self.runner.run(MergeConfig.from_dict(lease["merge_config"]),
                                     [Objective(**o) for o in lease["objectives"]], tuple(lease.get("task_paths", [])),
                                     check=check)
        except _LeaseLost:
            log.warning("trial %s of study %s abandoned: its lease was lost or the study cancelled",
                        lease["trial_number"], lease["study_id"])
            return _Outcome(held, done=True)
        except Exception as exc:  # the trial fails with its reason; the worker and the study go on
            log.warning("trial %s of study %s failed: %s", lease["trial_number"], lease["study_id"], exc)
            return _Outcome(held, error=f"{type(exc).__name__}: {exc}")
        return _Outcome(held, values=values)

    def _materialize(self, held: _Held) -> _Outcome:
        import tempfile

        lease = held.lease
        try:
            with tempfile.TemporaryDirectory(prefix="mmmo-upload-") as tmp:
                archive = Path(tmp) / "model.tar"
                materialize(MergeConfig.from_dict(lease["merge_config"]), archive,
                            dtype=lease.get("options", {}).get("dtype"), device=str(self.runner.device),
                            cache_dir=self.runner.cache_dir)
                self.client.upload_artifact(lease["token"], archive)
        except Exception as exc:  # the job fails with its reason
            log.warning("materialising trial %s of study %s failed: %s", lease["trial_number"], lease["study_id"],
                        exc)
            return _Outcome(held, error=f"{type(exc).__name__}: {exc}")
        return _Outcome(held, done=True)

    def _post(self, outcome: _Outcome) -> None:
        """Report the outcome; while the server is unreachable (a restart), keep trying for as long
        as the lease could still be valid, since a result is worth the wait."""
        lease = outcome.held.lease
        deadline = time.monotonic() + max(float(lease["lease_seconds"]), 10.0)
        try:
            while True:
                try:
                    if outcome.done:
                        pass
                    elif outcome.values is not None:
                        self.client.complete(lease["token"], outcome.values)
                    else:
                        self.client.fail(lease["token"], outcome.error or "unknown error")
                    return
                except ApiError as exc:  # a stale lease: the trial went to another worker
                    log.warning("result of trial %s refused: %s", lease["trial_number"], exc)
                    return
                except OSError as exc:
                    if time.monotonic() > deadline:
                        log.warning("result of trial %s lost, server unreachable: %s", lease["trial_number"], exc)
                        return
                    time.sleep(min(self.poll_seconds, 1.0))
        finally:
            outcome.held.heartbeat.stop()

    def run_one(self) -> bool:
        """Lease, run and report one trial, without pipelining; False if there was none."""
        held = self._lease()
        if held is None:
            return False
        self._post(self._execute(held))
        return True

    def run(self, stop: threading.Event) -> None:
        """Run trials until ``stop`` is set (the current trial is always finished and reported)."""
        if not self.prefetch:
            while not stop.is_set():
                try:
                    if not self.run_one():
                        stop.wait(self.poll_seconds)
                except (ApiError, OSError) as exc:
                    log.warning("server unreachable or refused: %s; retrying", exc)
                    stop.wait(self.poll_seconds)
            return
        upcoming: _Held | None = None
        unposted: _Outcome | None = None
        while not stop.is_set():
            try:
                current = upcoming or self._lease()
            except (ApiError, OSError) as exc:
                log.warning("server unreachable or refused: %s; retrying", exc)
                stop.wait(self.poll_seconds)
                continue
            upcoming = None
            if current is None:
                if unposted is not None:
                    self._post(unposted)
                    unposted = None
                stop.wait(self.poll_seconds)
                continue
            ahead: dict[str, _Held | None] = {}
            background = threading.Thread(target=self._post_and_prefetch, args=(unposted, ahead),
                                          name="post-and-prefetch", daemon=True)
            background.start()
            outcome = self._execute(current)
            background.join()
            upcoming, unposted = ahead.get("lease"), outcome
        if unposted is not None:
            self._post(unposted)
        if upcoming is not None:
            self._release(upcoming)

    def _post_and_prefetch(self, previous: _Outcome | None, ahead: dict[str, _Held | None]) -> None:
        if previous is not None:
            self._post(previous)
        try:
            ahead["lease"] = self._lease()
        except (ApiError, OSError) as exc:
            log.warning("could not lease ahead: %s", exc)

    def _release(self, held: _Held) -> None:
        """Hand back a lease that will not be run, so the trial goes to another worker at once."""
        held.heartbeat.stop()
        try:
            self.client.release(held.lease["token"])
        except (ApiError, OSError) as exc:
            log.warning("could not release trial %s (its lease will expire): %s", held.lease["trial_number"], exc)


def default_worker_name() -> str:
    import os
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


