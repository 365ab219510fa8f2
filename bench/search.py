"""Search benchmark on the demo zoo: hypervolume after N trials per sampler, and whose front
dominates among merge methods at equal budget.

    .venv/bin/python bench/search.py [--trials 60] [--seeds 5] [--samples 100]

Each finished (setup, sampler, seed) run is appended to ``--results`` (jsonl) and not run again:
split the seeds between processes with ``--first-seed`` and print the tables with ``--report-only``.

Samplers: per-expert task-arithmetic scales in [0, 1.5], 4 objectives (exact match per task),
hypervolume against the origin (as in the issue's reference figures). Methods: OBIM, TIES and
DARE-TIES with the sampler given by --method-sampler, each front's hypervolume and the share of
its points dominated by the other methods' fronts. Runs whole studies in-process (`mmmo study
run`'s path) on a temporary SQLite database.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

# Run as `python bench/search.py`, this file's folder comes first on sys.path and its own name
# would shadow the `search` package.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from evals.offline import set_offline  # noqa: E402

set_offline(True)

from evals.zoo import ensure_zoo  # noqa: E402
from search.pareto import hypervolume, hypervolume_trace, knee_point, pareto_front  # noqa: E402
from search.space import SearchSpace  # noqa: E402
from search.spec import StudySpec  # noqa: E402
from service import local  # noqa: E402
from service.runner import TrialRunner  # noqa: E402
from service.services import Services  # noqa: E402
from service.settings import Settings  # noqa: E402


def spec_for(zoo, *, method: str, sampler: str, trials: int, samples: int, seed: int,
             reference: bool = True, fidelity: str | None = None, genome: int = 0) -> StudySpec:
    space = {"task_arithmetic": {"weight": {"low": 0.0, "high": 1.5}, "density": None},
             "ties": {"weight": {"low": 0.0, "high": 1.5}, "density": {"low": 0.1, "high": 1.0}},
             "dare_ties": {"weight": {"low": 0.0, "high": 1.5}, "density": {"low": 0.1, "high": 1.0}},
             "obim": {"weight": {"low": 0.0, "high": 3.0}, "density": {"low": 0.05, "high": 1.0}}}[method]
    spec = StudySpec.model_validate({
        "name": f"bench {method} {sampler} {seed}", "base": str(zoo.base), "method": method,
        "method_params": {"normalize": False} if method in ("ties", "dare_ties") else {},
        "experts": [{"name": n, "path": str(p), "calibration": str(zoo.calibration[n])}
                    for n, p in zoo.experts.items()],
        "search_space": space,
        "objectives": [{"task": t, "samples": samples} for n in zoo.experts for t in zoo.expert_tasks[n]],
        "sampler": _sampler(sampler),
        "budget": {"trials": trials}, "seed": seed}
        | ({"fidelity": dict(zip(("min_samples", "eta"), map(int, fidelity.split(":")), strict=True))}
           if fidelity else {}))
    if genome:  # mergekit-evolve's layer groups x filters: per expert, weight and density per group
        spec = StudySpec.model_validate(spec.model_dump() | {"search_space": spec.search_space.model_dump() | {
            "layer_groups": genome, "filters": ["self_attn", "mlp"],
            "num_layers": json.loads((Path(zoo.base) / "config.json").read_text())["num_hidden_layers"]}})
    # the hypervolume this benchmark reports, for the samplers that aim at the study's own
    origin = {o.key: 0.0 for o in spec.objectives}
    return spec.model_copy(update={"reference_point": origin}) if reference else spec


def _sampler(text: str) -> dict:
    """``name`` or ``name:key=value,key=value`` (e.g. ``nsga2:warmup_trials=0``)."""
    name, _, extra = text.partition(":")
    spec: dict = {"name": name, "population_size": 10, "n_startup_trials": 10}
    for item in filter(None, extra.split(",")):
        key, value = item.split("=")
        spec[key] = int(value) if value.isdigit() else {"true": True, "false": False}.get(value, value)
    return spec


def run_study(services: Services, runner: TrialRunner, spec: StudySpec, dump: Path | None = None) -> list[list[float]]:
    """Every full-fidelity result's values, in the order they completed."""
    return [values for values, _, _ in run_costed(services, runner, spec, dump)]


def run_costed(services: Services, runner: TrialRunner, spec: StudySpec,
               dump: Path | None = None) -> list[tuple[list[float] | None, int, float]]:
    """Per completed trial in the order it finished: its full-fidelity values (None for one that
    stopped on a lower rung), and the items and evaluation seconds it cost."""
    final = local.run(services, local.create(services, spec), runner)
    keys = [o["key"] for o in final["objectives"]]
    top = spec.ladder().top if spec.ladder() else None
    done = sorted((t for t in final["trials"] if t["state"] == "complete"), key=lambda t: t["finished_at"])
    if dump:  # every evaluated point, for offline study of the landscape
        with dump.open("a") as out:
            for t in done:
                out.write(json.dumps({"study": spec.name, "params": t["params"],
                                      "values": [t["values"][k] for k in keys]}) + "\n")
    return [([t["values"][k] for k in keys] if t.get("rung") == top else None, t.get("items") or 0,
             t.get("eval_seconds") or 0.0) for t in done]


def _recorded(path: Path, key: dict) -> dict[int, list]:
    """The runs of ``key``'s setup already in ``path``, by seed."""
    if not path.exists():
        return {}
    records = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return {r["seed"]: r["run"] for r in records if r["key"] == key}


def cost_curve(runs: list[list[tuple[list[float] | None, int, float]]], origin: list[float], dirs: list[str],
               marks: list[int]) -> list[float]:
    """Mean over seeds of the hypervolume reached once ``mark`` items had been evaluated, per mark."""
    out = []
    for mark in marks:
        hvs = []
        for run in runs:
            spent, reached = 0, []
            for values, items, _ in run:
                spent += items
                if spent > mark:
                    break
                if values is not None:
                    reached.append(values)
            hvs.append(hypervolume(reached, origin, dirs) if reached else 0.0)
        out.append(statistics.mean(hvs))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--samplers", nargs="*", default=["nsga2", "nsga2:warmup_trials=0", "mmmo-bo", "random"])
    parser.add_argument("--methods", nargs="*", default=["obim", "ties", "dare_ties"])
    parser.add_argument("--method-sampler", default="mmmo-bo")
    parser.add_argument("--curve", type=int, default=0,
                        help="also print each sampler's hypervolume after every CURVE trials (e.g. 60 at 300 trials)")
    parser.add_argument("--no-reference", action="store_true",
                        help="leave the specs' reference point unset (samplers then use their own)")
    parser.add_argument("--dump", type=Path, help="append every evaluated trial (params, values) to this jsonl")
    parser.add_argument("--fidelity", help="MIN:ETA: also run the first sampler with multi-fidelity trials "
                        "(e.g. 25:4) and print hypervolume against evaluated items beside the others'")
    parser.add_argument("--fidelity-sampler", help="the sampler --fidelity runs (default: the first of --samplers)")
    parser.add_argument("--fidelity-trials", type=int, default=0, help="configurations the multi-fidelity run "
                        "may propose (default 3 x --trials: it stops most of them early)")
    parser.add_argument("--genome", type=int, default=0, metavar="LAYERS", help="search per group of LAYERS layers "
                        "and per filter (self_attn, mlp, the other tensors) with TIES: the high-dimensional genome")
    parser.add_argument("--first-seed", type=int, default=0)
    cache = Settings().cache_dir
    parser.add_argument("--results", type=Path, default=cache / "bench-search.jsonl")
    parser.add_argument("--report-only", action="store_true", help="print the tables of --results, run nothing")
    args = parser.parse_args()
    zoo = ensure_zoo(cache)
    with tempfile.TemporaryDirectory() as home:
        services = Services.start(Settings(home=Path(home), cache_dir=cache))
        runner = TrialRunner(cache_dir=cache)
        dirs = ["maximize"] * len(zoo.experts)
        origin = [0.0] * len(zoo.experts)
        seeds = range(args.first_seed, args.first_seed + args.seeds)
        method = "ties" if args.genome else "task_arithmetic"
        dims = len(SearchSpace(spec_for(zoo, method=method, sampler="random", trials=1, samples=1, seed=0,
                                        genome=args.genome)).distributions())
        print(f"samplers: {method}, {dims} dimensions, {len(zoo.experts)} objectives, {args.trials} trials, "
              f"seeds {seeds.start}-{seeds.stop - 1}, {args.samples} samples, hypervolume against the origin")
        print(f"  {'sampler':22s} {'HV mean':>8s} {'HV sd':>7s} {'best mean score':>16s} {'knee mean score':>16s}")
        costed: dict[str, list] = {}
        runs = [(s, None) for s in args.samplers] + (
            [(args.fidelity_sampler or args.samplers[0], args.fidelity)] if args.fidelity else [])
        for sampler, fidelity in runs:
            hvs, bests, knees, curves = [], [], [], []
            label = sampler + (f" mf {fidelity}" if fidelity else "")
            costed[label] = []
            trials = (args.fidelity_trials or 3 * args.trials) if fidelity else args.trials
            key = {"zoo": zoo.root.name, "sampler": sampler, "fidelity": fidelity, "trials": trials,
                   "samples": args.samples, "genome": args.genome, "reference": not args.no_reference}
            done = _recorded(args.results, key)
            for seed in seeds:
                if seed not in done:
                    if args.report_only:
                        continue
                    spec = spec_for(zoo, method=method, sampler=sampler, trials=trials, samples=args.samples,
                                    seed=seed, reference=not args.no_reference, fidelity=fidelity,
                                    genome=args.genome)
                    done[seed] = run_costed(services, runner, spec, args.dump)
                    with args.results.open("a") as out:
                        out.write(json.dumps({"key": key, "seed": seed, "run": done[seed]}) + "\n")
                run = done[seed]
                costed[label].append(run)
                values = [v for v, _, _ in run if v is not None]
                hvs.append(hypervolume(values, origin, dirs))
                bests.append(max(sum(v) / len(v) for v in values))
                knees.append(statistics.mean(values[knee_point(values, dirs)]))  # the default selection
                curves.append(hypervolume_trace(values, origin, dirs))
            if not hvs:
                print(f"  {label:22s} (no runs recorded)")
                continue
            sd = statistics.stdev(hvs) if len(hvs) > 1 else 0.0
            items = statistics.mean(sum(i for _, i, _ in run) for run in costed[label])
            seconds = statistics.mean(sum(s for _, _, s in run) for run in costed[label])
            print(f"  {label:22s} {statistics.mean(hvs):8.3f} {sd:7.3f} {statistics.mean(bests):16.3f} "
                  f"{statistics.mean(knees):16.3f}  ({items:.0f} items, {seconds:.0f} s evaluating; "
                  f"seeds {', '.join(f'{h:.3f}' for h in hvs)})")
            if args.curve:
                marks = range(args.curve, args.trials + 1, args.curve)
                print("    hypervolume after " + ", ".join(
                    f"{n}: {statistics.mean(c[min(n, len(c)) - 1] for c in curves):.3f}" for n in marks))

        if costed:
            most = max(sum(i for _, i, _ in run) for runs_ in costed.values() for run in runs_)
            marks = [round(most * f / 10) for f in range(1, 11)]
            print("hypervolume against evaluated items (mean over seeds), at " + ", ".join(map(str, marks)))
            for label, runs_ in costed.items():
                print(f"  {label:22s} " + " ".join(f"{h:.3f}" for h in cost_curve(runs_, origin, dirs, marks)))
        fronts = {}
        for method in [] if args.report_only else args.methods:
            values = run_study(services, runner, spec_for(zoo, method=method, sampler=args.method_sampler,
                                                          trials=args.trials, samples=args.samples, seed=0))
            fronts[method] = [values[i] for i in pareto_front(values, dirs)]
        if fronts:
            print(f"methods ({args.method_sampler}, {args.trials} trials, seed 0)")
            print(f"  {'method':10s} {'HV':>7s} {'front':>6s} {'dominated by others':>20s}")
        for method, front in fronts.items():
            others = [p for m, f in fronts.items() if m != method for p in f]
            union = front + others
            kept = set(pareto_front(union, dirs))
            dominated = sum(i not in kept for i in range(len(front)))
            print(f"  {method:10s} {hypervolume(front, origin, dirs):7.3f} {len(front):6d} "
                  f"{dominated:>13d} of {len(front)}")
        services.close()


if __name__ == "__main__":
    main()
