"""mergekit itself, for the parity tests: its side environment, and one process that runs many merges.

The environment is ``make mergekit``'s (``MMMO_MERGEKIT_VENV``, else ``~/.cache/mmmo/mergekit-venv``);
mergekit is never installed into mmmo's own. ``run_merges.py`` runs there and imports nothing of mmmo.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

MERGEKIT_VERSION = "0.1.5"
DRIVER = Path(__file__).with_name("run_merges.py")


def side_python() -> tuple[Path | None, str]:
    """The side environment's python, or None and why it cannot be used."""
    venv = Path(os.environ.get("MMMO_MERGEKIT_VENV") or Path.home() / ".cache" / "mmmo" / "mergekit-venv")
    python = venv.expanduser() / "bin" / "python"
    if not python.exists():
        return None, f"mergekit {MERGEKIT_VERSION} side environment not found at {venv}"
    probe = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
                           capture_output=True, text=True, timeout=60)
    version = probe.stdout.strip()
    if probe.returncode != 0 or version != MERGEKIT_VERSION:
        found = f"mergekit {version}" if probe.returncode == 0 else "no mergekit"
        return None, f"the side environment at {venv} has {found}, not mergekit {MERGEKIT_VERSION}"
    return python, ""


def run_jobs(python: Path, jobs: list[dict], workdir: Path, timeout: float = 600) -> dict[str, dict]:
    """Run ``jobs`` (see ``run_merges.py``) in one process; each job's ``{"ok": ..., "error": ...}`` by id."""
    workdir.mkdir(parents=True, exist_ok=True)
    jobs_path, results_path = workdir / "jobs.json", workdir / "results.json"
    jobs_path.write_text(json.dumps(jobs, indent=1))
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([str(python), str(DRIVER), str(jobs_path), str(results_path)], capture_output=True,
                          text=True, timeout=timeout, env=env)
    if done.returncode != 0 or not results_path.exists():
        raise RuntimeError(f"the mergekit side process failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(results_path.read_text())
