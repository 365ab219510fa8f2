"""A model reference as specs and mergekit YAML write it, opened as a tensor reader: a checkpoint
directory or hub id, a PEFT adapter directory (applied to the merge's base), or mergekit's
``model+adapter`` (the adapter applied to that model)."""

from __future__ import annotations

from pathlib import Path

from merging.io.checkpoint import CheckpointReader
from merging.io.locate import locate
from merging.io.lora import LoraReader, is_adapter


def split_adapter(ref: str) -> tuple[str, str | None]:
    """``model+adapter`` -> (model, adapter); a path that exists as written is never split."""
    text = str(ref)
    if "+" in text and not Path(text).exists():
        model, adapter = text.split("+", 1)
        return model, adapter
    return text, None


def model_dir(ref: str, base: str | None = None, *, download: bool = True) -> Path:
    """The directory holding the weights ``ref``'s config and tokenizer come from: the model of
    ``model+adapter``, the base for an adapter directory."""
    model, adapter = split_adapter(ref)
    path = locate(model, download=download)
    if adapter is None and is_adapter(path) and base is not None:
        return locate(base, download=download)
    return path


def open_reference(ref: str | Path, base: str | Path | None = None, *, download: bool = True):
    """A :class:`merging.io.TensorReader` for ``ref``; ``base``: what an adapter directory applies to."""
    model, adapter = split_adapter(str(ref))
    if adapter is not None:
        return LoraReader(open_reference(model, base, download=download), locate(adapter, download=download))
    path = locate(model, download=download)
    if is_adapter(path):
        if base is None:
            from merging.errors import MergeError

            raise MergeError(f"model '{ref}' is a LoRA adapter: it needs a base model to apply to")
        return LoraReader(CheckpointReader(locate(base, download=download)), path)
    return CheckpointReader(path)


__all__ = ["model_dir", "open_reference", "split_adapter"]
