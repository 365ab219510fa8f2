"""Activation statistics for OBIM's saliency: one value per input channel of every nn.Linear.

OBM (our reading of the paper, see README) scores a delta entry ``d_ij`` of a linear layer by
the layer-wise reconstruction loss its removal causes, ``s_ij = d_ij^2 * v_j``, with

* ``obd``: the diagonal Hessian, ``v_j = sum_t x_tj^2`` (one forward pass, O(in) memory);
* ``obs``: ``v_j = 1 / [H^-1]_jj`` with ``H = X^T X`` plus SparseGPT's damping (1% of its mean
  diagonal), the O(in^2) Hessian accumulated for a few layers at a time within a memory budget,
  inverted by Cholesky and freed before the next layers' pass.

Calibration text runs through each *expert*, on the worker's device in the set's dtype; the
statistics are cached on disk, keyed by model, texts, kind, dtype and hook version. ``Stats``, what
the mergers take, is keyed by *reading* (``obd/own``, ``obs/shared``...: ``Obim.stats_reading``),
then expert, then tensor.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from merging.errors import MergeError
from merging.io import locate, split_adapter, weight_files
from merging.io.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, is_adapter

HOOK_VERSION = 2  # bump when what the hooks accumulate changes: old caches are then ignored
KINDS = ("obd", "obs")
OBS_DAMPING = 0.01  # SparseGPT's percdamp: of the Hessian's mean diagonal
OBS_MAX_BYTES = 2 << 30  # Hessians accumulated at once (float32): more layers than fit take more passes

Stats = Mapping[str, Mapping[str, Mapping[str, Tensor]]]  # reading -> expert -> tensor -> per input channel


class _ChunkDone(Exception):
    """Raised by a hook once every layer of the chunk has seen the batch: the rest of the forward is skipped."""


def _unpadded_rows(x: Tensor, mask: Tensor | None) -> Tensor:
    """A linear layer's input as float32 rows (tokens, in), padding positions zeroed."""
    x = x.detach().float()
    if mask is not None and x.dim() == 3 and mask.shape == x.shape[:2]:
        x = x * mask.unsqueeze(-1).to(x.dtype)
    return x.reshape(-1, x.shape[-1])


def collect_input_energy(model: nn.Module, batches: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    """``{weight tensor name: sum over tokens of x^2 per input channel}`` for every nn.Linear.

    Padding positions are excluded: each batch's ``attention_mask`` selects the tokens counted.
    """
    sums: dict[str, Tensor] = {}
    mask_holder: dict[str, Tensor | None] = {"mask": None}
    handles = []

    def hook(name: str):
        def accumulate(_module: nn.Module, inputs: tuple[Tensor, ...], _output: Tensor) -> None:
            x = _unpadded_rows(inputs[0], mask_holder["mask"])  # (tokens, in)
            energy = x.pow(2).sum(0)  # (in,)
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


def collect_obs_weights(model: nn.Module, batches: Sequence[dict[str, Tensor]], *,
                        damping: float = OBS_DAMPING, max_bytes: int = OBS_MAX_BYTES) -> dict[str, Tensor]:
    """``{weight tensor name: 1 / [H^-1]_jj per input channel}`` for every nn.Linear, where
    ``H = sum_t x_t x_t^T`` over the unpadded tokens, damped as SparseGPT damps it.

    The layers are taken in chunks whose float32 Hessians fit ``max_bytes`` (at least one layer a
    chunk), one pass over the batches per chunk, stopped once the chunk's layers have all run."""
    linears = [(f"{name}.weight", m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    chunks: list[list[tuple[str, nn.Module]]] = []
    size = 0
    for name, module in linears:
        need = 4 * module.in_features ** 2
        if not chunks or size + need > max_bytes:
            chunks.append([])
            size = 0
        chunks[-1].append((name, module))
        size += need
    out: dict[str, Tensor] = {}
    for chunk in chunks:
        hessians = _chunk_hessians(model, chunk, batches)
        for name in list(hessians):
            out[name] = obs_weights(hessians.pop(name), damping).cpu()
    return out


def _chunk_hessians(model: nn.Module, chunk: list[tuple[str, nn.Module]],
                    batches: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    """``X^T X`` (float32) of each layer of ``chunk`` over the batches' unpadded tokens."""
    hessians: dict[str, Tensor] = {}
    seen: set[str] = set()
    everyone = frozenset(n for n, _ in chunk)
    mask_holder: dict[str, Tensor | None] = {"mask": None}

    def hook(name: str):
        def accumulate(_module: nn.Module, inputs: tuple[Tensor, ...], _output: Tensor) -> None:
            x = _unpadded_rows(inputs[0], mask_holder["mask"])
            h = hessians.get(name)
            hessians[name] = x.T @ x if h is None else h.addmm_(x.T, x)
            seen.add(name)
            if seen >= everyone:
                raise _ChunkDone
        return accumulate

    handles = [m.register_forward_hook(hook(n)) for n, m in chunk]
    try:
        with torch.no_grad():
            for batch in batches:
                mask_holder["mask"] = batch.get("attention_mask")
                seen.clear()
                try:
                    model(**batch)
                except _ChunkDone:
                    pass
    finally:
        for h in handles:
            h.remove()
    return hessians


def obs_weights(hessian: Tensor, damping: float = OBS_DAMPING) -> Tensor:
    """``1 / diag(H^-1)`` of a symmetric ``H`` (overwritten): channels never active get ``H_jj = 1``
    (SparseGPT's dead inputs), then ``damping`` x the mean diagonal is added, more if Cholesky fails."""
    diag = hessian.diagonal()
    diag.masked_fill_(diag == 0, 1.0)
    step = damping * float(diag.mean())
    for _ in range(6):
        diag.add_(step)
        factor, info = torch.linalg.cholesky_ex(hessian)
        if int(info) == 0:
            return 1.0 / torch.cholesky_inverse(factor).diagonal()
        step *= 10  # not positive definite in float32: damp harder, as SparseGPT's users do
    raise ValueError("the calibration Hessian is not positive definite even with damping")


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
                      base_dir: Path | None = None, kind: str = "obd", dtype: torch.dtype | None = None,
                      obs_max_bytes: int = OBS_MAX_BYTES) -> dict[str, Tensor]:
    """Statistics ``kind`` (``obd``: input energy; ``obs``: ``1 / [H^-1]_jj``) of ``model_dir`` over
    ``texts``, run on ``device`` in ``dtype`` (None: the checkpoint's), from the cache when the same
    were computed before. A LoRA adapter directory runs as ``base_dir`` with the adapter merged in (PEFT)."""
    if kind not in KINDS:
        raise ValueError(f"unknown saliency statistics '{kind}'; known: {list(KINDS)}")
    key = f"{model_fingerprint(model_dir, base_dir)}-{texts_fingerprint(texts)}"
    key += (f"-{kind}" if kind != "obd" else "") + (f"-{str(dtype).removeprefix('torch.')}" if dtype else "")
    path = Path(cache_dir) / "saliency" / f"{key}-v{HOOK_VERSION}.safetensors" if cache_dir else None
    if path is not None and path.exists():
        return load_file(str(path))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # In the set's dtype: the hooks accumulate in float32, no float32 copy of the model is needed.
    adapter = model_dir if is_adapter(model_dir) else None
    if adapter is not None:
        if base_dir is None:
            raise ValueError(f"'{model_dir}' is a LoRA adapter: its calibration needs the base it applies to")
        model_dir = Path(base_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype or "auto")
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
    collected = (collect_obs_weights(model, batches, max_bytes=obs_max_bytes) if kind == "obs"
                 else collect_input_energy(model, batches))
    stats = _by_file_name(model, model_dir, collected)
    del model
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


def readings_of(config) -> list[str]:
    """The calibration statistics a merge of ``config`` (a ``MergeConfig``) reads: its method's
    ``stats_reading`` of its global parameters, which must then be single values."""
    from merging.methods import get_method

    method = get_method(config.method)
    params = dict(config.params)
    for key in ("saliency", "calibration"):
        if key in params and not isinstance(params[key], str):
            raise MergeError(f"parameters: '{key}' must be one value for the whole merge, got {params[key]!r}")
    reading = method.stats_reading(params)
    return [] if reading is None else [reading]


def texts_for(expert, mode: str, shared: str | None, texts_of: Callable[[str], list[str]]) -> list[str]:
    """An expert's calibration texts under ``mode``: its ``own``, the config's ``shared`` general
    text, or ``both`` (its own first). Empty: none (magnitude saliency for that expert)."""
    if mode in ("shared", "both") and shared is None:
        raise MergeError(f"OBIM's calibration '{mode}' needs the config's shared calibration text "
                         "(`calibration:` at the top of the config or spec)")
    own = texts_of(expert.calibration) if mode in ("own", "both") and expert.calibration else []
    return own + (texts_of(shared) if mode in ("shared", "both") else [])


def stats_for(config, cache_dir: Path | None, device: str = "cpu", *, texts_of: Callable[[str], list[str]],
              readings: Sequence[str] | None = None, dtype: torch.dtype | None = None) -> dict:
    """``Stats`` of ``config``'s experts for each reading (by default ``readings_of(config)``), cached;
    experts without texts under a reading are left out (magnitude saliency).

    ``texts_of`` turns a calibration source into texts (the service passes one that also reads
    lm-eval tasks' documents). LoRA adapter experts run on the model they apply to."""
    out: dict[str, dict[str, dict[str, Tensor]]] = {}
    for reading in readings_of(config) if readings is None else readings:
        kind, mode = reading.split("/")
        out[reading] = {}
        for e in config.experts:
            texts = texts_for(e, mode, config.calibration, texts_of)
            if texts:
                out[reading][e.name] = _expert_stats(e, config.base, texts, cache_dir, device, kind, dtype)
    return out


def _expert_stats(expert, base: str | None, texts: list[str], cache_dir, device, kind: str,
                  dtype: torch.dtype | None) -> dict[str, Tensor]:
    model, adapter = split_adapter(expert.path)
    if adapter is not None:  # mergekit's model+adapter: the adapter on that model
        return calibration_stats(locate(adapter), texts, cache_dir, device=device, base_dir=locate(model),
                                 kind=kind, dtype=dtype)
    return calibration_stats(locate(model), texts, cache_dir, device=device, kind=kind, dtype=dtype,
                             base_dir=locate(base) if base is not None else None)
