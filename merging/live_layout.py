"""How a checkpoint's tensors land in a live transformers model, by transformers' own rules.

transformers 5 renames and fuses tensors when it loads a model (``conversion_mapping.py``):
GPT-NeoX's output head gets another name, Mixtral's per-expert ``w1``/``w3`` become one
stacked ``gate_up_proj``. Merges are defined per checkpoint tensor (mergekit's semantics, and
the file path's), so the resident path merges the checkpoint's tensors one by one and hands
each target's merged sources to the very conversion ``from_pretrained`` would apply. The
grouping below follows ``transformers.core_model_loading.convert_and_load_state_dict_in_model``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from merging.errors import MergeError


@dataclass
class Target:
    """One conversion: the checkpoint tensors it reads (in transformers' order) and what it writes."""

    first_param: str  # the live name transformers files the conversion under
    transform: object  # a transformers WeightTransform; its collected tensors are drained by each convert
    sources: list[tuple[str, str, str]] = field(default_factory=list)  # (renamed key, file key, source pattern)

    @property
    def is_plain(self) -> bool:
        """One file tensor copied to one live parameter (most tensors of most models)."""
        from transformers.core_model_loading import WeightConverter

        return not isinstance(self.transform, WeightConverter) and len(self.sources) == 1


class LiveLayout:
    """The file tensors of a checkpoint grouped by the live parameters they load into."""

    def __init__(self, model: nn.Module, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """``model``: the live model (or one built on the meta device from the same config);
        ``shapes``: the checkpoint's tensor names and shapes."""
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            dot_natural_key,
            rename_source_key,
        )

        self.model = model
        self.shapes = {k: tuple(v) for k, v in shapes.items()}
        mapping = get_model_conversion_mapping(model) if hasattr(model, "base_model_prefix") else []
        renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
        converters = [t for t in mapping if isinstance(t, WeightConverter)]
        by_pattern = {p: c for c in converters for p in c.source_patterns}
        prefix = getattr(model, "base_model_prefix", None)
        live = model.state_dict()
        self.targets: dict[str, Target] = {}
        self.unexpected: list[str] = []  # file tensors the model does not load (e.g. old rotary buffers)
        for key in sorted(self.shapes, key=dot_natural_key):
            renamed, pattern = rename_source_key(key, renamings, converters, prefix, live)
            if renamed not in live and key in live:  # as transformers: not renamed after all
                renamed, pattern = rename_source_key(key, [], [], base_model_prefix=prefix, meta_state_dict=live)
            if renamed not in live:
                self.unexpected.append(key)
                continue
            if pattern is None:
                transform, pattern = WeightRenaming(key, renamed), key
            else:
                transform = by_pattern[pattern]
            target = self.targets.get(renamed)
            if target is None:
                target = self.targets[renamed] = Target(renamed, copy.deepcopy(transform))
            target.sources.append((renamed, key, pattern))

    def file_keys(self) -> list[str]:
        """The checkpoint tensors the model loads, in the order targets are written."""
        return [key for t in self.targets.values() for _, key, _ in t.sources]

    def destinations(self) -> dict[str, Tensor]:
        """File key -> the live parameter it is copied to unchanged (plain targets of the same
        shape): a merge can be written there directly, with no tensor in between."""
        params = self.model.state_dict(keep_vars=True)
        out = {}
        for target in self.targets.values():
            if target.is_plain:
                (renamed, key, _), = target.sources
                param = params[renamed].data
                if tuple(param.shape) == self.shapes[key] and param.is_contiguous() and param.device.type != "meta":
                    out[key] = param
        return out

    def convert(self, target: Target, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """The live parameters ``target`` writes, from its sources' tensors (by file key)."""
        if target.is_plain:
            (renamed, key, _), = target.sources
            return {renamed: tensors[key]}
        for renamed, key, pattern in target.sources:
            target.transform.add_tensor(renamed, key, pattern, tensors[key])
        out = target.transform.convert(target.first_param, model=self.model, config=getattr(self.model, "config", None))
        return {name: value[0] if isinstance(value, list) else value for name, value in out.items()}

    def write(self, merged: Iterable[tuple[str, Tensor]]) -> None:
        """Write every target of the model from ``merged``: (file key, tensor) in ``file_keys()``
        order, converted as ``from_pretrained`` converts."""
        params = self.model.state_dict(keep_vars=True)
        stream = iter(merged)
        with torch.no_grad():
            for target in self.targets.values():
                tensors = {}
                for _, key, _ in target.sources:
                    got, tensors[key] = next(stream)
                    if got != key:
                        raise MergeError(f"internal: tensor '{got}' came where '{key}' was expected")
                for name, value in self.convert(target, tensors).items():
                    live = params[name].data
                    if not (value.data_ptr() == live.data_ptr() and value.shape == live.shape
                            and value.dtype == live.dtype):  # written there already (``destinations``)
                        live.copy_(value)

    def check(self) -> None:
        """Every live parameter is written with its own shape by some target (or shares storage
        with one that is: tied embeddings). Runs each conversion on meta tensors of the
        checkpoint's shapes, so it reads no weights: cheap enough for a submit-time check."""
        params = self.model.state_dict(keep_vars=True)
        written: set[str] = set()
        for target in self.targets.values():
            tensors = {key: torch.empty(self.shapes[key], device="meta") for _, key, _ in target.sources}
            try:
                out = self.convert(target, tensors)
            except Exception as exc:  # a conversion that cannot take these shapes
                raise MergeError(f"checkpoint tensor(s) {[k for _, k, _ in target.sources][:3]} cannot be loaded "
                                 f"into '{target.first_param}': {exc}") from exc
            for name, value in out.items():
                if name not in params:
                    raise MergeError(f"checkpoint tensor(s) {[k for _, k, _ in target.sources][:3]} load into "
                                     f"'{name}', which the live model does not have")
                if tuple(params[name].shape) != tuple(value.shape):
                    raise MergeError(f"checkpoint tensor(s) {[k for _, k, _ in target.sources][:3]} give '{name}' "
                                     f"the shape {tuple(value.shape)}; the model's config makes it "
                                     f"{tuple(params[name].shape)}")
                written.add(name)
        storages = {params[n].data_ptr() for n in written}
        missing = [n for n, p in self.model.named_parameters(remove_duplicate=False)
                   if n not in written and (p.device.type == "meta" or p.data_ptr() not in storages)]
        tied = _tied_names(self.model)
        missing = [n for n in missing if n not in tied or not (tied[n] & written)]
        if missing:
            raise MergeError(f"the checkpoint has no tensor(s) for the model's parameter(s) {missing[:5]}")


def _tied_names(model: nn.Module) -> dict[str, set[str]]:
    """Each parameter name with the other names of the same parameter object (tied weights)."""
    names: dict[int, set[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), set()).add(name)
    return {n: group - {n} for group in names.values() for n in group}


__all__ = ["LiveLayout", "Target"]
