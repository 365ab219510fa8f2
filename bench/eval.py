"""Trial-time benchmark on the demo zoo: merge / evaluation / overhead per trial.

    .venv/bin/python bench/eval.py [--trials 20] [--method ties] [--samples 100]

A real server (SQLite, in a temp dir) and the worker's own loop (``Worker.run``): each trial is
leased over HTTP, merged in memory, scored by lm-eval and posted back. Overhead is the wall time
per trial that is neither merging nor evaluating (HTTP, Optuna ask/tell, database, heartbeats),
measured over the whole run.
Goal: overhead <= 5% of a trial.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

from evals.offline import set_offline

set_offline(True)

from evals.zoo import ensure_zoo  # noqa: E402
from service.client import ApiClient, HttpLeaseSource  # noqa: E402
from service.demo import demo_spec, start_server  # noqa: E402
from service.runner import TrialRunner  # noqa: E402
from service.settings import Settings  # noqa: E402
from service.worker import Worker  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--method", default="ties")
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--prefetch", action="store_true",
                        help="pipeline lease/post with the work (pays off when the server has its own cores)")
    args = parser.parse_args()
    settings = Settings()
    zoo = ensure_zoo(settings.cache_dir)
    with tempfile.TemporaryDirectory() as home:
        running = start_server(Settings(home=Path(home), cache_dir=settings.cache_dir), port=0)
        client = ApiClient(running.url, token=running.token)
        runner = TrialRunner(cache_dir=settings.cache_dir)
        worker = Worker(HttpLeaseSource(client), runner, name="bench", prefetch=args.prefetch)
        spec = demo_spec(zoo, args.trials + 1, samples=args.samples) | {"method": args.method}
        client.create_study(spec)
        assert worker.run_one(), "no trial to run"  # the first trial loads the resident models
        print(f"setup (first trial only): load base + {len(zoo.experts)} experts + evaluator "
              f"{runner.last_timing['load']:.2f} s")
        timings: list[dict[str, float]] = []
        enough = threading.Event()

        def record(timing: dict[str, float]) -> None:
            timings.append(timing)
            if len(timings) >= args.trials:
                enough.set()

        runner.on_timing = record
        stop = threading.Event()
        thread = threading.Thread(target=worker.run, args=(stop,))
        t = time.perf_counter()
        thread.start()
        enough.wait()  # no polling: a busy main thread would steal the GIL from the worker
        wall = time.perf_counter() - t
        stop.set()
        thread.join()
        client.close()
        running.stop()
    merge = statistics.mean(x["merge"] for x in timings[: args.trials])
    evaluate = statistics.mean(x["evaluate"] for x in timings[: args.trials])
    total = wall / args.trials
    overhead = total - merge - evaluate
    n_items = args.samples * len(zoo.experts)
    print(f"{args.trials} trials, method {args.method}, prefetch {'on' if args.prefetch else 'off'}, "
          f"{len(zoo.experts)} objectives x {args.samples} items ({n_items} generations per trial)")
    print(f"  merge     {merge * 1000:8.1f} ms  {100 * merge / total:5.1f} %")
    print(f"  evaluate  {evaluate * 1000:8.1f} ms  {100 * evaluate / total:5.1f} %")
    print(f"  overhead  {overhead * 1000:8.1f} ms  {100 * overhead / total:5.1f} %   (goal <= 5 %)")
    print(f"  trial     {total * 1000:8.1f} ms")


if __name__ == "__main__":
    main()
