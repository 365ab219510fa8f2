"""API load benchmark on loopback: latency percentiles and throughput of the read endpoints.

    .venv/bin/python bench/api.py [--clients 100] [--seconds 20] [--db sqlite|postgres|both]
                                  [--trials 10000] [--big 2000] [--studies 80] [--pg-url URL]
                                  [--endpoints list,get-small,pareto-small,pareto-big,trials-big]
                                  [--think 0] [--grace 10]

Per database: a fresh one (a temporary SQLite file, or a new PostgreSQL database dropped
afterwards) is migrated and seeded directly with SQLAlchemy: one team and its token, one big
study (--big completed trials, 3 objectives) and --studies smaller ones (2 to 4 objectives)
holding the rest of --trials. Scores are made up but follow each trial's parameters (an
expert's task gains from its own weight, loses from the others'; sparsity grows with all of
them), so the objectives conflict and fronts are as large as a real study's.

The server is `mmmo serve` in its own process (one uvicorn process, as shipped). Each endpoint
is first timed alone (median of 3 sequential requests), then --clients closed-loop clients
(asyncio + httpx in this process, one keep-alive connection each) send requests for --seconds,
back to back (or --think seconds apart on average), each picking one endpoint of the mix at
random:

    list          GET /api/v1/studies
    get-small     GET /api/v1/studies/{small}
    pareto-small  GET /api/v1/studies/{small}/pareto
    pareto-big    GET /api/v1/studies/{big}/pareto
    trials-big    GET /api/v1/studies/{big}/trials

Latency is from sending a request to having read its whole body, for every request started
within --seconds, errors included; throughput counts the good answers within --seconds. A
request still unanswered --grace seconds after the end is cut: its time so far counts in the
percentiles (a percentile it could move is printed with >=). Client and server share this
machine's cores, so the figures are those of the whole loopback system, not of the server alone.
Goal: p99 < 50 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

# Run as `python bench/api.py`, this file's folder comes first on sys.path and bench/search.py
# would shadow the `search` package.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import httpx  # noqa: E402
import sqlalchemy as sa  # noqa: E402

from search.space import SearchSpace  # noqa: E402
from search.spec import StudySpec  # noqa: E402
from service import auth  # noqa: E402
from service.db.migrate import upgrade  # noqa: E402
from service.db.models import Study, Trial  # noqa: E402
from service.db.session import make_engine, session_factory  # noqa: E402
from service.specs import objectives_of  # noqa: E402

GOAL_MS = 50.0
TEAM = "bench"
EXPERTS = ["math", "code", "chat", "tool"]


# -- seeding -----------------------------------------------------------------------------------


def _spec(index: int, n_objectives: int, trials: int) -> StudySpec:
    """A submitted-looking spec (directions resolved) over fake paths: reads never open them."""
    experts = EXPERTS[: max(2, n_objectives - 1)]
    objectives = [{"task": f"bench_{e}", "direction": "maximize", "samples": 100} for e in experts]
    objectives = objectives[: n_objectives - 1] + [{"kind": "sparsity", "direction": "minimize"}]
    return StudySpec.model_validate({
        "name": f"bench study {index}", "base": "/bench/models/base", "method": "ties",
        "experts": [{"name": e, "path": f"/bench/models/{e}"} for e in experts],
        "objectives": objectives, "sampler": {"name": "nsga2", "population_size": 8},
        "budget": {"trials": trials}, "seed": index})


def _values(rng: random.Random, spec: StudySpec, params: dict[str, float]) -> dict[str, float]:
    """Made-up scores that follow the parameters, as a real study's do: an expert's task improves
    with its own (weight, density) and suffers from the others'; sparsity grows with every delta."""
    experts = [e.name for e in spec.experts]
    scale = {e: params[f"{e}.weight"] * params[f"{e}.density"] for e in experts}
    out = {}
    for o in objectives_of(spec):
        if o.kind == "sparsity":
            out[o.key] = 1.0e4 * sum(scale.values())
            continue
        own = o.task.removeprefix("bench_")
        gain = 0.85 * (1 - math.exp(-3 * min(params[f"{own}.weight"] * params[f"{own}.density"] ** 0.3, 1.2)))
        loss = 0.25 * sum(v for e, v in scale.items() if e != own) / len(experts)
        out[o.key] = min(1.0, max(0.0, gain - loss + rng.gauss(0, 0.03)))
    return out


def _trial_rows(study_id: int, spec: StudySpec, count: int, rng: random.Random, start: datetime) -> list[dict]:
    space = SearchSpace(spec)
    dists = space.distributions()
    rows = []
    for number in range(count):
        params = {k: rng.uniform(d.low, d.high) for k, d in dists.items()}
        config = space.merge_config(params)
        started = start + timedelta(seconds=2 * number)
        rows.append({"study_id": study_id, "number": number, "params": params,
                     "merge_config": json.loads(json.dumps(config.to_dict())), "config_hash": config.fingerprint(),
                     "cached": False, "origin": "sampler", "state": "complete", "worker": "bench-worker",
                     "attempts": 1, "values": _values(rng, spec, params),
                     "created_at": started, "started_at": started,
                     "finished_at": started + timedelta(seconds=1.5), "duration_s": 1.5})
    return rows


@dataclass
class Seeded:
    token: str
    big: int
    small: int
    sizes: list[int]
    studies: int
    trials: int
    seconds: float


def seed(url: str, *, trials: int, big: int, studies: int, rng: random.Random) -> Seeded:
    t = time.perf_counter()
    upgrade(url)
    engine = make_engine(url)
    try:
        with session_factory(engine)() as session:
            team = auth.create_team(session, TEAM)
            token = auth.create_token(session, TEAM, user="bench").token
            sizes = [big] + [(trials - big) // studies + (i < (trials - big) % studies) for i in range(studies)]
            start = datetime(2026, 11, 1)
            ids = []
            for i, size in enumerate(sizes):
                spec = _spec(i, 3 if i == 0 else 2 + i % 3, size)
                study = Study(team_id=team.id, created_by="bench", name=spec.name, spec=spec.model_dump(mode="json"),
                              optuna_name=f"bench-{uuid.uuid4().hex}", status="done", budget=size,
                              created_at=start, finished_at=start + timedelta(seconds=2 * size))
                session.add(study)
                session.flush()
                ids.append(study.id)
                session.execute(sa.insert(Trial), _trial_rows(study.id, spec, size, rng, start))
                start += timedelta(seconds=2 * size + 60)
            session.commit()
    finally:
        engine.dispose()
    # The small study the clients read has 3 objectives, like the big one.
    return Seeded(token=token, big=ids[0], small=ids[1], sizes=sizes, studies=len(ids), trials=sum(sizes),
                  seconds=time.perf_counter() - t)


# -- databases and the server --------------------------------------------------------------------


@contextmanager
def sqlite_database():
    with tempfile.TemporaryDirectory(prefix="mmmo-bench-") as tmp:
        yield f"sqlite:///{Path(tmp) / 'mmmo.db'}"


@contextmanager
def postgres_database(admin_url: str):
    """A fresh database on the server of ``admin_url``, dropped afterwards (as tests/conftest.py does)."""
    name = f"mmmo_bench_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield sa.engine.make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    exceptions: list[str] = field(default_factory=list)  # the last line of each traceback in its log, at the end


@contextmanager
def server(url: str, keep_log: Path | None = None):
    """`mmmo serve` on a free loopback port, in its own process; its log goes to a temporary file
    (copied to ``keep_log`` at the end if given)."""
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="mmmo-bench-home-") as home:
        log = open(Path(home) / "server.log", "wb")  # noqa: SIM115 (closed below)
        proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1",
                                 "--port", str(port), "--db", url, "--home", home],
                                stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[1])
        base = f"http://127.0.0.1:{port}"
        running = Server(base)
        try:
            deadline = time.monotonic() + 120
            while True:
                if proc.poll() is not None:
                    log.flush()
                    raise RuntimeError(f"server exited with {proc.returncode}:\n"
                                       f"{(Path(home) / 'server.log').read_text()[-3000:]}")
                try:
                    if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("server did not answer /healthz within 120 s")
                time.sleep(0.2)
            yield running
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
            text = (Path(home) / "server.log").read_text(errors="replace")
            if keep_log is not None:
                keep_log.write_text(text)
            for block in text.split("Traceback (most recent call last):")[1:]:
                lines = [line for line in block.splitlines() if line and not line.startswith((" ", "INFO:"))]
                running.exceptions.append(lines[0] if lines else "?")


# -- load ------------------------------------------------------------------------------------------


ENDPOINTS = ("list", "get-small", "pareto-small", "pareto-big", "trials-big")


@dataclass
class Stats:
    latencies: list[float] = field(default_factory=list)  # seconds, answered requests
    cut: list[float] = field(default_factory=list)  # seconds so far, requests unanswered after the grace time
    in_window: int = 0  # answered within the measured seconds (the throughput)
    errors: int = 0
    failed: list[float] = field(default_factory=list)  # seconds, requests answered with an error
    bytes: int = 0
    alone: float = float("nan")  # seconds, median of sequential requests before the load


def endpoints(seeded: Seeded, names: list[str]) -> dict[str, str]:
    every = {"list": "/api/v1/studies",
             "get-small": f"/api/v1/studies/{seeded.small}",
             "pareto-small": f"/api/v1/studies/{seeded.small}/pareto",
             "pareto-big": f"/api/v1/studies/{seeded.big}/pareto",
             "trials-big": f"/api/v1/studies/{seeded.big}/trials"}
    return {name: every[name] for name in names}


async def _client(http: httpx.AsyncClient, paths: dict[str, str], stats: dict[str, Stats], rng: random.Random,
                  until: float, think: float, started: dict[int, tuple[str, float]], me: int) -> None:
    """Requests until ``until``, back to back or ``think`` seconds apart on average (exponential);
    ``started`` holds the one in flight."""
    names = list(paths)
    if think > 0:
        await asyncio.sleep(rng.uniform(0, think))  # clients do not start in step
    while time.perf_counter() < until:
        name = rng.choice(names)
        t = time.perf_counter()
        started[me] = (name, t)
        try:
            response = await http.get(paths[name])
            body = response.content
            ok = response.status_code == 200
        except httpx.HTTPError:
            ok, body = False, b""
        done = time.perf_counter()
        del started[me]
        if ok:
            stats[name].latencies.append(done - t)
            stats[name].in_window += done <= until
            stats[name].bytes += len(body)
        else:
            stats[name].errors += 1
            stats[name].failed.append(done - t)
        if think > 0:
            await asyncio.sleep(min(rng.expovariate(1 / think), max(0.0, until - time.perf_counter())))


async def load(base: str, token: str, paths: dict[str, str], *, clients: int, seconds: float, grace: float,
               think: float, seed: int) -> tuple[dict[str, Stats], dict[str, int]]:
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    stats = {name: Stats() for name in paths}
    fronts = {}
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {token}"}, limits=limits,
                                 timeout=httpx.Timeout(seconds + grace + 60)) as http:
        for name, path in paths.items():  # alone: one to warm up, then the median of 3
            response = await http.get(path)
            response.raise_for_status()
            if name.startswith("pareto"):
                fronts[name] = len(response.json()["front"])
            times = []
            for _ in range(3):
                t = time.perf_counter()
                (await http.get(path)).raise_for_status()
                times.append(time.perf_counter() - t)
            stats[name].alone = sorted(times)[1]
        started: dict[int, tuple[str, float]] = {}
        until = time.perf_counter() + seconds
        tasks = [asyncio.create_task(_client(http, paths, stats, random.Random(seed + i), until, think, started, i))
                 for i in range(clients)]
        _, pending = await asyncio.wait(tasks, timeout=seconds + grace)
        end = time.perf_counter()
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for name, t in started.values():
            stats[name].cut.append(end - t)
    return stats, fronts


# -- report ----------------------------------------------------------------------------------------


def _pct(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def _ms(seconds: float, cut: list[float]) -> str:
    """A percentile in ms; ``>=`` when a cut request counted at or below it (its true time is longer)."""
    return f"{'>=' if any(c <= seconds for c in cut) else ''}{1000 * seconds:.1f}"


def report(db: str, stats: dict[str, Stats], seconds: float) -> dict:
    print(f"{'endpoint':<14}{'alone ms':>10}{'requests':>10}{'req/s':>8}{'p50 ms':>11}{'p99 ms':>11}"
          f"{'max ms':>11}{'KiB':>7}{'cut':>5}{'errors':>7}")
    answered: list[float] = []
    cut: list[float] = []
    for name, s in stats.items():
        lat = sorted(s.latencies + s.failed + s.cut)
        answered += s.latencies + s.failed
        cut += s.cut
        kib = s.bytes / len(s.latencies) / 1024 if s.latencies else 0.0
        print(f"{name:<14}{1000 * s.alone:>10.1f}{len(s.latencies):>10}{s.in_window / seconds:>8.1f}"
              f"{_ms(_pct(lat, 0.5), s.cut):>11}{_ms(_pct(lat, 0.99), s.cut):>11}"
              f"{_ms(lat[-1] if lat else float('nan'), s.cut):>11}{kib:>7.1f}{len(s.cut):>5}{s.errors:>7}")
    everything = sorted(answered + cut)
    errors = sum(s.errors for s in stats.values())
    p50, p99 = _pct(everything, 0.5), _pct(everything, 0.99)
    rps = sum(s.in_window for s in stats.values()) / seconds
    good = sum(len(s.latencies) for s in stats.values())
    print(f"{'all':<14}{'':>10}{good:>10}{rps:>8.1f}{_ms(p50, cut):>11}"
          f"{_ms(p99, cut):>11}{_ms(everything[-1] if everything else float('nan'), cut):>11}{'':>7}"
          f"{len(cut):>5}{errors:>7}")
    print(f"{db}: p99 {_ms(p99, cut)} ms = {1000 * p99 / GOAL_MS:.1f} x the goal ({GOAL_MS:.0f} ms): "
          f"{'met' if 1000 * p99 < GOAL_MS else 'MISSED'}")
    return {"p50": _ms(p50, cut), "p99": _ms(p99, cut), "ratio": 1000 * p99 / GOAL_MS,
            "rps": rps, "errors": errors, "cut": len(cut)}


def run_one(db: str, url: str, args: argparse.Namespace) -> dict:
    seeded = seed(url, trials=args.trials, big=args.big, studies=args.studies, rng=random.Random(args.seed))
    print(f"\n== {db}: {seeded.trials} trials in {seeded.studies} studies, seeded in {seeded.seconds:.1f} s "
          f"(big study {seeded.big}: {seeded.sizes[0]} trials; small study {seeded.small}: {seeded.sizes[1]} "
          f"trials); load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with server(url, args.server_log and Path(f"{args.server_log}.{db}.log")) as running:
        stats, fronts = asyncio.run(load(running.url, seeded.token, endpoints(seeded, args.endpoints),
                                         clients=args.clients, seconds=args.seconds, grace=args.grace,
                                         think=args.think, seed=args.seed))
    if fronts:
        print("front sizes: " + ", ".join(f"{name} {size}" for name, size in fronts.items()))
    pace = f", {args.think:g} s think time" if args.think > 0 else ", back to back"
    print(f"{args.clients} clients for {args.seconds:.0f} s{pace}:")
    result = report(db, stats, args.seconds)
    if running.exceptions:  # requests cut by the client may still fail on the server afterwards
        kinds = sorted(set(running.exceptions), key=running.exceptions.count, reverse=True)
        print(f"server log: {len(running.exceptions)} exceptions, e.g. {kinds[0][:160]}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--think", type=float, default=0.0,
                        help="mean seconds a client waits between requests (default 0: back to back)")
    parser.add_argument("--grace", type=float, default=10.0,
                        help="seconds that requests started in time may take to finish before they are cut")
    parser.add_argument("--db", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--pg-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test",
                        help="a PostgreSQL server (and a database to connect to) where a fresh database is made")
    parser.add_argument("--trials", type=int, default=10_000, help="stored trials in all")
    parser.add_argument("--big", type=int, default=2_000, help="trials of the big study")
    parser.add_argument("--studies", type=int, default=80, help="smaller studies holding the other trials")
    parser.add_argument("--endpoints", default=",".join(ENDPOINTS),
                        help=f"the mix, comma-separated, from {', '.join(ENDPOINTS)}")
    parser.add_argument("--server-log", help="keep the server's log in SERVER_LOG.<db>.log")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not 0 < args.big < args.trials or args.studies < 1 or args.trials - args.big < args.studies:
        parser.error("need 0 < --big < --trials and 1 <= --studies <= --trials - --big")
    args.endpoints = [e.strip() for e in args.endpoints.split(",") if e.strip()]
    if not args.endpoints or set(args.endpoints) - set(ENDPOINTS):
        parser.error(f"--endpoints: choose from {', '.join(ENDPOINTS)}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"machine: {cores} cores usable ({os.cpu_count()} online), shared by client and server; "
          f"python {sys.version.split()[0]}")
    results = {}
    if args.db in ("sqlite", "both"):
        with sqlite_database() as url:
            results["sqlite"] = run_one("sqlite", url, args)
    if args.db in ("postgres", "both"):
        with postgres_database(args.pg_url) as url:
            results["postgres"] = run_one("postgres", url, args)
    print(f"\nsummary ({cores} cores, {args.clients} clients, {args.seconds:.0f} s, think {args.think:g} s, "
          f"{args.trials} trials, "
          f"mix {'+'.join(args.endpoints)}; goal p99 < {GOAL_MS:.0f} ms):")
    for db, r in results.items():
        print(f"  {db:<9} {r['rps']:8.1f} req/s   p50 {r['p50']} ms   p99 {r['p99']} ms ({r['ratio']:.1f} x goal)"
              f"   cut {r['cut']}   errors {r['errors']}")


if __name__ == "__main__":
    main()
