"""Exact threshold top-k, and the streaming safetensors reader/writer against the library."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from merging.io.safetensors_stream import SafetensorsReader, SafetensorsWriter
from merging.select import kth_largest, topk_mask


@pytest.mark.parametrize("n,frac", [(1000, 0.3), (1 << 20, 0.2), (1 << 20, 0.9), (3 << 19, 0.001)])
def test_topk_mask_selects_exactly_the_topk_set(n, frac):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)).abs()
    k = int(frac * n)
    mask = topk_mask(x, k)
    assert int(mask.sum()) == k
    expected = torch.zeros(n, dtype=torch.bool)
    expected[x.topk(k).indices] = True
    assert torch.equal(mask, expected)
    assert kth_largest(x, k) == x.topk(k).values.min()


def test_topk_mask_breaks_ties_at_the_threshold_by_position():
    x = torch.tensor([5.0, 1.0, 3.0, 3.0, 3.0, 0.0] * 100_000)
    mask = topk_mask(x, 100_000 + 150_000)
    assert int(mask.sum()) == 250_000
    assert bool(mask[x == 5.0].all()) and not bool(mask[x < 3.0].any())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
def test_streamed_safetensors_round_trip_with_the_library(tmp_path, dtype):
    tensors = {"a": torch.arange(12).reshape(3, 4).to(dtype), "b": torch.ones(5).to(dtype),
               "empty": torch.zeros(0, 3).to(dtype)}
    path = tmp_path / "x.safetensors"
    writer = SafetensorsWriter(path, [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()])
    for k, v in tensors.items():
        writer.write(k, v)
    writer.close()
    loaded = load_file(str(path))
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    save_file(tensors, str(tmp_path / "lib.safetensors"))
    reader = SafetensorsReader(tmp_path / "lib.safetensors")
    assert sorted(reader.keys()) == sorted(tensors)
    assert all(torch.equal(reader.get(k), v) and reader.dtype(k) == dtype for k, v in tensors.items())
