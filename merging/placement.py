"""Where a resident set's tensors live: the memory plan of one (base, experts, live model) set.

Three plans, all giving the same merged tensors:

- ``resident``: base, experts and the live model on the device. Fastest; (K + 2) model copies.
- ``host``: base and live model on the device, experts in host memory (pinned on CUDA) and
  copied to the device tensor by tensor, the next tensor's copy overlapping this one's merge.
- ``files``: base and live model resident, experts read tensor by tensor from their files
  each trial; two model copies whatever K is.

A plan is chosen from the worker's budget (``--max-memory``, and on CUDA the device's free
memory); an explicit plan is taken as asked.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import torch

GiB = 2**30
# Room left for what is not the set: activations and KV cache of the evaluation, the tokenizer,
# lm-eval's documents, allocator slack.
MIN_HEADROOM_BYTES = 1 * GiB
HEADROOM_FRACTION = 0.10  # of one model copy: activations grow with the model


class PlanKind(StrEnum):
    RESIDENT = "resident"
    HOST = "host"
    FILES = "files"


PLAN_CHOICES = ("auto", *(k.value for k in PlanKind))


@dataclass(frozen=True)
class SetSize:
    """What a set holds: one model copy's bytes (in the set's dtype) and K experts."""

    model_bytes: int
    experts: int

    def needs(self, kind: PlanKind) -> tuple[int, int]:
        """(device bytes, host bytes) the set takes in plan ``kind``, beside the headroom."""
        both = 2 * self.model_bytes  # the base and the live model
        experts = self.experts * self.model_bytes
        if kind == PlanKind.RESIDENT:
            return both + experts, 0
        if kind == PlanKind.HOST:
            return both, experts
        return both, 0

    @property
    def headroom(self) -> int:
        return max(MIN_HEADROOM_BYTES, int(HEADROOM_FRACTION * self.model_bytes))


@dataclass(frozen=True)
class Placement:
    kind: PlanKind
    device: str
    device_bytes: int  # the set's bytes on the device (on CPU: in host memory)
    host_bytes: int  # the set's bytes in host memory beside a CUDA device (the host plan's experts)
    budget_bytes: int | None  # what the plan was chosen within; None: not known
    chosen: bool  # chosen from the budget (False: asked for)

    def summary(self) -> str:
        where = f"{self.kind.value} on {self.device}: {self.device_bytes / GiB:.1f} GiB"
        if self.host_bytes:
            where += f" + {self.host_bytes / GiB:.1f} GiB in host memory"
        if self.budget_bytes is not None:
            where += f", budget {self.budget_bytes / GiB:.1f} GiB"
        return where + ("" if self.chosen else " (asked for)")


def available_host_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux); None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def device_budget(device: torch.device, max_memory: int | None) -> int | None:
    """What a set may take on ``device``: ``max_memory`` and what is free there, the smaller."""
    free: int | None
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = available_host_bytes()
    known = [b for b in (max_memory, free) if b is not None]
    return min(known) if known else None


def choose(size: SetSize, device: torch.device, *, budget: int | None, host_budget: int | None = None,
           requested: str = "auto") -> Placement:
    """The plan for a set of ``size`` on ``device`` within ``budget`` bytes (``host_budget``: host
    memory beside a CUDA device). ``requested``: ``auto`` or a plan's name, taken as asked.

    ``auto`` takes the fastest plan that fits with headroom: resident, then host (CUDA only: on
    CPU it would hold the same bytes as resident), then files, which always runs."""
    if requested != "auto":
        kind = PlanKind(requested)
        dev, host = size.needs(kind)
        if device.type != "cuda":
            dev, host = dev + host, 0
        return Placement(kind, str(device), dev, host, budget, chosen=False)
    kinds = [PlanKind.RESIDENT, PlanKind.HOST] if device.type == "cuda" else [PlanKind.RESIDENT]
    for kind in kinds:
        dev, host = size.needs(kind)
        fits_device = budget is None or dev + size.headroom <= budget
        fits_host = host == 0 or host_budget is None or host <= host_budget
        if fits_device and fits_host:
            return Placement(kind, str(device), dev, host, budget, chosen=True)
    dev, host = size.needs(PlanKind.FILES)
    return Placement(PlanKind.FILES, str(device), dev, host, budget, chosen=True)


__all__ = ["PLAN_CHOICES", "Placement", "PlanKind", "SetSize", "available_host_bytes", "choose", "device_budget"]
