"""Activation statistics for OBIM's saliency: per input channel, ``sum_t x_tj^2`` of every nn.Linear.

OBM (our reading of the paper, see README) scores a delta entry ``d_ij`` of a linear layer by
the layer-wise reconstruction loss its removal causes, with the diagonal Hessian
``H_jj = 2 sum_t x_tj^2``: ``s_ij = d_ij^2 * sum_t x_tj^2``. One forward pass of calibration
text through each *expert* collects those sums; they are cached on disk.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from merging.io import locate, split_adapter, weight_files
from merging.io.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, is_adapter

HOOK_VERSION = 2  # bump when what the hooks accumulate changes: old caches are then ignored


def collect_input_energy(model: nn.Module, batches: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    """``{weight tensor name: sum over tokens of x^2 per input channel}`` for every nn.Linear.

    Padding positions are excluded: each batch's ``attention_mask`` selects the tokens counted.
    """
    sums: dict[str, Tensor] = {}
    mask_holder: dict[str, Tensor | None] = {"mask": None}
    handles = []

    def hook(name: str):
        def accumulate(_module: nn.Module, inputs: tuple[Tensor, ...], _output: Tensor) -> None:
            x = inputs[0].detach().float()  # (B, T, in)
            mask = mask_holder["mask"]
            if mask is not None and x.dim() == 3 and mask.shape == x.shape[:2]:
                x = x * mask.unsqueeze(-1).to(x.dtype)
            energy = x.pow(2).reshape(-1, x.shape[-1]).sum(0)  # (in,)
            sums[name] = sums[name] + energy if name in sums else energy
        return accumulate

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(hook(f"{name}.weight")))
    try:
        with torch.no_grad():
            for batch in batches:
                mask_holder["mask"] = batch.get("attention_mask")
                model(**batch)
    finally:
        for h in handles:
            h.remove()
    return {k: v.cpu() for k, v in sums.items()}


def model_fingerprint(model_dir: Path, base_dir: Path | None = None) -> str:
    """Cheap identity of a checkpoint: config plus, per weight file, its size and first/last MiB
    (a LoRA adapter: its config and weights, and its base's fingerprint)."""
    h = hashlib.sha256()
    model_dir = Path(model_dir)
    if is_adapter(model_dir):
        h.update((model_dir / ADAPTER_CONFIG).read_bytes())
        files = [model_dir / n for n in ADAPTER_WEIGHTS if (model_dir / n).is_file()]
        if base_dir is not None:
            h.update(model_fingerprint(base_dir).encode())
    else:
        config = model_dir / "config.json"
        if config.exists():
            h.update(config.read_bytes())
        files = weight_files(model_dir)
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read(1 << 20))
    return h.hexdigest()[:24]


def texts_fingerprint(texts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(texts)).encode()).hexdigest()[:24]


def calibration_stats(model_dir: Path, texts: Sequence[str], cache_dir: Path | None, *,
                      batch_size: int = 32, max_length: int = 512, device: str = "cpu",
                      base_dir: Path | None = None) -> dict[str, Tensor]:
    """Input energy of ``model_dir`` over ``texts``, from the cache when the same pair was seen.
    A LoRA adapter directory runs as ``base_dir`` with the adapter merged in (PEFT)."""
    key = f"{model_fingerprint(model_dir, base_dir)}-{texts_fingerprint(texts)}-v{HOOK_VERSION}"
    path = Path(cache_dir) / "saliency" / f"{key}.safetensors" if cache_dir else None
    if path is not None and path.exists():
        return load_file(str(path))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # In the checkpoint's own dtype: the hooks accumulate in float32, no float32 copy of the model is needed.
    adapter = model_dir if is_adapter(model_dir) else None
    if adapter is not None:
        if base_dir is None:
            raise ValueError(f"'{model_dir}' is a LoRA adapter: its calibration needs the base it applies to")
        model_dir = Path(base_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model = model.to(device).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    batches = []
    for i in range(0, len(texts), batch_size):
        enc = tok(list(texts[i : i + batch_size]), return_tensors="pt", padding=True, truncation=True,
                  max_length=max_length)
        batches.append({k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")})
    stats = _by_file_name(model, model_dir, collect_input_energy(model, batches))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in stats.items()}, str(tmp))
        tmp.replace(path)
    return stats


def _by_file_name(model: nn.Module, model_dir: Path, stats: dict[str, Tensor]) -> dict[str, Tensor]:
    """Statistics keyed by the checkpoint's tensor names, which merges use, where transformers
    renamed a weight on load (e.g. GPT-NeoX's output head). Fused weights have no nn.Linear: none."""
    from merging.io import CheckpointReader
    from merging.live_layout import LiveLayout

    reader = CheckpointReader(model_dir)
    layout = LiveLayout(model, {k: reader.shape(k) for k in reader.keys()})
    live_to_file = {t.sources[0][0]: t.sources[0][1] for t in layout.targets.values() if t.is_plain}
    return {live_to_file.get(name, name): value for name, value in stats.items()}


def stats_for(config_experts, cache_dir: Path | None, device: str = "cpu", *,
              texts_of: Callable[[str], list[str]], base: str | None = None) -> dict[str, dict[str, Tensor]]:
    """Statistics of every expert that names calibration data (cached); the others use magnitude.

    ``texts_of`` turns an expert's calibration source into texts (the service passes one that
    also reads lm-eval tasks' documents). ``base``: what LoRA adapter experts apply to.
    """
    return {e.name: _expert_stats(e, base, texts_of, cache_dir, device) for e in config_experts if e.calibration}


def _expert_stats(expert, base: str | None, texts_of, cache_dir, device) -> dict[str, Tensor]:
    model, adapter = split_adapter(expert.path)
    if adapter is not None:  # mergekit's model+adapter: the adapter on that model
        return calibration_stats(locate(adapter), texts_of(expert.calibration), cache_dir, device=device,
                                 base_dir=locate(model))
    return calibration_stats(locate(model), texts_of(expert.calibration), cache_dir, device=device,
                             base_dir=locate(base) if base is not None else None)
