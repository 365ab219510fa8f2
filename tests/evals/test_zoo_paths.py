"""A zoo cached by one checkout is used by another: its calibration texts are this one's bundled data."""

from __future__ import annotations

import json

from evals.synthetic import DATA_DIR
from evals.zoo import Zoo


def test_a_zoo_reads_its_calibration_from_this_installation(tiny_zoo, tmp_path):
    assert Zoo.load(tiny_zoo.root).calibration["add"] == DATA_DIR / "add" / "train.jsonl"
    meta = json.loads((tiny_zoo.root / "zoo.json").read_text())
    for expert in meta["experts"]:  # as an older build in another checkout wrote it
        expert["calibration"] = f"/elsewhere/mmmo/evals/tasks/data/{expert['name']}/train.jsonl"
    (tmp_path / "zoo.json").write_text(json.dumps(meta))
    moved = Zoo.load(tmp_path).calibration
    assert moved == {name: DATA_DIR / name / "train.jsonl" for name in ("add", "reverse", "sort", "upper")}
    assert all(path.is_file() for path in moved.values())
