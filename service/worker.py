"""The one worker loop: lease -> run (``runner``) -> report, over a ``LeaseSource``.

``mmmo worker`` leases over HTTP (``client.HttpLeaseSource``); ``mmmo study run`` leases from an
in-process queue (``local.LocalLeaseSource``). Both get the same heartbeats, the same abandoning
of a trial whose lease was lost, and the same reporting of failures.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from evals.objective import Objective
from merging.config import MergeConfig
from merging.errors import IncompatibleCheckpoints
from service.lease_source import Cost, Lease, LeaseLost, LeaseSource, Refused
from service.materialize import materialize

if TYPE_CHECKING:
    from service.runner import TrialRunner

log = logging.getLogger(__name__)


class _Heartbeat:
    """Renews a lease until stopped. A refused renewal (lease lost, study stopped) sets ``lost``:
    the work is abandoned at its next check and no result is posted."""

    def __init__(self, source: LeaseSource, token: str, every: float, lease_seconds: float,
                 memory: Callable[[], str | None] = lambda: None) -> None:
        self.lost = threading.Event()
        self.lease_seconds = lease_seconds
        self.renewed_at = time.monotonic()  # granted just now: good for lease_seconds from here
        self._stop = threading.Event()
        self._memory = memory
        self._thread = threading.Thread(target=self._beat, args=(source, token, every), name="heartbeat",
                                        daemon=True)
        self._thread.start()

    def expires_in(self) -> float:
        """Seconds the lease is still held for, as far as this worker knows (its last renewal)."""
        return self.renewed_at + self.lease_seconds - time.monotonic()

    def _beat(self, source: LeaseSource, token: str, every: float) -> None:
        while not self._stop.wait(every):
            try:
                sent = time.monotonic()
                source.heartbeat(token, memory=self._memory())
                self.renewed_at = sent
            except LeaseLost as exc:
                log.warning("lease lost: %s", exc)
                self.lost.set()
                return
            except (Refused, OSError) as exc:
                log.warning("heartbeat failed: %s", exc)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class _Held:
    """A lease this worker holds, with its heartbeat running until the result is posted."""

    lease: Lease
    heartbeat: _Heartbeat


@dataclass
class Outcome:
    lease: Lease
    values: dict[str, float] | None = None
    error: str | None = None
    fatal: bool = False  # the study itself cannot run
    load_failure: bool = False  # this worker could not load the study's models (a few such fail the study)
    cost: Cost | None = None  # with values: what scoring them took
    done: bool = False  # nothing left to post (a job's upload was its result, or the lease was lost)


@dataclass
class _Pending:
    held: _Held
    outcome: Outcome


class Worker:
    """Leases, runs and reports trials and materialise jobs.

    With ``prefetch``, ``run`` pipelines the round trips with the work: while trial i is merged
    and scored, a background thread posts the result of trial i-1 and leases trial i+1, so a
    worker's trials cost the merge and the evaluation, not the server's ask/tell latency. Leave it
    off where the server shares the worker's CPU cores (the in-process demo and ``study run``):
    there the server's work slows the evaluation more than the overlap saves.

    ``retry_seconds`` is the first wait before posting a result again after the server could not
    take it (unreachable, or a 5xx); each wait doubles, up to ``max_retry_seconds``.
    """

    def __init__(self, source: LeaseSource, runner: TrialRunner, name: str, poll_seconds: float = 1.0,
                 prefetch: bool = True, on_outcome: Callable[[Outcome], None] | None = None,
                 retry_seconds: float = 0.5, max_retry_seconds: float = 30.0) -> None:
        self.source, self.runner, self.name = source, runner, name
        self.poll_seconds = poll_seconds
        self.prefetch = prefetch
        self.on_outcome = on_outcome
        self.retry_seconds, self.max_retry_seconds = retry_seconds, max_retry_seconds

    def memory(self) -> str | None:
        """The runner's memory plan of the last set it loaded (one line), for the workers page."""
        return getattr(self.runner, "placement_summary", None)

    def _lease(self) -> _Held | None:
        lease = self.source.lease(self.name, memory=self.memory())
        if lease is None:
            return None
        every = max(lease.lease_seconds / 3, 0.1)
        return _Held(lease, _Heartbeat(self.source, lease.token, every, lease.lease_seconds, self.memory))

    def _execute(self, held: _Held) -> Outcome:
        from service.runner import SetLoadError  # torch and lm-eval: imported with the runner, not before

        lease = held.lease
        if lease.kind == "materialize":
            return self._materialize(lease)

        def check() -> None:
            if held.heartbeat.lost.is_set():
                raise LeaseLost

        try:
            values = self.runner.run(MergeConfig.from_dict(lease.merge_config),
                                     [Objective(**o) for o in lease.objectives], tuple(lease.task_paths), check=check,
                                     window=lease.window)
        except LeaseLost:
            log.warning("trial %s of study %s abandoned: its lease was lost or the study stopped",
                        lease.trial_number, lease.study_id)
            return Outcome(lease, done=True)
        except IncompatibleCheckpoints as exc:
            log.warning("study %s cannot run: %s", lease.study_id, exc)
            return Outcome(lease, error=f"the study's models cannot be merged: {exc}", fatal=True)
        except SetLoadError as exc:  # the server fails the study after a few identical ones
            log.warning("trial %s of study %s failed, the models could not be loaded: %s", lease.trial_number,
                        lease.study_id, exc)
            return Outcome(lease, error=str(exc), load_failure=True)
        except Exception as exc:  # the trial fails with its reason; the worker and the study go on
            log.warning("trial %s of study %s failed: %s", lease.trial_number, lease.study_id, exc)
            return Outcome(lease, error=f"{type(exc).__name__}: {exc}")
        return Outcome(lease, values=values, cost=self.runner.last_cost)

    def _materialize(self, lease: Lease) -> Outcome:
        try:
            with tempfile.TemporaryDirectory(prefix="mmmo-upload-") as tmp:
                archive = Path(tmp) / "model.tar"
                materialize(MergeConfig.from_dict(lease.merge_config), archive, dtype=lease.options.get("dtype"),
                            device=str(self.runner.device), cache_dir=self.runner.cache_dir)
                self.source.upload(lease.token, archive)
        except Exception as exc:  # the job fails with its reason
            log.warning("materialising trial %s of study %s failed: %s", lease.trial_number, lease.study_id, exc)
            return Outcome(lease, error=f"{type(exc).__name__}: {exc}")
        return Outcome(lease, done=True)

    def _report(self, outcome: Outcome) -> None:
        lease = outcome.lease
        if outcome.done:
            return
        if outcome.values is not None:
            self.source.complete(lease.token, outcome.values, outcome.cost)
        else:
            self.source.fail(lease.token, outcome.error or "unknown error", fatal=outcome.fatal,
                             load_failure=outcome.load_failure)

    def _post(self, pending: _Pending) -> None:
        """Report the outcome. While the server cannot take it (unreachable, or a 5xx while it
        restarts behind a proxy), keep trying with growing waits for as long as the lease may
        still be held (its last renewal plus its lease time), since a result is worth the wait.
        Only a lost lease (409, 404: the trial went to another worker) or a refusal (a malformed
        result) ends it sooner."""
        outcome, heartbeat = pending.outcome, pending.held.heartbeat
        wait = self.retry_seconds
        try:
            while True:
                try:
                    self._report(outcome)
                    break
                except LeaseLost as exc:
                    log.warning("result of trial %s refused, its lease was lost: %s", outcome.lease.trial_number, exc)
                    break
                except Refused as exc:
                    log.warning("result of trial %s refused: %s", outcome.lease.trial_number, exc)
                    break
                except OSError as exc:
                    left = heartbeat.expires_in()
                    if left <= 0 or heartbeat.lost.is_set():
                        log.warning("result of trial %s lost: the server did not take it before its lease ran "
                                    "out: %s", outcome.lease.trial_number, exc)
                        break
                    log.warning("result of trial %s not taken (%s); trying again in %.1f s",
                                outcome.lease.trial_number, exc, min(wait, left))
                    time.sleep(min(wait, left))
                    wait = min(2 * wait, self.max_retry_seconds)
        finally:
            heartbeat.stop()
        if self.on_outcome:
            self.on_outcome(outcome)

    def run_one(self) -> bool:
        """Lease, run and report one piece of work, without pipelining; False if there was none."""
        held = self._lease()
        if held is None:
            return False
        self._post(_Pending(held, self._execute(held)))
        return True

    def run(self, stop: threading.Event, *, until_idle: bool = False) -> None:
        """Run work until ``stop`` is set (the current trial is always finished and reported), or,
        with ``until_idle``, until there is none left."""
        if not self.prefetch:
            while not stop.is_set():
                try:
                    if not self.run_one():
                        if until_idle:
                            return
                        stop.wait(self.poll_seconds)
                except (Refused, OSError) as exc:
                    log.warning("server unreachable or refused: %s; retrying", exc)
                    stop.wait(self.poll_seconds)
            return
        upcoming: _Held | None = None
        unposted: _Pending | None = None
        while not stop.is_set():
            try:
                current = upcoming or self._lease()
            except (Refused, OSError) as exc:
                log.warning("server unreachable or refused: %s; retrying", exc)
                stop.wait(self.poll_seconds)
                continue
            upcoming = None
            if current is None:
                if unposted is not None:
                    self._post(unposted)
                    unposted = None
                    continue  # posting may have made new work (the next trial of a study)
                if until_idle:
                    return
                stop.wait(self.poll_seconds)
                continue
            ahead: dict[str, _Held | None] = {}
            background = threading.Thread(target=self._post_and_prefetch, args=(unposted, ahead),
                                          name="post-and-prefetch", daemon=True)
            background.start()
            outcome = self._execute(current)
            background.join()
            upcoming, unposted = ahead.get("lease"), _Pending(current, outcome)
        if unposted is not None:
            self._post(unposted)
        if upcoming is not None:
            self._release(upcoming)

    def _post_and_prefetch(self, previous: _Pending | None, ahead: dict[str, _Held | None]) -> None:
        if previous is not None:
            self._post(previous)
        try:
            ahead["lease"] = self._lease()
        except (Refused, OSError) as exc:
            log.warning("could not lease ahead: %s", exc)

    def _release(self, held: _Held) -> None:
        """Hand back a lease that will not be run, so the work goes to another worker at once."""
        held.heartbeat.stop()
        try:
            self.source.release(held.lease.token)
        except (LeaseLost, Refused, OSError) as exc:
            log.warning("could not release trial %s (its lease will expire): %s", held.lease.trial_number, exc)


def default_worker_name() -> str:
    import os
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"
