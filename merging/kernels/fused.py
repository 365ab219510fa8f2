"""Fused merges: one tensor's TIES / DARE / DELLA / task-arithmetic / OBIM merge in a few passes.

The methods' plain torch code (``merging/methods``) builds each expert's float32 delta, masks it,
weighs it, elects signs and sums, some 25 full-tensor passes and K float32 copies per tensor. Here
the same arithmetic, operation for operation (so the bits are the reference's), runs as:

1. per expert, what its mask needs: a top-k ``Cut`` found by counting (``merging.select``: one
   pass that counts and marks a narrow band, no sort), a counter-based draw (``kernels.rng``: no
   pass at all), or for DELLA a per-row rank (one sort);
2. with ``rescale``, one reduction pass per expert for the L1 norms before and after the mask;
3. one pass that reads the base and the K experts in their held dtype, recomputes each delta and
   mask on the fly, elects signs, mixes, scales, adds the base and writes the result in its dtype.

The passes are plain torch functions; ``Kernels`` runs them through ``torch.compile`` (vectorised
C++ on a CPU, Triton on a GPU) for tensors big enough to pay for it, eagerly otherwise, and
eagerly with a warning if compiling fails. Both give the same bits (tests compare them).
"""

from __future__ import annotations

import enum
import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from merging.errors import MergeError
from merging.kernels.rng import expert_key, uniform
from merging.methods.base import MergeMethod
from merging.methods.generalized import GeneralizedTaskArithmetic
from merging.methods.obim import Obim
from merging.select import SMALL, Cut, bracket, cut_among, row_topk_mask, top_cut
from merging.sparsify import della_keep_probability

log = logging.getLogger(__name__)

_EPS = 1e-7  # as ``sparsify.rescale_l1``: below it, no rescale


class Rule(enum.Enum):
    """How an expert's mask is made inside the merge pass."""

    ALL = "all"  # no sparsification
    NONE = "none"  # nothing kept: the expert adds nothing
    TOP = "top"  # v > cut.value, or equal and before cut.position (v: |d|, or OBIM's saliency)
    DRAW = "draw"  # counter-based uniform below the density
    MASK = "mask"  # a precomputed boolean mask (DELLA's rank-dependent draws, OBIM per row)


@dataclass
class ExpertMask:
    rule: Rule
    cut: Cut | None = None
    key: int = 0
    density: float = 1.0
    mask: Tensor | None = None
    factor: Tensor | None = None  # the L1 rescale, 0-dim float32


# ---- the passes: plain torch, compiled or not ----

def _positions(like: Tensor) -> Tensor:
    return torch.arange(like.numel(), device=like.device).view(like.shape)


def _saliency(d: Tensor, energy: Tensor | None) -> Tensor:
    return d * d if energy is None else d * d * energy  # OBM: d^2 (x sum x^2 per input column)


def _keep(v: Tensor, pos: Tensor, rule: Rule, value: Tensor | None, position: Tensor | None,
          key: Tensor | None, density: Tensor | None, mask: Tensor | None) -> Tensor | None:
    if rule is Rule.TOP:
        return (v > value) | ((v == value) & (pos < position))
    if rule is Rule.DRAW:
        return uniform(pos, key) < density
    if rule is Rule.MASK:
        return mask
    return None


def _value_of(base: Tensor, expert: Tensor, energy: Tensor | None) -> Tensor:
    d = expert.float() - base.float()
    return d.abs() if energy is None else _saliency(d, energy)


def band_pass(base: Tensor, experts: list[Tensor], energies: list, los: list,
              his: list) -> tuple[Tensor, list[Tensor]]:
    """One pass over the base and the K experts: bit ``k`` set where expert ``k``'s value (``|d|``,
    or the saliency) lies in its [lo, hi], one byte an entry, and per expert how many lie above its
    ``hi``. (Compiled, bits summed in int32 and cast once: uint8 or bool arithmetic is several
    times slower.)"""
    bits = torch.zeros_like(base, dtype=torch.int32)
    above = []
    for k, (e, en, lo, hi) in enumerate(zip(experts, energies, los, his, strict=True)):
        v = _value_of(base, e, en)
        bits = bits + ((v >= lo) & (v <= hi)).to(torch.int32) * (1 << k)
        above.append((v > hi).to(torch.int32).sum())
    return bits.to(torch.uint8), above


def l1_pass(base: Tensor, experts: list[Tensor], rules: tuple[Rule, ...], values: list, positions: list,
            keys: list, densities: list, masks: list) -> list[tuple[Tensor, Tensor]]:
    """Per expert, ``sum |d|`` and ``sum |d|`` over its kept entries, in float64 (as
    ``sparsify.rescale_l1``): one pass over the base and the experts."""
    b = base.float()
    pos = _positions(b)
    out = []
    for k, e in enumerate(experts):
        a = (e.float() - b).abs()
        keep = _keep(a, pos, rules[k], values[k], positions[k], keys[k], densities[k], masks[k])
        # sum(dtype=float64), not .double().sum(): the same sums, compiled twice as fast from bf16
        out.append((a.sum(dtype=torch.float64), torch.where(keep, a, 0.0).sum(dtype=torch.float64)))
    return out


def gta_pass(base: Tensor, experts: list[Tensor], rules: tuple[Rule, ...], values: list, positions: list,
             keys: list, densities: list, masks: list, factors: list, weights: list, divisor: Tensor | None,
             lam: Tensor, consensus: bool, normalize: bool, out_dtype: torch.dtype, out: Tensor | None) -> Tensor:
    """Generalized task arithmetic, as ``GeneralizedTaskArithmetic.merge`` computes it; into ``out``
    where given (compiled, the pass writes there: no new tensor, no page faults, no copy)."""
    b = base.float()
    pos = _positions(b)
    weighted = []
    for k, e in enumerate(experts):
        if rules[k] is Rule.NONE:
            continue
        d = e.float() - b
        keep = _keep(d.abs(), pos, rules[k], values[k], positions[k], keys[k], densities[k], masks[k])
        s = d if keep is None else torch.where(keep, d, 0.0)
        if factors[k] is not None:
            s = s * factors[k]
        weighted.append((s * weights[k], weights[k]))
    mixed = torch.zeros_like(b)
    for wd, _ in weighted:
        mixed = mixed + wd
    if consensus:
        positive = mixed >= 0
        mixed = torch.zeros_like(b)
        div = torch.zeros_like(b)
        for wd, w in weighted:
            agree = torch.where(positive, wd > 0, wd < 0)
            mixed = mixed + torch.where(agree, wd, 0.0)
            div = div + agree.float() * w
        divisor = torch.where(div == 0, 1.0, div)
    if normalize:
        mixed = mixed / divisor
    return _written((mixed * lam + b).to(out_dtype), out)


def _written(result: Tensor, out: Tensor | None) -> Tensor:
    return result if out is None else out.copy_(result)


def obim_pass(base: Tensor, experts: list[Tensor], order: tuple[int, ...], rules: tuple[Rule, ...],
              energies: list, values: list, positions: list, masks: list, weights: list,
              out_dtype: torch.dtype, out: Tensor | None) -> Tensor:
    """OBIM's iterative merge through exclusive masks, as ``Obim.merge`` computes it (into ``out``)."""
    b = base.float()
    pos = _positions(b)
    merged = b
    taken = None
    for i in order:
        if rules[i] is Rule.NONE:
            continue
        d = experts[i].float() - b
        keep = _keep(_saliency(d, energies[i]), pos, rules[i], values[i], positions[i], None, None, masks[i])
        if keep is None:
            keep = torch.ones_like(d, dtype=torch.bool)
        exclusive = keep if taken is None else keep & ~taken
        taken = keep if taken is None else taken | keep
        merged = merged + torch.where(exclusive, weights[i] * d, 0.0)
    return _written(merged.to(out_dtype), out)


def l1_distance(merged: Tensor, base: Tensor) -> Tensor:
    """``sum |merged - base|`` in float32 (MM-MO's sparsity objective, per tensor)."""
    return (merged.float() - base.float()).abs().sum()


# ---- running them ----

@dataclass(frozen=True)
class KernelOptions:
    compile: bool = True  # torch.compile the passes of large tensors
    compile_min_numel: int = 1 << 20  # below this a compiled pass costs more in dispatch than it saves
    exact_max_numel: int = SMALL  # selection over every value (no sampled bracket) up to this size


class Kernels:
    """Runs the passes, compiled where worthwhile. One per merger or file merge; ``calls`` counts
    what ran (pass, compiled or not) for tests and benchmarks."""

    def __init__(self, options: KernelOptions | None = None) -> None:
        self.options = options or KernelOptions()
        self.calls: Counter[tuple[str, bool]] = Counter()
        self._compiled: dict[Callable, Callable] = {}
        self._broken: str | None = None

    def fuses(self, numel: int) -> bool:
        """Whether a tensor of ``numel`` entries should take the fused path: compiled for large
        tensors; below ``compile_min_numel`` the methods' plain code is faster than the fused
        passes run eagerly (and gives the same bits). ``compile=False`` fuses every tensor, eagerly."""
        return not self.options.compile or numel >= self.options.compile_min_numel

    def run(self, fn: Callable, numel: int, *args: Any) -> Any:
        o = self.options
        if o.compile and numel >= o.compile_min_numel and self._broken is None:
            compiled = self._compiled.get(fn)
            if compiled is None:
                compiled = self._compiled[fn] = torch.compile(fn, dynamic=True)
            try:
                # each (method, K, dtype) is one graph of the same function: more than dynamo's default 8
                with torch._dynamo.config.patch(recompile_limit=64):
                    out = compiled(*args)
                self.calls[(fn.__name__, True)] += 1
                return out
            except Exception as exc:  # noqa: BLE001 - no compiler here: the same code, eagerly
                self._broken = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                log.warning("compiled merge kernels unavailable (%s); merging eagerly", self._broken)
        self.calls[(fn.__name__, False)] += 1
        return fn(*args)

    # -- selection --

    def cuts(self, base: Tensor, experts: Sequence[Tensor], ks: Sequence[int],
             energies: Sequence[Tensor | None]) -> list[Cut]:
        """Per expert, the top-``k`` cut of ``|expert - base|`` (or of its saliency with an energy), by
        counting (``merging.select``): the K experts' counts in one pass, their bands in another."""
        n = base.numel()
        if not ks:
            return []
        if any(en is not None for en in energies) or base.dim() == 0:
            b, es, ens = base, list(experts), list(energies)
        else:  # elementwise: one flat shape, so every tensor shape is the same compiled graph
            b, es, ens = base.reshape(-1), [e.reshape(-1) for e in experts], [None] * len(experts)
        flat_b = base.reshape(-1)

        def values_at(i: int) -> Callable[[Tensor], Tensor]:
            flat_e, energy = experts[i].reshape(-1), energies[i]

            def at(idx: Tensor) -> Tensor:
                d = flat_e[idx].float() - flat_b[idx].float()
                return d.abs() if energy is None else _saliency(d, energy.reshape(-1)[idx % energy.shape[-1]])
            return at

        if n <= self.options.exact_max_numel or len(experts) > 8:
            return [top_cut(base, k, lambda lo, hi, i=i: _band_one(self, b, es[i], ens[i], lo, hi), values_at(i),
                            small=self.options.exact_max_numel) for i, k in enumerate(ks)]
        brackets = [bracket(base, k, values_at(i)) for i, k in enumerate(ks)]
        bits, counts = self.run(band_pass, n, b, es, ens, [lo for lo, _ in brackets], [hi for _, hi in brackets])
        above = [int(c) for c in counts]
        inside_any = bits.reshape(-1).nonzero().squeeze(1)
        member = bits.reshape(-1)[inside_any]
        del bits
        out = []
        for i, k in enumerate(ks):
            inside = inside_any[(member & (1 << i)) != 0]
            need = k - above[i]
            if 0 < need <= inside.numel():
                out.append(cut_among(values_at(i)(inside), inside, need))
            else:  # the bracket missed: every value, exactly
                out.append(cut_among(values_at(i)(torch.arange(n, device=base.device)), None, k))
        return out

    # -- merges --

    def generalized(self, method: GeneralizedTaskArithmetic, key: int, base: Tensor, experts: Sequence[Tensor],
                    params_k: Sequence[Mapping[str, Any]], params: Mapping[str, Any], out_dtype: torch.dtype,
                    out: Tensor | None = None) -> Tensor:
        n = base.numel()
        shape = base.shape
        base, experts = base.reshape(-1), [e.reshape(-1) for e in experts]  # elementwise: one flat graph
        topk = [i for i, p in enumerate(params_k) if method.sparsifier == "magnitude" and 0 < p["density"] < 1]
        found = self.cuts(base, [experts[i] for i in topk], [max(1, int(params_k[i]["density"] * n)) for i in topk],
                          [None] * len(topk))
        cuts = dict(zip(topk, found, strict=True))
        masks = [self._expert_mask(method, expert_key(key, i), base, e, p, cuts.get(i), shape)
                 for i, (e, p) in enumerate(zip(experts, params_k, strict=True))]
        if method.sparsifier is not None and params["rescale"]:
            self._rescale(base, experts, masks)
        weights = torch.tensor([float(p["weight"]) for p in params_k], dtype=torch.float32)
        total = weights.sum()
        divisor = total if total.abs() >= 1e-8 else torch.ones((), dtype=torch.float32)
        dev = base.device
        merged = self.run(
            gta_pass, n, base, list(experts), tuple(m.rule for m in masks),
            [_value(m, dev) for m in masks], [_position(m, dev) for m in masks],
            [torch.tensor(m.key, device=dev) if m.rule is Rule.DRAW else None for m in masks],
            [torch.tensor(m.density, device=dev) if m.rule is Rule.DRAW else None for m in masks],
            [m.mask for m in masks], [None if m.factor is None else m.factor.to(dev) for m in masks],
            [w.to(dev) for w in weights], divisor.to(dev),
            torch.tensor(float(params["lambda"]), dtype=torch.float32, device=dev),
            method.consensus, bool(params["normalize"]), out_dtype, None if out is None else out.view(-1))
        return merged.view(shape)

    def _expert_mask(self, method: GeneralizedTaskArithmetic, key: int, base: Tensor, expert: Tensor,
                     p: Mapping[str, Any], cut: Cut | None, shape: torch.Size) -> ExpertMask:
        """How expert's mask is made (``base`` and ``expert`` flat; ``shape`` theirs, for DELLA's rows)."""
        if method.sparsifier is None or p["density"] >= 1:
            return ExpertMask(Rule.ALL)
        density = p["density"]
        if density <= 0:
            return ExpertMask(Rule.NONE)
        n = base.numel()
        if method.sparsifier == "magnitude":
            m = ExpertMask(Rule.TOP, cut=cut)
        elif method.sparsifier == "random":
            if n >= 1 << 32:
                raise MergeError(f"a tensor of {n} entries is beyond the 2^32 entries the counter-based draws index")
            m = ExpertMask(Rule.DRAW, key=key, density=density)
        elif method.sparsifier == "della_magprune":
            d = (expert.float() - base.float()).view(shape)
            if density + p["epsilon"] >= 1 or density - p["epsilon"] <= 0:
                raise MergeError(f"della needs 0 < density - epsilon and density + epsilon < 1 "
                                 f"(got {density}, {p['epsilon']})")
            probability = della_keep_probability(d, density, p["epsilon"])
            del d
            draws = self.run(_draw, n, probability.view(-1), torch.tensor(key, device=base.device))
            m = ExpertMask(Rule.MASK, mask=draws)
        else:
            raise AssertionError(f"no fused path for sparsifier {method.sparsifier}")
        return m

    def _rescale(self, base: Tensor, experts: Sequence[Tensor], masks: list[ExpertMask]) -> None:
        """Each sparsified expert's L1 rescale factor (``sparsify.rescale_l1``), from one pass."""
        which = [i for i, m in enumerate(masks) if m.rule in (Rule.TOP, Rule.DRAW, Rule.MASK)]
        if not which:
            return
        dev = base.device
        chosen = [masks[i] for i in which]
        sums = self.run(l1_pass, base.numel(), base, [experts[i] for i in which], tuple(m.rule for m in chosen),
                        [_value(m, dev) for m in chosen], [_position(m, dev) for m in chosen],
                        [torch.tensor(m.key, device=dev) if m.rule is Rule.DRAW else None for m in chosen],
                        [torch.tensor(m.density, device=dev) if m.rule is Rule.DRAW else None for m in chosen],
                        [m.mask for m in chosen])
        for m, (before, after) in zip(chosen, sums, strict=True):
            if before >= _EPS and after >= _EPS:
                m.factor = (before / after).float()

    def obim(self, method: Obim, base: Tensor, experts: Sequence[Tensor], stats: Sequence[Tensor | None],
             params_k: Sequence[Mapping[str, Any]], params: Mapping[str, Any], out_dtype: torch.dtype,
             out: Tensor | None = None, thresholds: Sequence[float | None] | None = None) -> Tensor:
        n = base.numel()
        dev = base.device
        magnitude = params["saliency"] == "magnitude"
        # Without statistics the saliency is d^2 (d * d * 1: the same bits): never None here, where
        # the selection would otherwise rank |d|, the generalized methods' value, against d^2.
        one = torch.ones(1, dtype=torch.float32, device=dev)
        energies = [one if magnitude or (en := _energy(base, s)) is None else en for s in stats]
        scope = params["granularity"] if base.dim() >= 2 else "tensor"
        if params["granularity"] == "global":
            scope = "global"  # a threshold, whatever the tensor's shape
        masks: list[ExpertMask] = []
        topk = [i for i, p in enumerate(params_k) if scope == "tensor" and p["density"] < 1
                and int(p["density"] * n) > 0]
        found = self.cuts(base, [experts[i] for i in topk], [int(params_k[i]["density"] * n) for i in topk],
                          [energies[i] for i in topk])
        top = dict(zip(topk, found, strict=True))
        for i, (e, energy, p) in enumerate(zip(experts, energies, params_k, strict=True)):
            density = p["density"]
            if density >= 1:
                m = ExpertMask(Rule.ALL)
            elif scope == "global":
                if not thresholds or thresholds[i] is None:
                    raise MergeError("OBIM's global scope needs each expert's saliency threshold")
                # v >= threshold: every position is before ``n``
                m = ExpertMask(Rule.TOP, cut=Cut(torch.tensor(thresholds[i], dtype=torch.float32), n))
            elif scope == "row":
                d = e.float() - base.float()
                rows = _saliency(d, energy).reshape(base.shape[0], -1)
                m = ExpertMask(Rule.MASK, mask=row_topk_mask(rows, int(density * rows.shape[1])).view(base.shape))
            elif i not in top:
                m = ExpertMask(Rule.NONE)
            else:
                m = ExpertMask(Rule.TOP, cut=top[i])
            masks.append(m)
        weights = [torch.tensor(float(p["weight"]), dtype=torch.float32, device=dev) for p in params_k]
        mass = [0.0] * len(experts)
        if params["order"] == "saliency" or params["rescale"]:
            for i, (m, e, energy) in enumerate(zip(masks, experts, energies, strict=True)):
                if m.rule is Rule.NONE:
                    continue
                kept, before, after = self.run(_kept_sums, n, base, e, energy, m.rule, _value(m, dev),
                                               _position(m, dev), m.mask).tolist()
                mass[i] = kept
                if params["rescale"] and before >= _EPS and after >= _EPS:
                    # the ratio of the float64 sums, rounded once to float32 (as ``obim.mass_factor``)
                    factor = (torch.tensor(before, dtype=torch.float64) / after).float().to(dev)
                    weights[i] = weights[i] * factor
        order = tuple(range(len(experts)))
        if params["order"] == "saliency":
            order = tuple(sorted(order, key=lambda i: -mass[i]))  # stable: listed order among equals
        return self.run(obim_pass, n, base, list(experts), order, tuple(m.rule for m in masks), energies,
                        [_value(m, dev) for m in masks], [_position(m, dev) for m in masks],
                        [m.mask for m in masks], weights, out_dtype, out)

    def distance(self, merged: Tensor, base: Tensor) -> float:
        return float(self.run(l1_distance, base.numel(), merged, base))


def _band_one(kernels: Kernels, base: Tensor, expert: Tensor, energy: Tensor | None, lo: Tensor,
              hi: Tensor) -> tuple[int, Tensor]:
    bits, (above,) = kernels.run(band_pass, base.numel(), base, [expert], [energy], [lo], [hi])
    return int(above), bits.reshape(-1).nonzero().squeeze(1)


def _draw(probability: Tensor, key: Tensor) -> Tensor:
    return uniform(_positions(probability), key) < probability


def _kept_sums(base: Tensor, expert: Tensor, energy: Tensor | None, rule: Rule, value: Tensor | None,
               position: Tensor | None, mask: Tensor | None) -> Tensor:
    """An expert's total kept saliency (OBIM's ``order: saliency``), ``sum |d|`` and ``sum |d|`` over
    its kept entries (``rescale``), each summed in float64."""
    d = expert.float() - base.float()
    s = _saliency(d, energy)
    a = d.abs()
    keep = _keep(s, _positions(d), rule, value, position, None, None, mask)
    if keep is None:
        kept, kept_l1 = s.sum(dtype=torch.float64), a.sum(dtype=torch.float64)
    else:
        kept, kept_l1 = torch.where(keep, s, 0.0).sum(dtype=torch.float64), torch.where(keep, a, 0.0).sum(
            dtype=torch.float64)
    return torch.stack([kept, a.sum(dtype=torch.float64), kept_l1])


def _energy(base: Tensor, stats: Tensor | None) -> Tensor | None:
    """The input-channel energy broadcast over a 2-D tensor's rows, where it applies (as ``obm_saliency``)."""
    if stats is None or base.dim() != 2 or stats.shape != (base.shape[1],):
        return None
    return stats.to(device=base.device, dtype=torch.float32).unsqueeze(0)


def _value(m: ExpertMask, dev: torch.device) -> Tensor | None:
    return m.cut.value.to(dev) if m.rule is Rule.TOP else None


def _position(m: ExpertMask, dev: torch.device) -> Tensor | None:
    return torch.tensor(m.cut.position, device=dev) if m.rule is Rule.TOP else None


def fusable(method: MergeMethod) -> bool:
    """Whether ``method`` has a fused path (the others run their plain torch code)."""
    if isinstance(method, Obim):
        return True
    return isinstance(method, GeneralizedTaskArithmetic) and method.sparsifier in (
        None, "magnitude", "random", "della_magprune")


def fused_merge(kernels: Kernels, method: MergeMethod, key: int, base: Tensor, experts: Sequence[Tensor],
                stats: Sequence[Tensor | None], params_k: Sequence[Mapping[str, Any]],
                params: Mapping[str, Any], out_dtype: torch.dtype, out: Tensor | None = None,
                thresholds: Sequence[float | None] | None = None) -> Tensor:
    """One tensor's merge by ``method`` (``fusable``) from the base and the experts' tensors in their
    held dtype, returned in ``out_dtype``, written into ``out`` where given (contiguous, that dtype)."""
    if isinstance(method, Obim):
        return kernels.obim(method, base, experts, stats, params_k, params, out_dtype, out, thresholds)
    assert isinstance(method, GeneralizedTaskArithmetic)
    return kernels.generalized(method, key, base, experts, params_k, params, out_dtype, out)


__all__ = ["ExpertMask", "KernelOptions", "Kernels", "Rule", "fusable", "fused_merge"]
