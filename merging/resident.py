"""The resident Merger: a base and K experts held per a memory plan, merged into a live model in place.

This is what a worker uses for trials: no disk writes, no new model per trial. Tensors are held
in the checkpoint's dtype (or the one asked for); each tensor's merge is computed in float32
from ``expert - base``, exactly as the file path computes it, and cast back. Where the experts
live is the set's memory plan (``merging.placement``): on the device, in host memory streamed
to the device, or read from their files each trial. The merge runs per checkpoint tensor and
lands in the live model through transformers' own conversions (``merging.live_layout``), so a
trial's model equals the file merge of the same config loaded by ``from_pretrained``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor, nn

from merging.budget import expert_histograms, global_thresholds, uses_global
from merging.checks import check_compatible
from merging.config import MergeConfig
from merging.errors import MergeError
from merging.io import CheckpointReader, LoraReader, StateDictReader, TensorReader
from merging.kernels.fused import Kernels
from merging.live_layout import LiveLayout
from merging.placement import PlanKind
from merging.plan import MergePlan
from merging.saliency import Stats
from merging.step import merge_one


def _reader(source: TensorReader | Mapping[str, Tensor]) -> TensorReader:
    return StateDictReader(source) if isinstance(source, Mapping) else source


def _hold(t: Tensor, device: torch.device, dtype: torch.dtype | None) -> Tensor:
    """``t`` on ``device``, cast to ``dtype`` if it is a float tensor (a no-op copy-wise when both match)."""
    return t.to(device, dtype if dtype is not None and t.is_floating_point() else t.dtype)


def _nbytes(tensors: Iterable[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class _ExpertStore:
    """Each expert's tensors, handed out on the merge's device one checkpoint tensor at a time."""

    device_bytes = 0
    host_bytes = 0

    def stream(self, keys: Sequence[str]) -> Iterator[tuple[str, list[Tensor]]]:
        raise NotImplementedError


class _OnDevice(_ExpertStore):
    def __init__(self, readers: Sequence[TensorReader], keys: Sequence[str], device: torch.device,
                 dtype: torch.dtype | None) -> None:
        self.tensors = {k: [_hold(r.get(k), device, dtype) for r in readers] for k in keys}
        self.device_bytes = _nbytes(t for ts in self.tensors.values() for t in ts)

    def stream(self, keys: Sequence[str]) -> Iterator[tuple[str, list[Tensor]]]:
        for k in keys:
            yield k, self.tensors[k]


class _InHost(_ExpertStore):
    """Host memory (pinned on CUDA); the copy of the next tensor runs on a side stream while this
    one merges. On a CPU device the host is the device: nothing to copy."""

    def __init__(self, readers: Sequence[TensorReader], keys: Sequence[str], device: torch.device,
                 dtype: torch.dtype | None) -> None:
        self.device = device
        cpu = torch.device("cpu")
        pin = device.type == "cuda"
        self.tensors = {k: [(_hold(r.get(k), cpu, dtype).pin_memory() if pin else _hold(r.get(k), cpu, dtype))
                            for r in readers] for k in keys}
        nbytes = _nbytes(t for ts in self.tensors.values() for t in ts)
        if pin:
            self.host_bytes = nbytes
        else:
            self.device_bytes = nbytes

    def stream(self, keys: Sequence[str]) -> Iterator[tuple[str, list[Tensor]]]:
        if self.device.type != "cuda":
            for k in keys:
                yield k, self.tensors[k]
            return
        side = torch.cuda.Stream(self.device)

        def issue(k: str) -> tuple[list[Tensor], torch.cuda.Event]:
            with torch.cuda.stream(side):
                moved = [t.to(self.device, non_blocking=True) for t in self.tensors[k]]
                return moved, side.record_event()

        ahead = issue(keys[0]) if keys else None
        for i, k in enumerate(keys):
            moved, ready = ahead
            ahead = issue(keys[i + 1]) if i + 1 < len(keys) else None
            now = torch.cuda.current_stream(self.device)
            now.wait_event(ready)
            for t in moved:
                t.record_stream(now)  # allocated on the side stream, used on this one
            yield k, moved


class _FromFiles(_ExpertStore):
    """Read from the experts' files each trial, the next tensor's read overlapping this one's merge."""

    def __init__(self, readers: Sequence[TensorReader], device: torch.device, dtype: torch.dtype | None) -> None:
        self.readers, self.device, self.dtype = list(readers), device, dtype

    def _read(self, k: str) -> list[Tensor]:
        return [_hold(r.get(k), self.device, self.dtype) for r in self.readers]

    def stream(self, keys: Sequence[str]) -> Iterator[tuple[str, list[Tensor]]]:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="expert-read") as pool:
            ahead: Future | None = pool.submit(self._read, keys[0]) if keys else None
            for i, k in enumerate(keys):
                tensors = ahead.result()
                ahead = pool.submit(self._read, keys[i + 1]) if i + 1 < len(keys) else None
                yield k, tensors


class _LoraOnBase:
    """A LoRA expert of the merge's own base: its factors on the device, each adapted tensor
    expanded from the held base when it merges (PEFT's ``W + transpose(B @ A) * scale``)."""

    def __init__(self, reader: LoraReader, base: Mapping[str, Tensor], device: torch.device,
                 dtype: torch.dtype | None) -> None:
        self.base = base
        self.low_ranks = {k: lr.to(device) for k, lr in reader.low_ranks.items()}
        self.replaced = {k: _hold(reader.get(k), device, dtype) for k in reader.replaced}
        self.device_bytes = _nbytes([*(t for lr in self.low_ranks.values() for t in (lr.a, lr.b)),
                                     *self.replaced.values()])

    def get(self, k: str) -> Tensor:
        if k in self.replaced:
            return self.replaced[k]
        low_rank = self.low_ranks.get(k)
        return self.base[k] if low_rank is None else low_rank.applied(self.base[k])


def _on_base(reader: TensorReader, base: TensorReader) -> bool:
    """A LoRA reader whose model is the merge's base checkpoint (its factors are all it adds)."""
    if not isinstance(reader, LoraReader):
        return False
    mine, theirs = getattr(reader.model, "dir", None), getattr(base, "dir", None)
    return mine is not None and theirs is not None and Path(mine).resolve() == Path(theirs).resolve()


class Merger:
    """Holds a base and K experts; ``apply`` writes a merge into a live model's parameters.

    ``base`` and ``experts``: checkpoint readers (``merging.io``) or state dicts. The experts are
    checked against the base first (``merging.checks``): same tensors and shapes, and with
    ``check_ancestry`` (pass ``method != "linear"``) a base that is their ancestor. ``dtype``:
    what the tensors are held in (None: each tensor's own). ``plan``: where the experts live.
    ``kernels``: what runs the fused merges (``merging.kernels``; by default compiled for large tensors).
    """

    def __init__(self, base: TensorReader | Mapping[str, Tensor],
                 experts: Mapping[str, TensorReader | Mapping[str, Tensor]], *,
                 dtype: torch.dtype | None = None, stats: Stats | None = None,
                 device: str | torch.device = "cpu", plan: PlanKind | str = PlanKind.RESIDENT,
                 check_ancestry: bool = True, kernels: Kernels | None = None) -> None:
        if not experts:
            raise MergeError("a merge needs at least one expert")
        base_reader = _reader(base)
        readers = {e: _reader(r) for e, r in experts.items()}
        self.names = check_compatible(base_reader, readers, ancestry=check_ancestry)
        self.device = torch.device(device)
        self.dtype = dtype
        self.plan = PlanKind(plan)
        self.kernels = kernels or Kernels()
        self.expert_names = list(experts)
        self.base = {n: _hold(base_reader.get(n), self.device, dtype) for n in self.names}
        # LoRA experts of this base keep their factors; the others are held per the plan.
        self.low_rank = {i: _LoraOnBase(readers[e], self.base, self.device, dtype)
                         for i, e in enumerate(self.expert_names) if _on_base(readers[e], base_reader)}
        ordered = [readers[e] for i, e in enumerate(self.expert_names) if i not in self.low_rank]
        if self.plan == PlanKind.RESIDENT:
            self.store: _ExpertStore = _OnDevice(ordered, self.names, self.device, dtype)
        elif self.plan == PlanKind.HOST:
            self.store = _InHost(ordered, self.names, self.device, dtype)
        else:
            self.store = _FromFiles(ordered, self.device, dtype)
        self.stats: dict[str, dict[str, dict[str, Tensor]]] = {}
        self._histograms: dict[str | None, list[Tensor]] = {}  # OBIM's global scope, per reading
        for reading, of_experts in (stats or {}).items():
            self.add_stats(reading, of_experts)
        self._layouts: dict[int, LiveLayout] = {}

    def add_stats(self, reading: str, of_experts: Mapping[str, Mapping[str, Tensor]]) -> None:
        """Hold calibration statistics ``reading`` (e.g. ``obd/own``; ``MergeMethod.stats_reading``):
        per expert, per tensor. An expert without them falls back to magnitude saliency."""
        self.stats[reading] = {name: {k: v.to(self.device) for k, v in of_experts.get(name, {}).items()}
                               for name in self.expert_names}
        self._histograms.pop(reading, None)

    def _stats_of(self, reading: str | None, name: str) -> list[Tensor | None]:
        held = self.stats.get(reading, {}) if reading is not None else {}
        return [held.get(e, {}).get(name) for e in self.expert_names]

    def _thresholds(self, plan: MergePlan, reading: str | None) -> list[float]:
        """Each expert's saliency threshold for OBIM's global scope (its histogram built once per reading)."""
        hists = self._histograms.get(reading)
        if hists is None:
            tensors = ((self.base[n], held, self._stats_of(reading, n)) for n, held in self._experts(self.names))
            hists = self._histograms[reading] = expert_histograms(tensors, len(self.expert_names))
        numels = {n: t.numel() for n, t in self.base.items() if t.is_floating_point()}
        return global_thresholds(plan, numels, hists)

    @classmethod
    def from_checkpoints(cls, base_dir: str, expert_dirs: Mapping[str, str], **kwargs) -> Merger:
        return cls(CheckpointReader(base_dir), {name: CheckpointReader(p) for name, p in expert_dirs.items()},
                   **kwargs)

    @property
    def device_bytes(self) -> int:
        """What the base and the experts take on the merge's device (on CPU: in memory)."""
        return (_nbytes(self.base.values()) + self.store.device_bytes
                + sum(lr.device_bytes for lr in self.low_rank.values()))

    @property
    def host_bytes(self) -> int:
        return self.store.host_bytes

    def deltas_of(self, name: str) -> list[Tensor]:
        """Each expert's ``W_k - W_base`` of tensor ``name``, in float32 (for tests and benchmarks)."""
        (_, experts), = self._experts([name])
        b32 = self.base[name].float()
        return [e - b32 for e in experts]

    def _merged(self, config: MergeConfig, keys: Sequence[str], l1: list[float] | None = None,
                into: Mapping[str, Tensor] | None = None) -> Iterator[tuple[str, Tensor]]:
        """(name, merged tensor in the held dtype) per key; with ``l1``, each tensor's
        ``sum |merged - base|`` is appended to it. ``into``: tensors to write some keys' merges
        into (live parameters of the held dtype, on the merge's device); those are yielded."""
        names = [e.name for e in config.experts]
        if names != self.expert_names:
            raise MergeError(f"merge config names experts {names}, the merger holds {self.expert_names}")
        plan = MergePlan(config, names=keys)  # every tensor's parameters checked before any merges
        into = into or {}
        reading = plan.stats_reading(keys)
        thresholds = self._thresholds(plan, reading) if uses_global(plan, keys) else None
        for name, experts in self._experts(keys):
            base = self.base[name]
            out = into.get(name)
            if out is not None and (out.dtype != base.dtype or out.device != base.device):
                out = None
            held = merge_one(plan, name, base, experts, self._stats_of(reading, name), base.dtype,
                             self.kernels, out=out, thresholds=thresholds)  # in the held dtype
            del experts  # the largest tensor's merge sets the peak: free what it no longer needs
            if l1 is not None and held.is_floating_point():
                l1.append(self.kernels.distance(held, base))  # the distance of what is written
            yield name, held

    def _experts(self, keys: Sequence[str]) -> Iterator[tuple[str, list[Tensor]]]:
        """Each key's expert tensors in expert order: the plan's store, and LoRA experts expanded."""
        if not self.low_rank:
            yield from self.store.stream(keys)
            return
        for name, held in self.store.stream(keys):
            rest = iter(held)
            yield name, [self.low_rank[i].get(name) if i in self.low_rank else next(rest)
                         for i in range(len(self.expert_names))]

    def merged_tensors(self, config: MergeConfig) -> Iterator[tuple[str, Tensor]]:
        """Yield (checkpoint tensor name, merged tensor) for every tensor of the base, in the
        dtype the file path writes (the held dtype)."""
        yield from self._merged(config, self.names)

    def layout(self, model: nn.Module) -> LiveLayout:
        """How this checkpoint loads into ``model``, checked once per model."""
        layout = self._layouts.get(id(model))
        if layout is None:
            layout = LiveLayout(model, {n: tuple(t.shape) for n, t in self.base.items()})
            layout.check()
            self._layouts = {id(model): layout}  # one live model per set
        return layout

    def apply(self, model: nn.Module, config: MergeConfig, *, sparsity: bool = True) -> float | None:
        """Write the merge of ``config`` into ``model``'s parameters in place. Returns MM-MO's
        sparsity objective, ``sum |theta_merged - theta_base|`` over the merged tensors, measured
        per tensor as it is written (no whole-model float32 copy); None without ``sparsity``."""
        layout = self.layout(model)
        per_tensor: list[float] | None = [] if sparsity else None
        layout.write(self._merged(config, layout.file_keys(), per_tensor, layout.destinations()))
        return float(sum(per_tensor)) if per_tensor is not None else None  # summed in float64 across tensors


def expert_dirs(config: MergeConfig) -> dict[str, str]:
    return {e.name: e.path for e in config.experts}


__all__ = ["Merger", "expert_dirs"]
