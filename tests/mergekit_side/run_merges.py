"""Run many mergekit merges in one process of mergekit's own environment (not mmmo's).

mergekit takes seconds to import, so the parity tests collect every case first and hand them
all to one run of this script, executed with the side environment's python::

    python run_merges.py JOBS.json RESULTS.json

``JOBS.json`` is a list of jobs, each one of

* ``{"id": ..., "kind": "yaml", "config": PATH, "out": DIR, "seed": INT|null}``: ``mergekit-yaml
  PATH DIR`` through mergekit's Python API (``MergeConfiguration`` + ``run_merge``);
* ``{"id": ..., "kind": "tensor", "method": NAME, "inputs": FILE, "out": FILE,
  "parameters": {...}, "seed": INT|null}``: one merge method called directly on the tensors of a
  safetensors ``FILE`` (``base`` and ``x0``, ``x1``, ...); a shared parameter is a value, a
  per-model one a list in input order. The merged tensor is written to ``out`` as ``merged``;
* ``{"id": ..., "kind": "specs", "out": FILE}``: every registered method's declared parameters
  (name, scope, default; ``null`` where required) as JSON.

``RESULTS.json`` maps each id to ``{"ok": true}`` or ``{"ok": false, "error": "..."}``: one
refused case does not stop the others. This file imports nothing from mmmo.
"""

from __future__ import annotations

import json
import sys
import traceback


def run_yaml(job: dict) -> None:
    import torch
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    with open(job["config"], encoding="utf-8") as fp:
        config = MergeConfiguration.model_validate(yaml.safe_load(fp))
    options = MergeOptions(device="cpu", copy_tokenizer=False, write_model_card=False, quiet=True,
                           lazy_unpickle=False, random_seed=job.get("seed"))
    if job.get("seed") is not None:
        torch.manual_seed(job["seed"])
    run_merge(config, job["out"], options=options)


def run_tensor(job: dict) -> None:
    import torch
    from mergekit import merge_methods
    from mergekit.merge_methods.base import TensorGroup
    from safetensors.torch import load_file, save_file

    tensors = load_file(job["inputs"])
    ordered = [tensors["base"]] + [tensors[f"x{i}"] for i in range(len(tensors) - 1)]
    group = TensorGroup.from_tensors(ordered, ids=["base"] + [f"x{i}" for i in range(len(ordered) - 1)],
                                     base_index=0, name=job.get("name", "t"))
    if job.get("seed") is not None:
        torch.manual_seed(job["seed"])
    (merged,) = merge_methods.get(job["method"])([group], parameters=job.get("parameters", {}))
    save_file({"merged": merged.contiguous()}, job["out"])


def dump_specs(job: dict) -> None:
    from mergekit import merge_methods

    specs = {m.spec.name: [{"name": p.name, "scope": p.scope.value, "default": None if p.required else p.default}
                           for p in m.spec.parameters] for m in merge_methods.registered_methods()}
    with open(job["out"], "w", encoding="utf-8") as fp:
        json.dump(specs, fp, indent=1)


RUNNERS = {"yaml": run_yaml, "tensor": run_tensor, "specs": dump_specs}


def main(jobs_path: str, results_path: str) -> int:
    with open(jobs_path, encoding="utf-8") as fp:
        jobs = json.load(fp)
    results = {}
    for job in jobs:
        try:
            RUNNERS[job["kind"]](job)
            results[job["id"]] = {"ok": True}
        except Exception as exc:  # a refusal is a result: the test decides whether it was expected
            results[job["id"]] = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                                  "traceback": traceback.format_exc(limit=4)}
    with open(results_path, "w", encoding="utf-8") as fp:
        json.dump(results, fp, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
