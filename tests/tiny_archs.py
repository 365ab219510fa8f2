"""Tiny random checkpoints of several architectures, for tests that must see real checkpoint layouts.

transformers 5 renames and fuses some tensors when it loads a model (``transformers/conversion_mapping.py``):
GPT-NeoX's ``embed_out`` becomes ``lm_head``, Mixtral's per-expert ``block_sparse_moe.experts.N.w1/w2/w3``
and Qwen2-MoE's ``mlp.experts.N.gate_proj/up_proj/down_proj`` become fused ``mlp.experts.gate_up_proj`` /
``down_proj``. ``save_pretrained`` reverts those conversions, so the files written here hold the original
checkpoint names, as hub checkpoints do. The set also covers tied embeddings (no ``lm_head`` in the files),
a bfloat16 checkpoint in several shards, Gemma-2's zero-centred norms and Phi-3's fused projections.

Each set is a base and ``experts`` experts; an expert is the base plus a seeded random perturbation of
about 5% of each tensor's RMS, so it passes the merger's ancestry check as a fine-tune would. Perturbing
the live parameters (fused or not) perturbs every checkpoint tensor they are saved to. Weights are
generated in float32 and cast to the checkpoint's dtype when saved. A set builds in well under a second.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Phi3Config,
    PretrainedConfig,
    Qwen2Config,
    Qwen2MoeConfig,
)

from evals.tokenizer import build_char_tokenizer

HIDDEN = 16
INTERMEDIATE = 32
LAYERS = 2
HEADS = 2
HEAD_DIM = HIDDEN // HEADS
MOE_EXPERTS = 4
MOE_TOP_K = 2
EXPERT_RELATIVE_DELTA = 0.05  # per tensor, relative to its RMS: far below the ancestry check's bound (0.5)
NORM_SPREAD = 0.1  # 1-D weights start at constants (norms at 1 or 0, biases at 0): give them a spread


def _common(tok) -> dict:
    return dict(vocab_size=len(tok), hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                max_position_embeddings=64, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)


def _llama(tok) -> PretrainedConfig:
    return LlamaConfig(**_common(tok), intermediate_size=INTERMEDIATE, num_key_value_heads=1,
                       tie_word_embeddings=False)


def _qwen2_tied(tok) -> PretrainedConfig:
    return Qwen2Config(**_common(tok), intermediate_size=INTERMEDIATE, num_key_value_heads=1,
                       tie_word_embeddings=True)


def _mistral(tok) -> PretrainedConfig:
    return MistralConfig(**_common(tok), intermediate_size=INTERMEDIATE, num_key_value_heads=1,
                         head_dim=HEAD_DIM, sliding_window=32, tie_word_embeddings=False)


def _gemma2(tok) -> PretrainedConfig:
    return Gemma2Config(**_common(tok), intermediate_size=INTERMEDIATE, num_key_value_heads=1, head_dim=HEAD_DIM,
                        query_pre_attn_scalar=HEAD_DIM, sliding_window=32, tie_word_embeddings=True)


def _phi3(tok) -> PretrainedConfig:
    return Phi3Config(**_common(tok), intermediate_size=INTERMEDIATE, num_key_value_heads=HEADS,
                      tie_word_embeddings=False)


def _gpt_neox(tok) -> PretrainedConfig:
    return GPTNeoXConfig(**_common(tok), intermediate_size=INTERMEDIATE, rotary_pct=0.5,
                         tie_word_embeddings=False)


def _mixtral(tok) -> PretrainedConfig:
    return MixtralConfig(**_common(tok), intermediate_size=INTERMEDIATE, num_key_value_heads=1, head_dim=HEAD_DIM,
                         num_local_experts=MOE_EXPERTS, num_experts_per_tok=MOE_TOP_K, tie_word_embeddings=False)


def _qwen2_moe(tok) -> PretrainedConfig:
    return Qwen2MoeConfig(**_common(tok), intermediate_size=INTERMEDIATE, moe_intermediate_size=INTERMEDIATE // 2,
                          shared_expert_intermediate_size=INTERMEDIATE, num_key_value_heads=1,
                          num_experts=MOE_EXPERTS, num_experts_per_tok=MOE_TOP_K, decoder_sparse_step=1,
                          tie_word_embeddings=False)


@dataclass(frozen=True)
class ArchSpec:
    config: Callable[..., PretrainedConfig]
    dtype: torch.dtype | None = None  # None: the builder's ``dtype`` argument
    shard_bytes: int | None = None  # None: the builder's ``shard_bytes`` argument (None there: one file)


ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec(_llama),
    "qwen2_tied": ArchSpec(_qwen2_tied),
    "mistral_bf16_sharded": ArchSpec(_mistral, dtype=torch.bfloat16, shard_bytes=8_000),
    "gemma2": ArchSpec(_gemma2),
    "phi3": ArchSpec(_phi3),
    "gpt_neox": ArchSpec(_gpt_neox),
    "mixtral": ArchSpec(_mixtral),
    "qwen2_moe": ArchSpec(_qwen2_moe),
}
# Architectures whose checkpoint tensor names differ from the loaded model's parameter names.
RENAMED_ARCHS = ("gpt_neox", "mixtral", "qwen2_moe")


@dataclass(frozen=True)
class ArchSet:
    """A base checkpoint and its experts, each a directory with config, weights and tokenizer."""

    arch: str
    base: Path
    experts: dict[str, Path]  # expert name -> directory, in order
    dtype: torch.dtype  # of every weight in the files


def build_arch_set(root: Path, arch: str, *, dtype: torch.dtype = torch.float32, shard_bytes: int | None = None,
                   experts: int = 2, seed: int = 0) -> ArchSet:
    """Write ``base`` and ``expert-<i>`` (i < ``experts``) of ``arch`` under ``root``; return them.

    ``dtype`` and ``shard_bytes`` (``max_shard_size`` of ``save_pretrained``) apply where the
    architecture's entry does not fix them ("mistral_bf16_sharded" is bfloat16 in several shards).
    """
    try:
        spec = ARCHS[arch]
    except KeyError:
        raise ValueError(f"unknown arch '{arch}'; known: {sorted(ARCHS)}") from None
    dtype = spec.dtype or dtype
    shard_bytes = spec.shard_bytes or shard_bytes
    root = Path(root)
    tok = build_char_tokenizer()
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the model's own initialisation
    model = AutoModelForCausalLM.from_config(spec.config(tok), dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(NORM_SPREAD * torch.randn(p.shape, generator=gen))
    base_state = {n: p.detach().clone() for n, p in model.named_parameters()}

    def save(path: Path) -> None:
        kwargs = {} if shard_bytes is None else {"max_shard_size": shard_bytes}
        model.to(dtype).save_pretrained(path, **kwargs)
        model.to(torch.float32)
        tok.save_pretrained(path)

    save(root / "base")
    expert_dirs = {}
    for i in range(experts):
        with torch.no_grad():
            for name, p in model.named_parameters():
                b = base_state[name]
                rms = b.pow(2).mean().sqrt()
                p.copy_(b + EXPERT_RELATIVE_DELTA * rms * torch.randn(b.shape, generator=gen))
        expert_dirs[f"e{i}"] = root / f"expert-{i}"
        save(expert_dirs[f"e{i}"])
    return ArchSet(arch, root / "base", expert_dirs, dtype)


__all__ = ["ARCHS", "RENAMED_ARCHS", "ArchSet", "build_arch_set"]
