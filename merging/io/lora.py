"""LoRA experts: a PEFT adapter on a model, read as that model with the adapter merged in.

An expert given as a PEFT adapter directory (``adapter_config.json`` + adapter weights), or as
mergekit's ``model+adapter``, is the model whose adapted weights are ``W + delta`` with
``delta = transpose(B @ A) * scale`` (``scale = lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA;
``rank_pattern`` / ``alpha_pattern`` per module), exactly as PEFT's ``merge_and_unload`` (and
so mergekit, which calls it) computes it: the adapter in float32, added to the weight and
rounded once to its dtype. ``modules_to_save`` replace their tensors. No merged copy is
written: the file path expands one tensor at a time, the resident path keeps the factors.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from merging.errors import MergeError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."
_FACTOR = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.weight)?$")


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


@dataclass(frozen=True)
class LowRank:
    """One adapted weight's factors: ``delta = transpose(B @ A) * scale``."""

    a: Tensor
    b: Tensor
    scale: float
    transpose: bool  # fan_in_fan_out layers (GPT-2's Conv1D), and embeddings

    def delta(self) -> Tensor:
        """The float32 delta (PEFT computes it in float32: it casts the adapter up when it loads it)."""
        d = self.b.float() @ self.a.float()
        return (d.T if self.transpose else d) * self.scale

    def to(self, device: torch.device) -> LowRank:
        return LowRank(self.a.to(device), self.b.to(device), self.scale, self.transpose)

    def applied(self, weight: Tensor) -> Tensor:
        """``weight`` with the adapter merged in, in ``weight``'s dtype (PEFT's ``weight += delta``)."""
        return (weight.float() + self.delta().to(weight.device)).to(weight.dtype)


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    """PEFT's per-module override: a key matches a module name that ends with it (or as a regex)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


class LoraReader:
    """A :class:`merging.io.TensorReader` of ``model`` (another reader) with ``adapter_dir`` merged in."""

    def __init__(self, model, adapter_dir: str | Path) -> None:
        self.model = model
        self.dir = Path(adapter_dir)
        try:
            config = json.loads((self.dir / ADAPTER_CONFIG).read_text())
        except (OSError, ValueError) as exc:
            raise MergeError(f"adapter '{self.dir}': {ADAPTER_CONFIG} cannot be read: {exc}") from exc
        if str(config.get("peft_type", "LORA")).upper() != "LORA":
            raise MergeError(f"adapter '{self.dir}': a {config.get('peft_type')} adapter; only LoRA adapters merge")
        for flag, what in (("use_dora", "DoRA"), ("layer_replication", "layer replication")):
            if config.get(flag):
                raise MergeError(f"adapter '{self.dir}': {what} adapters are not supported; merge it into its model "
                                 "first (PEFT's merge_and_unload) and name that model")
        if config.get("bias", "none") != "none" or config.get("lora_bias"):
            raise MergeError(f"adapter '{self.dir}': adapters that train biases are not supported; merge it into its "
                             "model first (PEFT's merge_and_unload) and name that model")
        weights = _load_weights(self.dir)
        keys = set(model.keys())
        factors: dict[str, dict[str, Tensor]] = {}
        self.replaced: dict[str, Tensor] = {}
        for key, tensor in weights.items():
            name = key.removeprefix(PEFT_PREFIX)
            match = _FACTOR.match(name)
            if match is None:  # a module PEFT saved whole (modules_to_save)
                name = name.replace(".modules_to_save.default", "")
                if name not in keys:
                    raise MergeError(f"adapter '{self.dir}': tensor '{key}' replaces '{name}', which the model has not")
                self.replaced[name] = tensor
                continue
            factors.setdefault(match["module"], {})[match["kind"]] = tensor
        self.low_ranks: dict[str, LowRank] = {}
        rslora = bool(config.get("use_rslora"))
        for module, parts in factors.items():
            target = f"{module}.weight"
            if target not in keys:
                raise MergeError(f"adapter '{self.dir}': it adapts '{module}', which the model has no "
                                 f"'{target}' for (is it an adapter of this base?)")
            embedding = "lora_embedding_A" in parts
            a, b = (parts.get("lora_embedding_A"), parts.get("lora_embedding_B")) if embedding else \
                   (parts.get("lora_A"), parts.get("lora_B"))
            if a is None or b is None:
                raise MergeError(f"adapter '{self.dir}': module '{module}' lacks its A or B factor")
            r = a.shape[0]
            alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
            scale = alpha / math.sqrt(r) if rslora else alpha / r
            transpose = embedding or bool(config.get("fan_in_fan_out"))
            low_rank = LowRank(a, b, scale, transpose)
            shape = _delta_shape(low_rank)
            if shape != tuple(model.shape(target)):
                raise MergeError(f"adapter '{self.dir}': its delta of '{target}' has shape {shape}, the model's "
                                 f"tensor {tuple(model.shape(target))}")
            self.low_ranks[target] = low_rank

    def keys(self) -> list[str]:
        return self.model.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.model.shape(name)

    def dtype(self, name: str):
        return self.model.dtype(name)

    def get(self, name: str) -> Tensor:
        if name in self.replaced:
            return self.replaced[name].to(self.model.dtype(name)).clone()
        weight = self.model.get(name)
        low_rank = self.low_ranks.get(name)
        return weight if low_rank is None else low_rank.applied(weight)


def _delta_shape(low_rank: LowRank) -> tuple[int, ...]:
    rows, cols = low_rank.b.shape[0], low_rank.a.shape[1]
    return (cols, rows) if low_rank.transpose else (rows, cols)


def _load_weights(adapter_dir: Path) -> dict[str, Tensor]:
    for name in ADAPTER_WEIGHTS:
        path = adapter_dir / name
        if path.is_file():
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                return load_file(str(path))
            return torch.load(path, map_location="cpu", weights_only=True)
    raise MergeError(f"adapter '{adapter_dir}': no {' or '.join(ADAPTER_WEIGHTS)}")


__all__ = ["ADAPTER_CONFIG", "LoraReader", "LowRank", "is_adapter"]
