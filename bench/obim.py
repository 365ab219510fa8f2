"""OBIM against the task-arithmetic family, and OBIM's variants against each other, on the demo
zoo and on a zoo of longer-trained experts (``evals.zoo.LONG_RECIPE``: larger deltas, more
interference, the regime OBIM's paper targets).

    .venv/bin/python bench/obim.py [--zoos demo long] [--configs NAME ...] [--trials 60]
                                   [--seeds 5] [--samples 100] [--results FILE] [--fresh]

Every configuration runs a whole study (``mmmo study run``'s path, in-process, temporary SQLite
database) per zoo and seed (0 .. seeds-1) at the same budget, with the default sampler (NSGA-II,
population 10, 10 start-up trials as in ``bench/search.py``), 4 objectives (exact match per task on
``--samples`` items). Baselines: task_arithmetic (weight [0, 1.5]), ties and dare_ties (weight
[0, 1.5], density [0.1, 1], normalize false), della (weight [0, 1.5], density [0.15, 0.85]:
epsilon 0.1 keeps density +- epsilon strictly inside (0, 1), normalize false, lambda 1). OBIM
(weight [0, 3], density [0.05, 1], each expert calibrated on its own task's train split) in its
default reading and one change at a time: saliency obs / magnitude, granularity row / global,
rescale, calibration shared / both (a shared text, the experts' calibration documents interleaved
round-robin, written beside the results).

Each finished (zoo, config, seed) run is appended to ``--results`` (jsonl: every completed trial's
values, wall seconds); runs already there are skipped, so the bench resumes and extends
(``--fresh`` ignores the file). Per zoo it prints: front hypervolume against the origin (mean, sd
over seeds), the knee's mean score (``search.pareto.knee_point``, the default selection), and the
share of a config's front points dominated by the union of the other configs' fronts of the same
seed; then which OBIM variant is best and whether it reaches the best of task_arithmetic, ties
and dare_ties. Configs without every requested seed are listed as incomplete.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
# Run as `python bench/obim.py`, this file's folder comes first on sys.path and `bench/search.py`
# would shadow the `search` package.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != _HERE]


def _bench_search():
    """``bench/search.py`` as a module (its folder is not a package; it sets offline mode)."""
    spec = importlib.util.spec_from_file_location("bench_search", _HERE / "search.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench_search = _bench_search()

from evals.texts import read_calibration_texts  # noqa: E402
from evals.zoo import LONG_RECIPE, Zoo, ZooRecipe, ensure_zoo  # noqa: E402
from search.pareto import hypervolume, knee_point, pareto_front  # noqa: E402
from search.spec import StudySpec  # noqa: E402
from service.runner import TrialRunner  # noqa: E402
from service.services import Services  # noqa: E402
from service.settings import Settings  # noqa: E402

ZOOS: dict[str, ZooRecipe] = {"demo": ZooRecipe(), "long": LONG_RECIPE}

_TA_SPACE = {"weight": {"low": 0.0, "high": 1.5}, "density": None}
_TIES_SPACE = {"weight": {"low": 0.0, "high": 1.5}, "density": {"low": 0.1, "high": 1.0}}
_OBIM_SPACE = {"weight": {"low": 0.0, "high": 3.0}, "density": {"low": 0.05, "high": 1.0}}

# name -> (method, method_params, search space)
CONFIGS: dict[str, tuple[str, dict, dict]] = {
    "task_arithmetic": ("task_arithmetic", {}, _TA_SPACE),
    "ties": ("ties", {"normalize": False}, _TIES_SPACE),
    "dare_ties": ("dare_ties", {"normalize": False}, _TIES_SPACE),
    # epsilon is per expert in DELLA (a global value is every expert's default); the merge refuses
    # density - epsilon <= 0 or density + epsilon >= 1, hence [0.15, 0.85]
    "della": ("della", {"normalize": False, "epsilon": 0.1, "lambda": 1.0},
              {"weight": {"low": 0.0, "high": 1.5}, "density": {"low": 0.15, "high": 0.85}}),
    "obim": ("obim", {}, _OBIM_SPACE),
    "obim-obs": ("obim", {"saliency": "obs"}, _OBIM_SPACE),
    "obim-magnitude": ("obim", {"saliency": "magnitude"}, _OBIM_SPACE),
    "obim-row": ("obim", {"granularity": "row"}, _OBIM_SPACE),
    "obim-global": ("obim", {"granularity": "global"}, _OBIM_SPACE),
    "obim-rescale": ("obim", {"rescale": True}, _OBIM_SPACE),
    "obim-shared": ("obim", {"calibration": "shared"}, _OBIM_SPACE),
    "obim-both": ("obim", {"calibration": "both"}, _OBIM_SPACE),
    # the best single changes of the screen (seed 0), combined
    "obim-row-rescale": ("obim", {"granularity": "row", "rescale": True}, _OBIM_SPACE),
    "obim-row-saliency-order": ("obim", {"granularity": "row", "order": "saliency"}, _OBIM_SPACE),
}
BASELINES = ("task_arithmetic", "ties", "dare_ties")
SHARED_TEXTS = 256  # documents in the shared calibration text


def definition(config: str) -> str:
    """A digest of what a config runs, so a changed definition does not reuse older results."""
    blob = json.dumps(CONFIGS[config], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def shared_calibration(zoo: Zoo, cache: Path) -> Path:
    """The experts' calibration documents taken round-robin (the base was trained on their mix),
    ``SHARED_TEXTS`` of them, as jsonl ``{"text": ...}``; written once per zoo."""
    out = cache / f"bench-obim-calibration-{zoo.root.name}.jsonl"
    if not out.exists():
        per_expert = [read_calibration_texts(zoo.calibration[n], limit=SHARED_TEXTS) for n in zoo.experts]
        mixed = [texts[i] for i in range(max(map(len, per_expert))) for texts in per_expert if i < len(texts)]
        tmp = out.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps({"text": t}) + "\n" for t in mixed[:SHARED_TEXTS]))
        tmp.rename(out)
    return out


def spec_for(zoo: Zoo, config: str, *, trials: int, samples: int, seed: int, cache: Path) -> StudySpec:
    method, params, space = CONFIGS[config]
    body = {
        "name": f"bench-obim {config} {zoo.root.name} {seed}", "base": str(zoo.base), "method": method,
        "method_params": params,
        "experts": [{"name": n, "path": str(p)} | ({"calibration": str(zoo.calibration[n])} if method == "obim" else {})
                    for n, p in zoo.experts.items()],
        "search_space": space,
        "objectives": [{"task": t, "samples": samples} for n in zoo.experts for t in zoo.expert_tasks[n]],
        # the default sampler, at bench/search.py's population and start-up
        "sampler": bench_search._sampler("nsga2"),
        "budget": {"trials": trials}, "seed": seed}
    if params.get("calibration") in ("shared", "both"):
        body["calibration"] = str(shared_calibration(zoo, cache))
    spec = StudySpec.model_validate(body)
    return spec.model_copy(update={"reference_point": {o.key: 0.0 for o in spec.objectives}})


def run_key(row: dict) -> tuple:
    return (row["zoo"], row["zoo_dir"], row["config"], row["definition"], row["seed"], row["trials"], row["samples"])


def load_results(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by a killed run
    return rows


def report(zoo_name: str, zoo: Zoo, rows: list[dict], configs: list[str], seeds: int) -> None:
    dirs = ["maximize"] * len(zoo.experts)
    origin = [0.0] * len(zoo.experts)
    runs: dict[str, dict[int, list[list[float]]]] = {c: {} for c in configs}
    for row in rows:
        if row["config"] in runs and row["seed"] < seeds:
            runs[row["config"]][row["seed"]] = row["values"]
    complete = [c for c in configs if len(runs[c]) == seeds]
    print(f"\nzoo {zoo_name} ({zoo.root.name}): {len(zoo.experts)} objectives, {seeds} seeds, "
          "hypervolume against the origin")
    print(f"  {'config':16s} {'HV mean':>8s} {'HV sd':>7s} {'knee mean score':>16s} {'dominated by others':>20s} "
          f"{'front':>6s} {'fail':>5s} {'min/run':>8s}")
    fronts = {c: {s: [v[i] for i in pareto_front(v, dirs)] for s, v in runs[c].items()} for c in complete}
    hv_mean, knee_mean = {}, {}
    for c in complete:
        hvs = [hypervolume(runs[c][s], origin, dirs) for s in range(seeds)]
        knees = [statistics.mean(runs[c][s][knee_point(runs[c][s], dirs)]) for s in range(seeds) if runs[c][s]]
        shares, sizes = [], []
        for s in range(seeds):
            front = fronts[c][s]
            others = [p for o in complete if o != c for p in fronts[o][s]]
            kept = set(pareto_front(front + others, dirs))
            shares.append(sum(i not in kept for i in range(len(front))) / len(front) if front else 1.0)
            sizes.append(len(front))
        mine = [r for r in rows if r["config"] == c and r["seed"] < seeds]
        failed = sum(r["trials"] - len(r["values"]) for r in mine)
        minutes = statistics.mean(r["seconds"] for r in mine) / 60
        hv_mean[c], knee_mean[c] = statistics.mean(hvs), statistics.mean(knees) if knees else float("nan")
        sd = statistics.stdev(hvs) if len(hvs) > 1 else 0.0
        print(f"  {c:16s} {hv_mean[c]:8.3f} {sd:7.3f} {knee_mean[c]:16.3f} {statistics.mean(shares):19.0%} "
              f"{statistics.mean(sizes):6.1f} {failed:5d} {minutes:8.1f}")
    incomplete = [f"{c} ({len(runs[c])} of {seeds} seeds)" for c in configs if c not in complete]
    if incomplete:
        print("  incomplete: " + ", ".join(incomplete))
    variants = [c for c in complete if CONFIGS[c][0] == "obim"]
    baselines = [c for c in complete if c in BASELINES]
    if variants:
        best = max(variants, key=hv_mean.__getitem__)
        line = f"  best OBIM variant: {best} (HV {hv_mean[best]:.3f}, knee {knee_mean[best]:.3f})"
        if baselines:
            rival = max(baselines, key=hv_mean.__getitem__)
            verdict = ">=" if hv_mean[best] >= hv_mean[rival] else "<"
            line += (f"; {verdict} the best of {'/'.join(baselines)}: {rival} (HV {hv_mean[rival]:.3f}, "
                     f"knee {knee_mean[rival]:.3f})")
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoos", nargs="*", default=list(ZOOS), choices=list(ZOOS))
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0, help="run seeds first-seed .. seeds-1 (split the "
                        "work between processes; the tables read every seed in --results)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); two "
                        "one-thread processes on disjoint seeds use two cores better than one")
    parser.add_argument("--samples", type=int, default=100)
    cache = Settings().cache_dir
    parser.add_argument("--results", type=Path, default=cache / "bench-obim.jsonl")
    parser.add_argument("--fresh", action="store_true", help="ignore (and append after) the runs in --results")
    parser.add_argument("--report-only", action="store_true", help="print the tables of --results, run nothing")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    seen = set() if args.fresh else {run_key(r) for r in load_results(args.results)}
    zoos = {name: ensure_zoo(cache, ZOOS[name]) for name in args.zoos}
    mine: list[dict] = []  # this invocation's runs (with --fresh, the only ones reported)
    if not args.report_only:
        with tempfile.TemporaryDirectory() as home:
            services = Services.start(Settings(home=Path(home), cache_dir=cache))
            runner = TrialRunner(cache_dir=cache)
            try:
                for seed in range(args.first_seed, args.seeds):  # seeds outermost: every config gets seed 0 first
                    for zoo_name, zoo in zoos.items():
                        for config in args.configs:
                            row = {"zoo": zoo_name, "zoo_dir": zoo.root.name, "config": config,
                                   "definition": definition(config), "seed": seed, "trials": args.trials,
                                   "samples": args.samples}
                            if run_key(row) in seen:
                                continue
                            try:
                                spec = spec_for(zoo, config, trials=args.trials, samples=args.samples, seed=seed,
                                                cache=cache)
                                start = time.perf_counter()
                                values = bench_search.run_study(services, runner, spec)
                            except Exception as exc:  # a variant the code does not take yet: go on
                                print(f"{zoo_name} {config} seed {seed}: failed: {type(exc).__name__}: "
                                      f"{str(exc)[:300]}", flush=True)
                                continue
                            if not values:  # every trial failed (a parameter the merge refuses): not a result
                                print(f"{zoo_name} {config} seed {seed}: no trial completed; not recorded", flush=True)
                                continue
                            row |= {"seconds": round(time.perf_counter() - start, 1), "values": values}
                            with args.results.open("a") as out:
                                out.write(json.dumps(row) + "\n")
                            seen.add(run_key(row))
                            mine.append(row)
                            print(f"{zoo_name} {config} seed {seed}: {len(values)} of {args.trials} trials in "
                                  f"{row['seconds']:.0f} s", flush=True)
            finally:
                services.close()
    rows = mine if args.fresh else load_results(args.results)
    for zoo_name, zoo in zoos.items():
        keep = [r for r in rows if r["zoo"] == zoo_name and r["zoo_dir"] == zoo.root.name
                and r["trials"] == args.trials and r["samples"] == args.samples
                and r["config"] in CONFIGS and r["definition"] == definition(r["config"])]
        report(zoo_name, zoo, keep, args.configs, args.seeds)


if __name__ == "__main__":
    main()
