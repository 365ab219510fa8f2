"""Read and write the safetensors format one tensor at a time, without memory maps.

The ``safetensors`` package memory-maps whole files (every page read counts towards the
process's resident size) and writes a file from a dict held in memory. A streaming merge needs
neither: the format is a little-endian u64 header length, a JSON header of dtypes, shapes and
byte offsets, then the raw bytes; so we read byte ranges into fresh buffers and write each
tensor as soon as it is merged, with the header computed up front from the known shapes.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from merging.errors import MergeError

CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
         torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
         torch.bool: "BOOL"}
DTYPES = {code: dtype for dtype, code in CODES.items()}


def _nbytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


class SafetensorsReader:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries = header
        self.data_start = 8 + size

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        code = self.entries[name]["dtype"]
        if code not in DTYPES:
            raise MergeError(f"'{self.path}': tensor '{name}' has unsupported dtype {code}")
        return DTYPES[code]

    def get(self, name: str) -> Tensor:
        begin, end = self.entries[name]["data_offsets"]
        # torch.empty, not bytearray: no zero-filling pass over memory the read overwrites anyway
        buf = torch.empty(end - begin, dtype=torch.uint8)
        if not buf.numel():
            return torch.empty(self.shape(name), dtype=self.dtype(name))
        with open(self.path, "rb") as fh:
            fh.seek(self.data_start + begin)
            if fh.readinto(buf.numpy()) != buf.numel():
                raise MergeError(f"'{self.path}': tensor '{name}' is truncated")
        return buf.view(self.dtype(name)).reshape(self.shape(name))


class SafetensorsWriter:
    """Writes the tensors of a planned list, in that order, straight to disk."""

    def __init__(self, path: str | Path, plan: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        self.order = []
        for name, dtype, shape in plan:
            n = _nbytes(dtype, shape)
            header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            self.order.append((name, dtype, tuple(shape)))
            offset += n
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
        self._fh = open(self.path, "wb")
        self._fh.write(struct.pack("<Q", len(blob)) + blob)
        self._next = 0

    def write(self, name: str, tensor: Tensor) -> None:
        expected, dtype, shape = self.order[self._next]
        if name != expected or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise MergeError(f"'{self.path}': expected {expected} {dtype} {shape}, got {name} {tensor.dtype} "
                             f"{tuple(tensor.shape)}")
        if tensor.numel():
            self._fh.write(tensor.detach().contiguous().cpu().view(torch.uint8).numpy().data)
        self._next += 1

    def close(self) -> None:
        self._fh.close()
        if self._next != len(self.order):
            raise MergeError(f"'{self.path}': {len(self.order) - self._next} planned tensors were never written")
