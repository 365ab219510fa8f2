"""Merge-engine benchmark: file merges against mergekit, run side by side on the same YAML, and
resident merges against a ``copy_`` floor.

    .venv/bin/python bench/merge.py [--size-gb 1.0] [--k 3] [--dtype float32|bfloat16] [--methods ...]

Writes a base and K experts: random weights of a real transformers Llama config (``config.json``
from ``LlamaConfig.save_pretrained``, tensors named and shaped as ``LlamaForCausalLM``'s, stored
in ``--dtype``; ``--size-gb`` is the model's size in float32, so both dtypes merge the same
parameters). Each expert is the base plus a small random delta.

File path, per method: one YAML, merged by mmmo (``merge_to_dir(parse_mergekit(yaml).config)``,
as ``mmmo merge`` does, in a child process) and by ``mergekit-yaml`` (0.1.5, installed in a side
environment since it pins its own dependencies: ``~/.cache/mmmo/mergekit-venv/bin/mergekit-yaml``
or ``MERGEKIT_YAML``; its rows say why where it is missing). Both are timed as whole processes
(imports included) and their peak RSS is read by a wrapper process from ``RUSAGE_CHILDREN``;
the target is (K + 2) x the largest tensor + 1 GiB. The two outputs are compared where the
method is deterministic (max |diff| over all tensors); DARE and DELLA draw their own random
masks, so theirs are not. OBIM is mmmo's (mergekit has none): resident path only.

Resident path: the models held in memory (``merging.resident.Merger``), each merge written into
a live ``LlamaForCausalLM`` by ``Merger.apply`` (as a trial does); the floor is ``copy_`` of the
base and the K experts it reads (the bytes any merge must move; SLERP reads one expert: its own
floor). Times are the minimum
over ``--resident-repeats`` (fewer where the runs so far took 15 s).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MERGEKIT = Path.home() / ".cache" / "mmmo" / "mergekit-venv" / "bin" / "mergekit-yaml"
METHODS = ["task_arithmetic", "ties", "dare_ties", "breadcrumbs", "della", "slerp", "obim"]
NOT_IN_MERGEKIT = {"obim"}
RANDOM = {"dare_ties", "dare_linear", "della", "della_linear"}  # their own random masks: no parity check
PER_EXPERT = {"task_arithmetic": {"weight": 0.5}, "ties": {"weight": 0.5, "density": 0.3},
              "dare_ties": {"weight": 0.5, "density": 0.3}, "obim": {"weight": 1.0, "density": 0.3},
              "linear": {"weight": 1.0}, "dare_linear": {"weight": 0.5, "density": 0.3},
              "breadcrumbs": {"weight": 0.5, "density": 0.3}, "della": {"weight": 0.5, "density": 0.3}}
GLOBAL = {"slerp": {"t": 0.5}}
ONE_EXPERT = {"slerp"}  # a base and exactly one other model
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# The issue's targets: resident merge time over the copy_ floor; file merges' speed-up over mergekit.
RESIDENT_TARGET = {"task_arithmetic": 1.5, "ties": 4.0, "dare_ties": 4.0, "della": 4.0, "obim": 4.0}
SPEEDUP_TARGET = {"ties": 3.0, "dare_ties": 3.0}


def llama_config(size_gb: float, dtype: str, hidden: int = 2048, vocab: int = 32000):
    """A Llama config of about ``size_gb`` in float32 (at least one layer)."""
    from transformers import LlamaConfig

    inter = int(hidden * 2.75) // 256 * 256
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    fixed = 2 * vocab * hidden + hidden
    layers = max(1, round((size_gb * 2**30 / 4 - fixed) / per_layer))
    # architectures: what mergekit picks its tensor layout by (save_pretrained of a bare config omits it)
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=max(1, hidden // 128), num_key_value_heads=max(1, hidden // 128),
                       max_position_embeddings=4096, tie_word_embeddings=False, dtype=dtype,
                       architectures=["LlamaForCausalLM"])


def model_shapes(config) -> dict[str, tuple[int, ...]]:
    """Each tensor of ``LlamaForCausalLM(config)``'s checkpoint, built on the meta device (no memory)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def write_model(path: Path, config, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, seed: int,
                base_seed: int | None, shard_bytes: int = 512 * 2**20) -> None:
    """Random weights; an expert is the base (``base_seed``) plus a small random delta."""
    path.mkdir(parents=True)
    config.save_pretrained(path)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for i, (name, shape) in enumerate(shapes.items()):
        root_seed = base_seed if base_seed is not None else seed
        tensor = torch.randn(shape, generator=torch.Generator().manual_seed(root_seed * 100_003 + i))
        if base_seed is not None:
            tensor += 0.01 * torch.randn(shape, generator=torch.Generator().manual_seed(seed * 7919 + i))
        shards[-1][name] = tensor.to(dtype)
        size += tensor.numel() * tensor.element_size()
        if size >= shard_bytes and i + 1 < len(shapes):
            shards.append({})
            size = 0
    weight_map, total = {}, 0
    for n, shard in enumerate(shards):
        file = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
        total += sum(t.numel() * t.element_size() for t in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def config_yaml(method: str, base: Path, experts: list[Path], dtype: str) -> str:
    import yaml

    doc: dict = {"merge_method": method, "base_model": str(base), "dtype": dtype}
    if method in ONE_EXPERT:
        doc["models"] = [{"model": str(base)}, {"model": str(experts[0])}]
    else:
        doc["models"] = [{"model": str(e), "parameters": PER_EXPERT[method]} for e in experts]
    if method in GLOBAL:
        doc["parameters"] = GLOBAL[method]
    return yaml.safe_dump(doc, sort_keys=False)


# ---- file path: whole processes, timed and measured by a wrapper ----

WRAPPER = """
import json, resource, subprocess, sys, time
t = time.perf_counter()
r = subprocess.run(sys.argv[1:], capture_output=True, text=True)
wall = time.perf_counter() - t
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
print(json.dumps({"rc": r.returncode, "wall": wall, "rss": rss, "out": r.stdout[-2000:], "err": r.stderr[-6000:]}))
"""

OURS = """
import sys, time
from merging.files import merge_to_dir
from merging.mergekit_yaml import parse_mergekit
plan = parse_mergekit(open(sys.argv[1]).read())
t = time.perf_counter()
merge_to_dir(plan.config, sys.argv[2], dtype=plan.dtype)
print(time.perf_counter() - t)
"""


@dataclass
class Run:
    wall: float  # the whole process, imports included
    rss: int  # its peak resident set, bytes
    out: str


def measured(cmd: list[str]) -> Run:
    """Run ``cmd`` under a wrapper whose only child it is: wall time and that child's peak RSS."""
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # both sides: the benchmark's threads
    res = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], capture_output=True, text=True, check=True,
                         cwd=ROOT, env=env)
    r = json.loads(res.stdout)
    if r["rc"] != 0:
        raise RuntimeError(f"{cmd[0]} exited {r['rc']}:\n{r['err']}")
    return Run(r["wall"], r["rss"], r["out"])


def run_ours(cfg: Path, out: Path) -> tuple[Run, float]:
    run = measured([sys.executable, "-c", OURS, str(cfg), str(out)])
    return run, float(run.out.split()[-1])


def mergekit_exe() -> tuple[str | None, str]:
    """The ``mergekit-yaml`` to compare with, or None and why not."""
    exe = os.environ.get("MERGEKIT_YAML") or str(DEFAULT_MERGEKIT)
    if not Path(exe).is_file() or not os.access(exe, os.X_OK):
        where = "MERGEKIT_YAML" if os.environ.get("MERGEKIT_YAML") else "the default side environment"
        return None, f"no executable mergekit-yaml at {exe} ({where}); set MERGEKIT_YAML"
    python = Path(exe).parent / "python"
    version = "?"
    if python.exists():
        res = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
                             capture_output=True, text=True)
        version = res.stdout.strip() or "?"
    return exe, version


def run_mergekit(exe: str, cfg: Path, out: Path) -> Run:
    return measured([exe, str(cfg), str(out), "--no-copy-tokenizer", "--quiet"])


def compare(a_dir: Path, b_dir: Path) -> str:
    """max |a - b| over every tensor of two checkpoints, and in how many entries they differ."""
    with contextlib.ExitStack() as stack:
        def handles(d: Path) -> dict:
            out = {}
            for f in sorted(d.glob("*.safetensors")):
                h = stack.enter_context(safe_open(str(f), framework="pt"))
                out.update(dict.fromkeys(h.keys(), h))
            return out

        a, b = handles(a_dir), handles(b_dir)
        if set(a) != set(b):
            return f"different tensors: {sorted(set(a) ^ set(b))[:3]}"
        worst, differ, beyond, total = 0.0, 0, 0, 0
        for name, h in a.items():
            x, y = h.get_tensor(name), b[name].get_tensor(name)
            if x.shape != y.shape or x.dtype != y.dtype:
                return f"{name}: {x.dtype} {tuple(x.shape)} against {y.dtype} {tuple(y.shape)}"
            diff = (x.float() - y.float()).abs()
            worst = max(worst, diff.max().item())
            differ += int(torch.count_nonzero(diff))
            # one unit in the last place of mergekit's value, in the checkpoint's dtype
            _, exp = torch.frexp(y.float())
            ulp = torch.exp2((exp - 1).float()).mul_(torch.finfo(y.dtype).eps)
            beyond += int(torch.count_nonzero(diff > ulp))
            total += diff.numel()
        if not differ:
            return "identical"
        return (f"max |diff| {worst:.3g}: {differ} of {total / 1e6:.0f} M entries differ, "
                f"{beyond} by more than 1 ulp")


def bench_files(root: Path, base: Path, experts: list[Path], methods: list[str], dtype: str, budget: int,
                repeats: int) -> dict[str, dict]:
    exe, version = mergekit_exe()
    print(f"\nfile path ({'mergekit-yaml ' + version + ' at ' + exe if exe else 'mergekit skipped: ' + version}; "
          f"whole processes, min of {repeats}; target peak RSS <= {budget / 2**30:.2f} GiB)")
    print(f"  {'method':16s} {'mmmo s':>7s} {'(merge)':>8s} {'mmmo RSS':>9s} {'mergekit s':>11s} {'mk RSS':>7s}"
          f" {'speed-up':>9s}  outputs")
    results: dict[str, dict] = {}
    for method in methods:
        if method in NOT_IN_MERGEKIT:
            continue
        cfg = root / f"{method}.yaml"
        cfg.write_text(config_yaml(method, base, experts, dtype))
        ours: list[tuple[Run, float]] = []
        mk: list[Run] = []
        agree = "not compared"
        for rep in range(repeats):
            ours_out, mk_out = root / f"out-{method}", root / f"mk-{method}"
            ours.append(run_ours(cfg, ours_out))
            if exe and not agree.startswith("mergekit failed"):
                try:
                    mk.append(run_mergekit(exe, cfg, mk_out))
                except RuntimeError as exc:
                    agree = f"mergekit failed: {str(exc).strip().splitlines()[-1]}"
                    print(f"  {method}: {exc}", file=sys.stderr)
                else:
                    if rep == 0:
                        agree = "random masks: not compared" if method in RANDOM else compare(ours_out, mk_out)
            shutil.rmtree(ours_out, ignore_errors=True)
            shutil.rmtree(mk_out, ignore_errors=True)
        secs = min(r.wall for r, _ in ours)
        merge_secs = min(m for _, m in ours)
        rss = max(r.rss for r, _ in ours)
        row = {"secs": secs, "merge_secs": merge_secs, "rss": rss, "agree": agree}
        if mk:
            row.update(mk_secs=min(r.wall for r in mk), mk_rss=max(r.rss for r in mk))
            mk_text = (f"{row['mk_secs']:11.1f} {row['mk_rss'] / 2**30:6.2f}G "
                       f"{row['mk_secs'] / secs:8.2f}x")
        else:
            mk_text = f"{'skipped':>11s} {'':7s} {'':9s}"
        results[method] = row
        print(f"  {method:16s} {secs:7.1f} {merge_secs:8.1f} {rss / 2**30:8.2f}G {mk_text}  {agree}", flush=True)
    return results


# ---- resident path ----

def _timed(fn, repeats: int, budget_s: float = 15.0) -> float:
    """The fastest of up to ``repeats`` runs; no further run once ``budget_s`` is spent (at least one)."""
    best, spent = math.inf, 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        took = time.perf_counter() - t
        best, spent = min(best, took), spent + took
        if spent >= budget_s:
            break
    return best


def bench_resident(base: Path, experts: list[Path], methods: list[str], repeats: int) -> dict[str, float]:
    from merging.config import ExpertRef, MergeConfig
    from merging.resident import Merger

    names = [f"e{i}" for i in range(len(experts))]
    merger = Merger.from_checkpoints(str(base), dict(zip(names, map(str, experts), strict=True)))
    held = dict(merger._experts(merger.names))  # each tensor's K expert tensors, as the merger holds them
    # the live model a trial merges into, in the held dtype (written by ``Merger.apply``, as a worker does)
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = next(iter(merger.base.values())).dtype
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base), dtype=dtype)
    model = model.to_empty(device="cpu")
    live = {n: torch.empty_like(t) for n, t in merger.base.items()}

    def copy_floor(k: int) -> None:  # read base + k experts, write as many: the bytes any merge must move
        for n, b in merger.base.items():
            live[n].copy_(b)
            for t in held[n][:k]:
                live[n].copy_(t)

    one = None
    if any(m in ONE_EXPERT for m in methods):
        one = Merger(merger.base, {"e0": {n: ts[0] for n, ts in held.items()}})  # the same tensors, no copy
    print(f"\nresident path ({str(dtype).removeprefix('torch.')} held; per merge, min of up to {repeats}; the floor, "
          f"copy_ of base + K experts, measured (min of 3) just before each method, as the load on this machine "
          f"varies)")
    print(f"  {'method':16s} {'merge s':>8s} {'floor s':>8s} {'ratio':>7s}")
    ratios: dict[str, float] = {}
    for method in methods:
        k = 1 if method in ONE_EXPERT else len(experts)
        m = one if method in ONE_EXPERT else merger
        config = MergeConfig(method=method, base=str(base), params=GLOBAL.get(method, {}),
                             experts=tuple(ExpertRef(n, str(p), PER_EXPERT.get(method, {}))
                                           for n, p in zip(names[:k], experts[:k], strict=True)))

        def merge(m=m, config=config) -> None:
            m.apply(model, config, sparsity=False)

        floor = _timed(lambda k=k: copy_floor(k), 3)
        secs = _timed(merge, repeats)
        ratios[method] = secs / floor
        target = RESIDENT_TARGET.get(method)
        note = f"target <= {target:g}x: {'met' if ratios[method] <= target else 'NOT met'}" if target else ""
        print(f"  {method:16s} {secs:8.3f} {floor:8.3f} {ratios[method]:6.1f}x  (K={k}) {note}", flush=True)
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=1.0, help="each model's size in float32")
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="what the models are stored, read and merged in (the YAML's dtype)")
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--repeats", type=int, default=1, help="file merges per method (the minimum is shown)")
    parser.add_argument("--resident-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads, here and in both merge processes (OMP_NUM_THREADS)")
    parser.add_argument("--no-files", action="store_true")
    parser.add_argument("--no-resident", action="store_true")
    args = parser.parse_args()
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    config = llama_config(args.size_gb, args.dtype, args.hidden, args.vocab)
    shapes = model_shapes(config)
    dtype = DTYPES[args.dtype]
    item = torch.empty((), dtype=dtype).element_size()
    largest = max(math.prod(s) for s in shapes.values()) * item
    with tempfile.TemporaryDirectory(prefix="mmmo-bench-") as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        write_model(root / "base", config, shapes, dtype, seed=0, base_seed=None)
        experts = []
        for k in range(args.k):
            write_model(root / f"expert{k}", config, shapes, dtype, seed=k + 1, base_seed=0)
            experts.append(root / f"expert{k}")
        n_params = sum(math.prod(s) for s in shapes.values())
        print(f"models: LlamaForCausalLM, {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
              f"{n_params / 1e6:.0f} M parameters in {args.dtype} ({n_params * item / 2**30:.2f} GiB), K={args.k}, "
              f"largest tensor {largest / 2**20:.0f} MiB; written in {time.perf_counter() - t:.0f} s; "
              f"torch threads {torch.get_num_threads()}")
        budget = (args.k + 2) * largest + 2**30
        files = {} if args.no_files else bench_files(root, root / "base", experts, args.methods, args.dtype,
                                                     budget, args.repeats)
        resident = {} if args.no_resident else bench_resident(root / "base", experts, args.methods,
                                                              args.resident_repeats)
    print("\ntargets")
    for method, target in RESIDENT_TARGET.items():
        if method in resident:
            ok = resident[method] <= target
            print(f"  resident {method}: {resident[method]:.1f}x floor, target <= {target:g}x: "
                  f"{'met' if ok else 'NOT met'}")
    for method, target in SPEEDUP_TARGET.items():
        row = files.get(method)
        if row and "mk_secs" in row:
            speedup = row["mk_secs"] / row["secs"]
            print(f"  file {method}: {speedup:.2f}x mergekit, target >= {target:g}x: "
                  f"{'met' if speedup >= target else 'NOT met'}")
    for method, row in files.items():
        ok = row["rss"] <= budget
        print(f"  file {method} peak RSS {row['rss'] / 2**30:.2f} GiB, target <= {budget / 2**30:.2f} GiB: "
              f"{'met' if ok else 'NOT met'}")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
