"""Reading Hugging Face checkpoint directories (sharded safetensors, ``.bin`` as a fallback):
whole state dicts for the resident path, one tensor at a time for streaming merges."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load_file
from torch import Tensor

from merging.errors import MergeError
from merging.io.locate import locate
from merging.io.lora import ADAPTER_WEIGHTS, is_adapter
from merging.io.safetensors_stream import SafetensorsReader

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
    """Cheap check that a directory (or a hub id) looks like a loadable checkpoint (config + weights),
    or a PEFT adapter (adapter config + weights)."""
    model_dir = locate(model_dir, download=download)
    if is_adapter(model_dir):
        if not any((model_dir / name).is_file() for name in ADAPTER_WEIGHTS):
            raise MergeError(f"adapter '{model_dir}': no {' or '.join(ADAPTER_WEIGHTS)}")
        return
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


class TensorReader(Protocol):
    """What the checks and the merge loop need of a checkpoint: names, shapes, dtypes, tensors."""

    def keys(self) -> list[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def dtype(self, name: str) -> torch.dtype: ...
    def get(self, name: str) -> Tensor: ...


class StateDictReader:
    """A state dict held in memory, seen as a :class:`TensorReader` (``get`` returns it, not a copy)."""

    def __init__(self, state: Mapping[str, Tensor]) -> None:
        self.state = state

    def keys(self) -> list[str]:
        return list(self.state)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.state[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.state[name].dtype

    def get(self, name: str) -> Tensor:
        return self.state[name]


class CheckpointReader:
    """Reads one tensor at a time from sharded safetensors (``.bin`` shards load whole, once)."""

    def __init__(self, model_dir: str | Path) -> None:
        self.dir = Path(model_dir)
        files = weight_files(self.dir)
        self._where: dict[str, Path] = {}
        self._handles: dict[Path, SafetensorsReader] = {}
        self._bin: dict[Path, dict[str, Tensor]] = {}
        for f in files:
            if f.suffix == ".safetensors":
                handle = SafetensorsReader(f)
                self._handles[f] = handle
                for key in handle.keys():
                    self._where[key] = f
            else:
                for key in torch.load(f, map_location="meta", weights_only=True):
                    self._where[key] = f

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        f = self._file(name)
        if f in self._handles:
            return self._handles[f].shape(name)
        return tuple(self._load_bin(f)[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        f = self._file(name)
        if f in self._handles:
            return self._handles[f].dtype(name)
        return self._load_bin(f)[name].dtype

    def get(self, name: str) -> Tensor:
        f = self._file(name)
        if f in self._handles:
            return self._handles[f].get(name)
        return self._load_bin(f)[name].clone()  # callers may overwrite what they get

    def _file(self, name: str) -> Path:
        try:
            return self._where[name]
        except KeyError:
            raise MergeError(f"model '{self.dir}': no tensor '{name}'") from None

    def _load_bin(self, f: Path) -> dict[str, Tensor]:
        if f not in self._bin:
            self._bin = {f: torch.load(f, map_location="cpu", weights_only=True)}  # one shard resident at a time
        return self._bin[f]
