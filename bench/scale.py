"""Scale benchmark: a worker's resident set of Llama-shaped bf16 models, per memory plan.

    .venv/bin/python bench/scale.py [--sizes 0.5b,1.1b] [--plans auto,resident,files] [--k 3]

Builds each size's set (base + K experts, random weights, sharded safetensors, a character
tokenizer) once into ``--cache-dir`` (default ``~/.cache/mmmo/bench-scale``). Each (size, plan)
then runs in a fresh process: a TrialRunner with that memory plan runs ``--trials`` (2) TIES
trials scored on perplexity (a small text file) and sparsity, and reports peak RSS (its anonymous
and file-backed parts, and its peak in each trial's load, merge and evaluation, sampled every
20 ms), the first trial's load, the last trial's merge and evaluation, and the floor of a merge:
``copy_`` of every live parameter from a same-size tensor (writing the model once). ``auto``
runs first and the explicit plan it chose is not run again.

Targets: resident (and host, which on a CPU holds the same bytes) peak RSS <= (K + 2) x one
model's bytes + 1.5 GiB; files <= 2 x one model's bytes + 1.5 GiB; the 1.1 B set completes
with the default plan (``auto``) on a 24 GiB machine. Also printed: what 8 B and 70 B sets need
in each plan on 80 GB and 141 GB GPUs, on paper (``merging.placement.SetSize``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import torch

GiB = 2**30
SLACK = 1.5 * GiB  # the targets' allowance beyond the set's model copies
# Llama shapes (untied embeddings, grouped-query attention, 32,000-token vocabulary) of about the
# named size; 1.1b is TinyLlama-1.1B's shape. ``tiny`` is for trying the script out.
SIZES: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 8000},
    "0.5b": {"hidden_size": 1536, "intermediate_size": 4096, "num_hidden_layers": 16, "num_attention_heads": 12,
             "num_key_value_heads": 4, "vocab_size": 32000},
    "1.1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
             "num_key_value_heads": 4, "vocab_size": 32000},
}
INIT_STD = 0.02  # the matrices' init (Llama's initializer_range); norms are 1
EXPERT_DELTA = 0.02  # an expert is the base plus this fraction of the base's RMS, per tensor
SHARD_BYTES = GiB
FORMAT = 1  # bump when the files a set holds change: cached sets of another format are rebuilt
# On-paper sets: parameters of Llama-3 8B and 70B; GPU memory as nvidia-smi reports it.
PAPER_MODELS = {"8 B": 8.03e9, "70 B": 70.6e9}
PAPER_GPUS = {"80 GB (H100)": 81_559 * 2**20, "141 GB (H200)": 143_771 * 2**20}
TEXT = ("the quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun. "
        "a merge of three experts is scored on perplexity and on how far it moves from its base. ")


# ---------------------------------------------------------------- building the sets

def llama_config(size: str):
    from transformers import LlamaConfig

    return LlamaConfig(**SIZES[size], tie_word_embeddings=False, max_position_embeddings=2048, dtype="bfloat16")


def shapes_of(size: str) -> dict[str, tuple[int, ...]]:
    """The checkpoint's tensor names and shapes, from a model on the meta device (no memory)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(size))
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _seed(name: str, model: int) -> int:
    return zlib.crc32(name.encode()) * 31 + model


def _base_tensor(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    if len(shape) == 1:
        return torch.ones(shape)
    return torch.randn(shape, generator=torch.Generator().manual_seed(_seed(name, 0))).mul_(INIT_STD)


def _write_model(path: Path, size: str, shapes: dict[str, tuple[int, ...]], model: int, base_dir: Path | None) -> None:
    """Model ``model`` (0: the base) as sharded bf16 safetensors with an index, its config and a
    tokenizer. An expert reads the base's tensors from ``base_dir`` and adds a seeded delta."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from evals.tokenizer import build_char_tokenizer

    path.mkdir(parents=True)
    llama_config(size).save_pretrained(path)
    build_char_tokenizer().save_pretrained(path)
    base_files: dict[str, str] = {}
    if base_dir is not None:
        base_files = json.loads((base_dir / "model.safetensors.index.json").read_text())["weight_map"]
    n_shards = max(1, math.ceil(sum(math.prod(s) * 2 for s in shapes.values()) / SHARD_BYTES))
    shard: dict[str, torch.Tensor] = {}
    size_now, index, weight_map = 0, 0, {}

    def flush() -> None:
        nonlocal shard, size_now, index
        if shard:
            file = f"model-{index + 1:05d}-of-{n_shards:05d}.safetensors"
            save_file(shard, str(path / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file))
            shard, size_now, index = {}, 0, index + 1

    for name, shape in shapes.items():
        if base_dir is None:
            tensor = _base_tensor(name, shape).to(torch.bfloat16)
        else:
            with safe_open(str(base_dir / base_files[name]), "pt") as f:
                base = f.get_tensor(name).float()
            rms = base.pow(2).mean().sqrt()
            noise = torch.randn(shape, generator=torch.Generator().manual_seed(_seed(name, model)))
            tensor = base.add_(noise.mul_(EXPERT_DELTA * rms)).to(torch.bfloat16)
        if size_now and size_now + tensor.numel() * 2 > SHARD_BYTES:
            flush()
        shard[name] = tensor
        size_now += tensor.numel() * 2
    flush()
    if index != n_shards:  # the names in the files say "of N": rename to the count written
        for file in sorted(set(weight_map.values())):
            fixed = file.replace(f"-of-{n_shards:05d}", f"-of-{index:05d}")
            (path / file).rename(path / fixed)
            weight_map = {k: fixed if v == file else v for k, v in weight_map.items()}
    total = sum(math.prod(s) * 2 for s in shapes.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))


def build_set(root: Path, size: str, k: int) -> tuple[Path, list[Path], float | None]:
    """The set under ``root/size`` (built unless a complete one is there): base, experts, seconds
    spent building (None: cached). A marker written last tells a complete set from a half-built one."""
    directory = root / size
    marker = directory / "complete.json"
    spec = {"format": FORMAT, "shape": SIZES[size], "k": k, "init_std": INIT_STD, "expert_delta": EXPERT_DELTA}
    base, experts = directory / "base", [directory / f"expert{i}" for i in range(k)]
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return base, experts, None
    shutil.rmtree(directory, ignore_errors=True)
    t = time.perf_counter()
    shapes = shapes_of(size)
    _write_model(base, size, shapes, 0, None)
    for i, expert in enumerate(experts):
        _write_model(expert, size, shapes, i + 1, base)
    marker.write_text(json.dumps(spec))
    return base, experts, time.perf_counter() - t


def n_params(size: str) -> int:
    return sum(math.prod(s) for s in shapes_of(size).values())


# ---------------------------------------------------------------- one (size, plan), in a child

class _RssSampler(threading.Thread):
    """Peaks of VmRSS and of its anonymous and file-backed parts (/proc/self/status), sampled
    every 20 ms, per phase: where ru_maxrss's peak comes from and what it is made of."""

    KEYS = ("VmRSS", "RssAnon", "RssFile")

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peaks: dict[str, dict[str, int]] = {}
        self.phase = "imports"
        self.stopped = threading.Event()

    def now(self) -> dict[str, int]:
        found = {}
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in self.KEYS:
                    found[key] = int(value.split()[0]) * 1024
        except OSError:
            pass
        return found

    def sample(self) -> None:
        peak = self.peaks.setdefault(self.phase, dict.fromkeys(self.KEYS, 0))
        for key, value in self.now().items():
            peak[key] = max(peak[key], value)

    def enter(self, phase: str) -> None:
        self.sample()
        self.phase = phase
        self.sample()

    def run(self) -> None:
        while not self.stopped.wait(0.02):
            self.sample()


def child(args: argparse.Namespace) -> None:
    from evals.evaluator import Evaluator
    from evals.objective import Objective
    from merging.config import ExpertRef, MergeConfig
    from merging.resident import Merger
    from service.runner import TrialRunner

    sampler = _RssSampler()
    sampler.start()
    base, experts = args.child_base, args.child_experts.split(",")
    names = [f"e{i}" for i in range(len(experts))]

    def ties(weights: list[float]) -> MergeConfig:
        return MergeConfig(method="ties", base=base, experts=tuple(
            ExpertRef(n, p, {"weight": w, "density": 0.5}) for n, p, w in zip(names, experts, weights, strict=True)))

    objectives = [Objective(kind="perplexity", data=args.child_text, direction="minimize", samples=None),
                  Objective(kind="sparsity", direction="minimize", samples=None)]
    runner = TrialRunner(device="cpu", batch_size=8, trusted_task_paths=[], memory_plan=args.child_plan)
    falling = [(len(experts) - i) / len(experts) for i in range(len(experts))]  # 1, 2/3, 1/3 for K = 3
    trial = 0

    def phased(fn, phase: str):  # the sampler's phase follows the runner's steps
        def wrapper(*a, **kw):
            sampler.enter(f"{phase} {trial}")
            try:
                return fn(*a, **kw)
            finally:
                sampler.enter(f"rest {trial}")
        return wrapper

    Merger.apply = phased(Merger.apply, "merge")
    Evaluator.score = phased(Evaluator.score, "eval")
    imports = sampler.now().get("VmRSS", 0)
    t = time.perf_counter()
    timings = []
    for trial in range(1, args.child_trials + 1):
        sampler.enter(f"load {trial}")
        scores = runner.run(ties(falling[trial - 1:] + falling[: trial - 1]), objectives)
        timings.append(dict(runner.last_timing))
    wall = time.perf_counter() - t
    sampler.enter("after")
    sampler.stopped.set()
    steady = sampler.now().get("VmRSS", 0)
    phases = {name: p["VmRSS"] for name, p in sampler.peaks.items()}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # before the floor's extra copy
    placement = getattr(runner, "placement", None)
    params = [p for p in runner.last_model.parameters()]
    with torch.no_grad():
        sources = [p.detach().clone() for p in params]  # written, so the floor reads real pages
        floor = math.inf
        for _ in range(3):
            t = time.perf_counter()
            for p, s in zip(params, sources, strict=True):
                p.copy_(s)
            floor = min(floor, time.perf_counter() - t)
    print(json.dumps({
        "plan": placement.kind.value if placement is not None else None,
        "summary": runner.placement_summary,
        "peak_rss": peak, "peak_anon": max(p["RssAnon"] for p in sampler.peaks.values()),
        "peak_file": max(p["RssFile"] for p in sampler.peaks.values()), "rss_imports": imports,
        "rss_steady": steady, "phases": phases, "merges": [round(t["merge"], 2) for t in timings],
        "load": timings[0]["load"], "merge": timings[-1]["merge"], "evaluate": timings[-1]["evaluate"],
        "floor": floor, "wall": wall,
        "live_bytes": sum(p.numel() * p.element_size() for p in params),
        "live_dtype": str(params[0].dtype).removeprefix("torch."), "scores": scores,
    }))


def measure(plan: str, base: Path, experts: list[Path], text: Path, root: Path, trials: int) -> dict:
    """Runs one (size, plan) in a fresh process; its figures, or {"error": ...}."""
    env = {**os.environ, "MMMO_DATA_ROOTS": str(root), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TQDM_DISABLE": "1"}
    cmd = [sys.executable, __file__, "--child-trials", str(trials), "--child-plan", plan, "--child-base", str(base),
           "--child-experts", ",".join(map(str, experts)), "--child-text", str(text)]
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parent.parent)
    took = time.perf_counter() - t
    if res.returncode != 0:
        tail = (res.stderr.strip().splitlines() or [""])[-1][:200]
        why = "killed (out of memory?)" if res.returncode in (-9, 137) else f"exit {res.returncode}"
        return {"error": f"{why}: {tail}", "process": took}
    return json.loads(res.stdout.strip().splitlines()[-1]) | {"process": took}


# ---------------------------------------------------------------- tables

def target_bytes(plan: str, model_bytes: int, k: int) -> float:
    copies = 2 if plan == "files" else k + 2
    return copies * model_bytes + SLACK


def print_row(size: str, asked: str, r: dict, model_bytes: int, k: int) -> None:
    label = asked if asked != "auto" else f"auto -> {r.get('plan') or '?'}"
    if "error" in r:
        print(f"  {size:5s} {label:17s} FAILED after {r['process']:.0f} s: {r['error']}")
        return
    plan = r["plan"] or asked
    target = target_bytes(plan, model_bytes, k)
    ok = "ok" if r["peak_rss"] <= target else "OVER"
    print(f"  {size:5s} {label:17s} {r['peak_rss'] / GiB:6.2f} <= {target / GiB:5.2f} {ok:4s} "
          f"{r['peak_anon'] / GiB:5.2f}/{r['peak_file'] / GiB:5.2f} {r['load']:7.1f} {r['merge']:7.2f} "
          f"{r['floor']:6.3f} {r['merge'] / r['floor']:6.1f}x {r['evaluate']:7.2f} {r['process']:6.0f}")
    peaks = r["phases"]
    per_trial = ", ".join(
        f"{i}: " + "/".join(f"{peaks[f'{ph} {i}'] / GiB:.2f}" if f"{ph} {i}" in peaks else "-"
                            for ph in ("load", "merge", "eval"))
        for i in range(1, len(r["merges"]) + 1))
    print(f"        RSS GiB: {r['rss_imports'] / GiB:.2f} after imports; peaks by trial, load/merge/eval: {per_trial}; "
          f"{r['rss_steady'] / GiB:.2f} after")
    print(f"        merges {r['merges']} s; {r['summary']}")


def paper_table(k: int) -> None:
    from merging.placement import PlanKind, SetSize

    print(f"\non paper: bf16, K={k}; device bytes + headroom (max(1 GiB, 10% of a model)) vs the GPU's memory; "
          "N = GPUs a tensor-parallel set needs (device bytes / N + headroom each); spare GiB per GPU")
    gpus = "  ".join(f"{g:>20s}" for g in PAPER_GPUS)
    print(f"  {'model':5s} {'plan':9s} {'device GiB':>10s} {'host GiB':>9s}  {gpus}")
    for model, params in PAPER_MODELS.items():
        size = SetSize(int(params * 2), k)
        for kind in PlanKind:
            dev, host = size.needs(kind)
            cells = []
            for gpu in PAPER_GPUS.values():
                n = next((n for n in (1, 2, 4, 8, 16, 32) if dev / n + size.headroom <= gpu), None)
                spare = gpu - dev / (n or 1) - size.headroom
                cells.append(f"fits, {spare / GiB:.1f} spare" if n == 1 else f"N={n}, {spare / GiB:.1f} spare" if n
                             else "no")
            cells_text = "  ".join(f"{c:>20s}" for c in cells)
            print(f"  {model:5s} {kind.value:9s} {dev / GiB:10.1f} {host / GiB:9.1f}  {cells_text}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="0.5b,1.1b", help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--plans", default="auto,resident,files", help="comma-separated: auto, resident, host, files")
    parser.add_argument("--k", type=int, default=3, help="experts")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "mmmo" / "bench-scale")
    parser.add_argument("--paper-only", action="store_true", help="only the on-paper table")
    parser.add_argument("--trials", type=int, default=2, help="trials per (size, plan); merge and eval: the last")
    for name in ("plan", "base", "experts", "text", "trials"):
        parser.add_argument(f"--child-{name}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_plan:
        args.child_trials = int(args.child_trials)
        child(args)
        return
    if args.paper_only:
        paper_table(args.k)
        return
    sizes, plans = args.sizes.split(","), args.plans.split(",")
    for s in sizes:
        if s not in SIZES:
            parser.error(f"unknown size {s!r}")
    root = args.cache_dir.expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    text = root / "perplexity.txt"
    text.write_text("\n".join(TEXT[i : i + 96] for i in range(0, 4 * 24, 24)) + "\n")  # 4 texts of 96 chars
    started = time.perf_counter()
    print(f"peak RSS GiB vs target ((K+2) or 2 model copies + 1.5 GiB), its anonymous / file-backed parts "
          f"(sampled peaks); load: first trial; merge and eval: the last of {args.trials} trials (TIES, K={args.k}); "
          "floor: copy_ of every live parameter")
    for size in sizes:
        base, experts, built = build_set(root, size, args.k)
        count = n_params(size)
        model_bytes = count * 2
        print(f"\n{size}: {count / 1e9:.3f} B parameters, {model_bytes / GiB:.2f} GiB in bf16; set "
              + (f"built in {built:.0f} s" if built is not None else "cached") + f" under {root / size}")
        print(f"  {'size':5s} {'plan':17s} {'peak RSS (target)':>20s} {'anon/file':>11s} {'load s':>7s} "
              f"{'merge s':>7s} {'floor':>6s} {'x floor':>7s} {'eval s':>7s} {'proc s':>6s}")
        done: set[str] = set()
        for plan in sorted(plans, key=lambda p: p != "auto"):
            if plan in done:
                continue
            r = measure(plan, base, experts, text, root, args.trials)
            done.add(plan)
            if plan == "auto" and r.get("plan"):
                done.add(r["plan"])
            print_row(size, plan, r, model_bytes, args.k)
            if "error" not in r and r["live_dtype"] != "bfloat16":
                print(f"        note: the live model is {r['live_dtype']}, not the checkpoint's bfloat16")
    paper_table(args.k)
    print(f"\nbenchmark took {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
