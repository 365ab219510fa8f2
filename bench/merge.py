"""Merge-engine benchmark: file path (wall time, peak RSS) per method, mergekit if available,
and the resident path against the memory floor.

    .venv/bin/python bench/merge.py [--size-gb 1.0] [--k 3] [--methods task_arithmetic ties dare_ties obim]

mergekit is compared when MERGEKIT_YAML names a `mergekit-yaml` executable (installed in a side
environment: it pins its own dependencies); otherwise its rows print 'skipped'.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

PER_EXPERT = {"task_arithmetic": {"weight": 0.5}, "ties": {"weight": 0.5, "density": 0.3},
              "dare_ties": {"weight": 0.5, "density": 0.3}, "obim": {"weight": 1.0, "density": 0.3},
              "linear": {"weight": 1.0}, "dare_linear": {"weight": 0.5, "density": 0.3},
              "breadcrumbs": {"weight": 0.5, "density": 0.3}, "della": {"weight": 0.5, "density": 0.3}}


def llama_shapes(size_gb: float, hidden: int = 2048, vocab: int = 32000) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a Llama-like float32 model of about ``size_gb``."""
    inter = int(hidden * 2.75) // 256 * 256
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    fixed = 2 * vocab * hidden + hidden
    layers = max(1, round((size_gb * 2**30 / 4 - fixed) / per_layer))
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}"
        for proj in ("q", "k", "v", "o"):
            shapes[f"{p}.self_attn.{proj}_proj.weight"] = (hidden, hidden)
        shapes[f"{p}.mlp.gate_proj.weight"] = (inter, hidden)
        shapes[f"{p}.mlp.up_proj.weight"] = (inter, hidden)
        shapes[f"{p}.mlp.down_proj.weight"] = (hidden, inter)
        shapes[f"{p}.input_layernorm.weight"] = (hidden,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (hidden,)
    return shapes


def write_model(path: Path, shapes: dict[str, tuple[int, ...]], seed: int, base_seed: int | None,
                shard_bytes: int = 512 * 2**20) -> None:
    """Random weights; an expert is the base (``base_seed``) plus a small random delta."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    shard, size, n, weight_map = {}, 0, 0, {}

    def flush() -> None:
        nonlocal shard, size, n
        if shard:
            name = f"model-{n:05d}.safetensors"
            save_file(shard, str(path / name))
            weight_map.update(dict.fromkeys(shard, name))
            shard, size, n = {}, 0, n + 1

    for i, (name, shape) in enumerate(shapes.items()):
        root_seed = base_seed if base_seed is not None else seed
        base = torch.randn(shape, generator=torch.Generator().manual_seed(root_seed * 100_003 + i))
        if base_seed is not None:
            base += 0.01 * torch.randn(shape, generator=torch.Generator().manual_seed(seed * 7919 + i))
        shard[name] = base
        size += base.numel() * 4
        if size >= shard_bytes:
            flush()
    flush()
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def config_yaml(method: str, base: Path, experts: list[Path]) -> str:
    import yaml

    doc = {"merge_method": method, "base_model": str(base), "dtype": "float32",
           "models": [{"model": str(e), "parameters": PER_EXPERT[method]} for e in experts]}
    return yaml.safe_dump(doc)


CHILD = """
import resource, sys, time
from merging.files import merge_to_dir
from merging.mergekit_yaml import parse_mergekit
plan = parse_mergekit(open(sys.argv[1]).read())
t = time.perf_counter()
merge_to_dir(plan.config, sys.argv[2], dtype=plan.dtype)
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def run_ours(cfg: Path, out: Path) -> tuple[float, int]:
    res = subprocess.run([sys.executable, "-c", CHILD, str(cfg), str(out)], capture_output=True, text=True,
                         check=True)
    secs, rss = res.stdout.split()
    return float(secs), int(rss)


def run_mergekit(cfg: Path, out: Path) -> tuple[float, int] | None:
    exe = os.environ.get("MERGEKIT_YAML")
    if not exe:
        return None
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.perf_counter()
    subprocess.run([exe, str(cfg), str(out), "--lazy-unpickle"], check=True, capture_output=True)
    secs = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return secs, max(after, before) * 1024  # children's max: exact when mergekit is the largest child


def bench_resident(base: Path, experts: list[Path], methods: list[str], repeats: int = 3) -> None:
    from merging.config import ExpertRef, MergeConfig
    from merging.resident import Merger

    names = [f"e{i}" for i in range(len(experts))]
    merger = Merger.from_checkpoints(str(base), dict(zip(names, map(str, experts), strict=True)))
    live = {n: torch.empty_like(t) for n, t in merger.base.items()}
    deltas = {n: merger.deltas_of(n) for n in merger.base}
    inputs = [merger.base] + [{n: d[i] for n, d in deltas.items()} for i in range(len(experts))]
    t = time.perf_counter()
    for _ in range(repeats):
        for source in inputs:  # read base + K deltas, write as many: the bytes any merge must move
            for n, tensor in source.items():
                live[n].copy_(tensor)
    floor = (time.perf_counter() - t) / repeats
    print(f"\nresident path (per merge, {len(experts)} experts, floor = copy_ of base + K deltas: {floor:.3f} s)")
    for method in methods:
        config = MergeConfig(method=method, base=str(base),
                             experts=tuple(ExpertRef(n, str(p), PER_EXPERT[method])
                                           for n, p in zip(names, experts, strict=True)))
        t = time.perf_counter()
        for _ in range(repeats):
            for n, merged in merger.merged_tensors(config):
                live[n].copy_(merged)
        secs = (time.perf_counter() - t) / repeats
        print(f"  {method:16s} {secs:8.3f} s   {secs / floor:6.1f}x floor")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=["task_arithmetic", "ties", "dare_ties", "obim"])
    parser.add_argument("--no-resident", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    shapes = llama_shapes(args.size_gb)
    largest = max(torch.Size(s).numel() for s in shapes.values()) * 4
    with tempfile.TemporaryDirectory(prefix="mmmo-bench-") as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        write_model(root / "base", shapes, seed=0, base_seed=None)
        experts = []
        for k in range(args.k):
            write_model(root / f"expert{k}", shapes, seed=k + 1, base_seed=0)
            experts.append(root / f"expert{k}")
        n_params = sum(torch.Size(s).numel() for s in shapes.values())
        print(f"models: {n_params / 1e6:.0f} M float32 parameters each ({n_params * 4 / 2**30:.2f} GiB), K={args.k}, "
              f"largest tensor {largest / 2**20:.0f} MiB; written in {time.perf_counter() - t:.0f} s")
        budget = (args.k + 2) * largest + 2**30
        print(f"file path (target peak RSS <= (K+2) x largest tensor + 1 GiB = {budget / 2**30:.2f} GiB)")
        print(f"  {'method':16s} {'ours s':>8s} {'ours RSS':>9s} {'mergekit s':>11s} {'mk RSS':>8s} {'speed-up':>9s}")
        for method in args.methods:
            cfg = root / f"{method}.yaml"
            cfg.write_text(config_yaml(method, root / "base", experts))
            secs, rss = run_ours(cfg, root / f"out-{method}")
            mk = run_mergekit(cfg, root / f"mk-{method}") if method != "obim" else None
            mk_text = f"{mk[0]:11.1f} {mk[1] / 2**30:7.2f}G {mk[0] / secs:8.1f}x" if mk else f"{'skipped':>11s}"
            print(f"  {method:16s} {secs:8.1f} {rss / 2**30:8.2f}G {mk_text}")
        if not args.no_resident:
            bench_resident(root / "base", experts, args.methods)


if __name__ == "__main__":
    main()
