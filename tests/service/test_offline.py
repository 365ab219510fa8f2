"""Whether a worker may reach the Hugging Face hub is the settings' call (MMMO_OFFLINE), made once
at start-up; importing the worker's modules changes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.merging.test_locate import _cache_repo

ROOT = Path(__file__).resolve().parents[2]

WORKER_START = """
import json, os
from service.cli import _configure, _settings, build_parser
args = build_parser().parse_args(["worker"])
_configure(False, _settings(args).offline)  # what `mmmo worker` does before anything else
import service.runner, service.worker  # everything a worker imports (lm-eval included)
import huggingface_hub.constants as constants
from merging.io import ModelNotFound, locate
found = str(locate("acme/tiny-base"))
try:
    locate("acme/missing")
except ModelNotFound as exc:
    missing = str(exc)
print(json.dumps({"hub_offline": constants.HF_HUB_OFFLINE, "found": found, "missing": missing}))
"""


def _worker_start(tmp_path: Path, hub: Path, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("HF_", "MMMO_", "TRANSFORMERS_")) and k != "PYTHONPATH"}
    clean |= {"HF_HUB_CACHE": str(hub), "HF_ENDPOINT": "http://127.0.0.1:9", "HOME": str(tmp_path)} | env
    out = subprocess.run([sys.executable, "-c", WORKER_START], capture_output=True, text=True, cwd=ROOT,
                         env=clean, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture
def hub(tmp_path, tiny_zoo) -> Path:
    cache = tmp_path / "hub"
    _cache_repo(cache, "acme/tiny-base", tiny_zoo.base)
    return cache


def test_a_worker_with_mmmo_offline_unset_resolves_hub_ids_through_huggingface_hub(tmp_path, hub):
    seen = _worker_start(tmp_path, hub)
    assert seen["hub_offline"] is False
    assert Path(seen["found"]).is_relative_to(hub)
    assert "cannot download it from the Hugging Face hub" in seen["missing"]  # it tried the hub


def test_mmmo_offline_keeps_a_worker_off_the_hub(tmp_path, hub):
    seen = _worker_start(tmp_path, hub, MMMO_OFFLINE="1")
    assert seen["hub_offline"] is True
    assert Path(seen["found"]).is_relative_to(hub)  # the cache still serves
    assert "nor in its Hugging Face cache" in seen["missing"]
