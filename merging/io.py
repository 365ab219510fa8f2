"""Reading Hugging Face checkpoint directories (sharded safetensors, ``.bin`` as a fallback)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from merging.errors import MergeError
from merging.locate import locate

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


def weight_files(model_dir: Path) -> list[Path]:
    """The weight files of a checkpoint (a directory or a hub id), preferring safetensors."""
    model_dir = locate(model_dir)
    for index_name, single in ((SAFETENSORS_INDEX, "model.safetensors"), (BIN_INDEX, "pytorch_model.bin")):
        if (model_dir / index_name).exists():
            index = json.loads((model_dir / index_name).read_text())
            return [model_dir / f for f in sorted(set(index["weight_map"].values()))]
        if (model_dir / single).exists():
            return [model_dir / single]
    raise MergeError(f"model '{model_dir}': no model.safetensors, safetensors index or pytorch_model.bin")


def check_checkpoint(model_dir: Path | str, download: bool = True) -> None:
    """Cheap check that a directory (or a hub id) looks like a loadable checkpoint (config + weights)."""
    model_dir = locate(model_dir, download=download)
    if not (model_dir / "config.json").exists():
        raise MergeError(f"model '{model_dir}': no config.json")
    weight_files(model_dir)


def load_state_dict(model_dir: Path) -> dict[str, Tensor]:
    state: dict[str, Tensor] = {}
    for f in weight_files(model_dir):
        if f.suffix == ".safetensors":
            state.update(load_file(str(f)))
        else:
            state.update(torch.load(f, map_location="cpu", weights_only=True))
    return state
