"""Dashboard benchmark: time for the study page of a 2,000-trial study to render in Chromium.

    .venv/bin/python bench/dashboard.py [--trials 2000] [--loads 5] [--chromium /usr/bin/chromium]

A fresh SQLite database is seeded as bench/api.py seeds it (one study, 3 objectives), `mmmo serve`
runs in its own process, and headless Chromium (Playwright) logs in and loads the study page
--loads times. Measured: from navigation start to the end of the page's first full render
(Pareto plot, hypervolume, parallel coordinates, trial table: ``window.mmmoRendered``), and the
server's share of it (the three API calls). Goal: under one second.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import statistics
import sys
from pathlib import Path

sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

_spec = importlib.util.spec_from_file_location("mmmo_bench_api", Path(__file__).with_name("api.py"))
api = importlib.util.module_from_spec(_spec)
sys.modules["mmmo_bench_api"] = api  # dataclasses look their module up there
_spec.loader.exec_module(api)

GOAL_MS = 1000.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=2000)
    parser.add_argument("--loads", type=int, default=5)
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    with api.sqlite_database() as url:
        seeded = api.seed(url, trials=args.trials + 100, big=args.trials, studies=1, rng=random.Random(0))
        with api.server(url) as running, sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{running.url}/login")
            page.fill("#token", seeded.token)
            page.click("button[type=submit]")
            page.wait_for_url(f"{running.url}/")
            totals, server = [], []
            for _ in range(args.loads + 1):  # the first load warms caches on both sides: not counted
                page.goto(f"{running.url}/studies/{seeded.big}")
                page.wait_for_function("() => window.mmmoRendered !== undefined", timeout=60_000)
                rows = page.evaluate("() => document.querySelectorAll('#trials tbody tr').length")
                assert rows == args.trials, rows
                totals.append(page.evaluate("() => window.mmmoRendered"))
                server.append(page.evaluate("() => performance.getEntriesByType('resource')"
                                            ".filter(e => e.name.includes('/api/v1/'))"
                                            ".reduce((s, e) => Math.max(s, e.responseEnd), 0)"))
            browser.close()
    totals, server = totals[1:], server[1:]
    median = statistics.median(totals)
    print(f"study page, {args.trials} trials, {args.loads} loads (headless Chromium, 2-core machine):")
    print(f"  first full render: median {median:.0f} ms (min {min(totals):.0f}, max {max(totals):.0f}); "
          f"API answers done by {statistics.median(server):.0f} ms")
    print(f"  goal {GOAL_MS:.0f} ms: {median / GOAL_MS:.2f} x the goal -> {'met' if median < GOAL_MS else 'MISSED'}")


if __name__ == "__main__":
    main()
