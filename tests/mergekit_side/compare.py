"""What the parity modules share: a checkpoint's tensors, mergekit's output of a job, and `mmmo
merge` of the same YAML (the module's parity fixture writes ``yaml/<id>.yml`` under its root)."""

from __future__ import annotations

from pathlib import Path


def load_tensors(model_dir: Path) -> dict:
    """Every tensor of a (possibly sharded) safetensors checkpoint."""
    from safetensors.torch import load_file

    tensors: dict = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def mergekit_output(parity: dict, job_id: str) -> Path:
    """Where mergekit wrote job ``job_id``; fails the test with mergekit's error where it refused."""
    result = parity["results"][job_id]
    assert result["ok"], f"mergekit refused case {job_id}: {result['error']}\n{result.get('traceback', '')}"
    return parity["root"] / "mergekit" / job_id


def mmmo_merge(parity: dict, case_id: str) -> Path:
    """``mmmo merge``'s file path on the case's YAML (its ``out_dtype`` honoured)."""
    from merging.files import merge_to_dir
    from merging.mergekit_yaml import parse_mergekit

    plan = parse_mergekit((parity["root"] / "yaml" / f"{case_id}.yml").read_text())
    return merge_to_dir(plan.config, parity["root"] / "mmmo" / case_id, dtype=plan.dtype)
