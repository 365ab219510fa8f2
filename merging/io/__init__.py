"""Checkpoint reading, in one place: where a model lives (a directory or a hub id in the local
cache), its weight files, whole state dicts, one tensor at a time, and the safetensors format
read and written without memory maps."""

from merging.io.checkpoint import (
    BIN_INDEX,
    SAFETENSORS_INDEX,
    CheckpointReader,
    StateDictReader,
    TensorReader,
    check_checkpoint,
    load_state_dict,
    weight_files,
)
from merging.io.locate import ModelNotFound, is_hub_id, locate
from merging.io.lora import LoraReader, LowRank, is_adapter
from merging.io.reference import model_dir, open_reference, split_adapter
from merging.io.safetensors_stream import SafetensorsReader, SafetensorsWriter

__all__ = [
    "BIN_INDEX",
    "SAFETENSORS_INDEX",
    "CheckpointReader",
    "LoraReader",
    "LowRank",
    "ModelNotFound",
    "SafetensorsReader",
    "SafetensorsWriter",
    "StateDictReader",
    "TensorReader",
    "check_checkpoint",
    "is_adapter",
    "is_hub_id",
    "load_state_dict",
    "locate",
    "model_dir",
    "open_reference",
    "split_adapter",
    "weight_files",
]
