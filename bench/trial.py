"""One trial on a device: the merge written into the resident live model, then its evaluation,
each beside its floor.

    .venv/bin/python bench/trial.py [--size 0.5b] [--device cpu|cuda] [--methods ...] [--trials 3]

Uses ``bench/scale.py``'s Llama-shaped bf16 set of ``--size`` (built once into its cache) and a
``TrialRunner`` on ``--device`` with the resident memory plan, as a worker runs trials. Per
method, ``--trials`` trials (weights rotate, so no trial is a cache hit) scored on perplexity
(four short texts) and sparsity; the figures are the fastest trial's merge (``Merger.apply``:
every fused per-tensor merge written into the live parameters) and evaluation. Floor: ``copy_``
of every live parameter from a same-size tensor, plus the bytes of the base and K experts read
once (as ``copy_`` into the live model: the least any merge moves).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scale  # noqa: E402  (bench/scale.py: the same sets)

PARAMS = {"task_arithmetic": {}, "ties": {"density": 0.5}, "dare_ties": {"density": 0.5},
          "obim": {"density": 0.5}, "della": {"density": 0.5}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="0.5b", choices=sorted(scale.SIZES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--methods", nargs="+", default=["task_arithmetic", "ties", "dare_ties"])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "mmmo" / "bench-scale")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = args.cache_dir.expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MMMO_DATA_ROOTS", str(root))
    base, experts, built = scale.build_set(root, args.size, args.k)
    text = root / "perplexity.txt"
    text.write_text("\n".join(scale.TEXT[i : i + 96] for i in range(0, 4 * 24, 24)) + "\n")

    from evals.objective import Objective
    from merging.config import ExpertRef, MergeConfig
    from service.runner import TrialRunner

    objectives = [Objective(kind="perplexity", data=str(text), direction="minimize", samples=None),
                  Objective(kind="sparsity", direction="minimize", samples=None)]
    runner = TrialRunner(device=args.device, batch_size=8, trusted_task_paths=[], memory_plan="resident")
    names = [f"e{i}" for i in range(args.k)]
    print(f"{args.size} set, K={args.k}, bf16, device {args.device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if args.device.startswith('cuda') else ''}; "
          f"built in {built:.0f} s" if built else f"{args.size} set, K={args.k}, bf16, device {args.device}")
    print(f"  {'method':16s} {'merge s':>8s} {'floor s':>8s} {'x floor':>8s} {'eval s':>8s}  (fastest of "
          f"{args.trials} trials; the first compiles the kernels)")
    for method in args.methods:
        best_merge = best_eval = math.inf
        for trial in range(args.trials):
            weights = [round(0.3 + 0.2 * ((i + trial) % args.k), 2) for i in range(args.k)]
            config = MergeConfig(method=method, base=str(base), experts=tuple(
                ExpertRef(n, str(p), {"weight": w, **PARAMS.get(method, {})})
                for n, p, w in zip(names, experts, weights, strict=True)))
            runner.run(config, objectives)
            best_merge = min(best_merge, runner.last_timing["merge"])
            best_eval = min(best_eval, runner.last_timing["evaluate"])
        floor = _floor(runner.last_model, args.k)
        print(f"  {method:16s} {best_merge:8.3f} {floor:8.3f} {best_merge / floor:7.1f}x {best_eval:8.3f}", flush=True)


def _floor(model: torch.nn.Module, k: int) -> float:
    """``copy_`` into every live parameter from K + 1 same-size tensors (fastest of three)."""
    params = list(model.parameters())
    with torch.no_grad():
        sources = [[p.detach().clone() for p in params] for _ in range(k + 1)]
        best = math.inf
        for _ in range(3):
            _sync(params[0].device)
            t = time.perf_counter()
            for src in sources:
                for p, s in zip(params, src, strict=True):
                    p.copy_(s)
            _sync(params[0].device)
            best = min(best, time.perf_counter() - t)
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    main()
