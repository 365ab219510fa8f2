"""A tiny untrained zoo for tests: the demo zoo's layout, names and tokenizer, built in about a second.

The base is a randomly initialised Llama (4 layers of width 16, so layer-group tests see the demo
zoo's layer count); each expert is the base plus a small random perturbation (about 5% of each
tensor's RMS), so it passes the merger's ancestry check as a fine-tuned descendant would. The
models have no skill: tests that assert scores of trained models use the demo zoo (``evals.zoo``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from evals.tokenizer import build_char_tokenizer
from evals.zoo import ZOO_FORMAT, Zoo, build_staged

TINY_TASKS = ("add", "reverse", "sort", "upper")
TINY_HIDDEN = 16
TINY_INTERMEDIATE = 32
TINY_LAYERS = 4
TINY_HEADS = 2
EXPERT_RELATIVE_DELTA = 0.05  # per tensor, relative to its RMS: far below the ancestry check's bound


def build_tiny_zoo(root: Path, seed: int = 0) -> Zoo:
    """Write base + one expert per task (``expert-<task>``) and ``zoo.json`` under ``root``; return it loaded."""
    root = Path(root)
    return build_staged(root, lambda staging: _build_into(staging, root, seed))


def _build_into(staging: Path, final: Path, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    tok = build_char_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=TINY_HIDDEN,
        intermediate_size=TINY_INTERMEDIATE,
        num_hidden_layers=TINY_LAYERS,
        num_attention_heads=TINY_HEADS,
        num_key_value_heads=TINY_HEADS,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)  # the model's own initialisation
    model = LlamaForCausalLM(config).eval()
    # Norm weights start at exactly 1: give them some spread, as trained weights have.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    _save(model, tok, staging / "base")
    base_state = {k: v.clone() for k, v in model.state_dict().items()}

    experts = []
    for task in TINY_TASKS:
        with torch.no_grad():
            for name, p in model.named_parameters():
                b = base_state[name]
                rms = b.float().pow(2).mean().sqrt()
                p.copy_(b + EXPERT_RELATIVE_DELTA * rms * torch.randn(b.shape, generator=gen))
        _save(model, tok, staging / f"expert-{task}")
        experts.append({"name": task, "path": str(final / f"expert-{task}"), "tasks": [f"mmmo_{task}"],
                        "calibration": f"{task}/train.jsonl"})

    meta = {"format": ZOO_FORMAT, "recipe": {"tiny": True, "seed": seed, "hidden_size": TINY_HIDDEN,
                                             "num_layers": TINY_LAYERS}, "base": str(final / "base"),
            "experts": experts}
    (staging / "zoo.json").write_text(json.dumps(meta, indent=2))


def _save(model: LlamaForCausalLM, tok, path: Path) -> None:
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
