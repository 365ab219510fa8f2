"""Counter-based random numbers: an entry's draw is a pure function of a 64-bit key and its index.

DARE and DELLA keep each entry of a delta with some probability. Drawn from a stateful generator,
the mask depends on the order entries are drawn in, costs a sequential generator pass, and differs
between CPU and GPU. Here the uniform number of entry ``i`` is ``hash(key, i)``: the same on any
device, in any chunk or order, in the file and the resident paths, and computed inside the fused
merge kernels (no mask is stored).

The hash is two rounds of a 32-bit multiply-xorshift mix (Wellons' ``lowbias32`` constants, chosen
below 2^31 so that every product of a 32-bit value fits in a signed 64-bit integer: torch has no
unsigned 32-bit arithmetic, and this way the same integer ops give the same bits in eager torch,
in code ``torch.compile`` generates, and in Triton). Philox would need the high half of a 64-bit
product, which int64 tensor arithmetic cannot give without overflow.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF


def tensor_key(seed: int, name: str) -> int:
    """A tensor's 63-bit key: a function of the merge's seed and the tensor's name only, so that a
    tensor's draws do not depend on which other tensors are merged or in which order."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


def expert_key(key: int, i: int) -> int:
    """Expert ``i``'s key within a tensor of ``key``: each expert draws its own mask."""
    return (key + i * 0x9E3779B97F4A7C15) & ((1 << 63) - 1)


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit avalanche mix of int64 tensors holding values below 2^32."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _M32
    return x ^ (x >> 15)


def uniform(index: Tensor, key: Tensor | int) -> Tensor:
    """Float32 uniforms in [0, 1) with 24 random bits, one per entry of ``index`` (int64 entry
    indices below 2^32), for ``key`` (63-bit, a Python int or an int64 tensor)."""
    key = torch.as_tensor(key, dtype=torch.int64, device=index.device)
    lo, hi = key & _M32, (key >> 32) & _M32
    h = _mix32(_mix32((index & _M32) ^ lo) ^ hi)
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


def keep_draw(shape: torch.Size | tuple[int, ...], key: int, device: torch.device | str = "cpu") -> Tensor:
    """``uniform`` over every entry of a tensor of ``shape``, indexed in row-major order."""
    n = math.prod(shape)
    if n >= 1 << 32:
        raise ValueError(f"a tensor of {n} entries is beyond the 2^32 entries the counter-based draws index")
    return uniform(torch.arange(n, device=device).view(shape), key)


__all__ = ["expert_key", "keep_draw", "tensor_key", "uniform"]
