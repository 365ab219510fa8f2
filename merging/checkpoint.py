"""Lazy, per-tensor access to a checkpoint directory, for streaming merges."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from merging.errors import MergeError
from merging.io import weight_files
from merging.safetensors_stream import SafetensorsReader


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


