"""The demo model zoo: a tiny Llama base and one expert per bundled task, built on the CPU.

The recipe follows ``shared/notes/offline-recipe.md``: the base is a checkpoint taken in the
middle of training at a constant high learning rate (partial skill on every task), and each
expert is a short fine-tune at a much lower rate on its own task. The experts then stay in
the base's basin, so merging them can beat every single expert.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from filelock import FileLock
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from evals.synthetic import DATA_DIR, TASKS, read_split
from evals.tokenizer import build_char_tokenizer

log = logging.getLogger(__name__)

ZOO_FORMAT = 2  # bump when the layout of a built zoo changes


@dataclass(frozen=True)
class ZooRecipe:
    """Everything that determines the built weights; its hash names the cache directory."""

    tasks: tuple[str, ...] = ("add", "reverse", "sort", "upper")
    # Base mix favours addition, the hardest task for a model this small.
    base_mix: tuple[float, ...] = (0.40, 0.20, 0.25, 0.15)
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    max_positions: int = 128
    batch_size: int = 128
    base_steps: int = 500
    base_lr: float = 2e-3  # held constant after warm-up: the base stays mid-training
    base_warmup: int = 50
    expert_steps: int = 150
    expert_lr: float = 3e-4  # well below the base's rate, so experts stay in its basin
    expert_warmup: int = 30
    expert_final_lr_frac: float = 0.05
    seed: int = 0
    threads: int = 2

    def fingerprint(self) -> str:
        blob = json.dumps({"format": ZOO_FORMAT, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


# Same base; experts fine-tuned 4x longer at half the base's rate (not a tenth): larger deltas that interfere more.
LONG_RECIPE = ZooRecipe(expert_steps=600, expert_lr=1e-3, expert_warmup=60)


@dataclass
class Zoo:
    """Paths of a built zoo, as written to ``zoo.json``."""

    root: Path
    base: Path
    experts: dict[str, Path]  # expert name -> model dir
    expert_tasks: dict[str, list[str]] = field(default_factory=dict)  # expert -> lm-eval tasks
    calibration: dict[str, Path] = field(default_factory=dict)  # expert -> its task's train split

    @classmethod
    def load(cls, root: Path) -> Zoo:
        meta = json.loads((root / "zoo.json").read_text())
        return cls(
            root=root,
            base=Path(meta["base"]),
            experts={e["name"]: Path(e["path"]) for e in meta["experts"]},
            expert_tasks={e["name"]: e["tasks"] for e in meta["experts"]},
            calibration={e["name"]: _bundled(e["calibration"]) for e in meta["experts"]},
        )


def _bundled(recorded: str) -> Path:
    """An expert's calibration texts: its task's bundled train split in this installation. The zoo
    cache is shared by every checkout on a machine, so a path another checkout recorded is read as
    ``TASK/train.jsonl`` under this one's data."""
    return DATA_DIR / Path(recorded).parent.name / Path(recorded).name


def _encode_examples(
    tok: PreTrainedTokenizerFast, rows: Sequence[dict]
) -> list[tuple[list[int], int]]:
    """(token ids of BOS + prompt + target + newline, index where the answer starts)."""
    out = []
    for row in rows:
        prompt_ids = tok(row["prompt"])["input_ids"]
        full_ids = tok(row["prompt"] + row["target"] + "\n")["input_ids"]
        out.append((full_ids, len(prompt_ids)))
    return out


def _batch(examples: Sequence[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, ...]:
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (ids, answer_start) in enumerate(examples):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
        # Loss on the answer and its terminator only: the prompt is the task's input.
        labels[i, answer_start : len(ids)] = torch.tensor(ids[answer_start:])
    return input_ids, mask, labels


def _train(
    model: LlamaForCausalLM,
    pools: Sequence[list[tuple[list[int], int]]],
    mix: Sequence[float],
    steps: int,
    lr_at: Callable[[int], float],
    recipe: ZooRecipe,
    pad_id: int,
    rng: random.Random,
) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=lr_at(0), betas=(0.9, 0.98), weight_decay=0.0)
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        picks = rng.choices(range(len(pools)), weights=mix, k=recipe.batch_size)
        examples = [rng.choice(pools[p]) for p in picks]
        input_ids, mask, labels = _batch(examples, pad_id)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log.info("step %d/%d loss %.4f", step + 1, steps, loss.item())
    model.eval()


def _base_lr(recipe: ZooRecipe) -> Callable[[int], float]:
    return lambda step: recipe.base_lr * min(1.0, (step + 1) / recipe.base_warmup)


def _expert_lr(recipe: ZooRecipe) -> Callable[[int], float]:
    def lr(step: int) -> float:
        if step < recipe.expert_warmup:
            return recipe.expert_lr * (step + 1) / recipe.expert_warmup
        frac = (step - recipe.expert_warmup) / max(1, recipe.expert_steps - recipe.expert_warmup)
        return recipe.expert_lr * (1.0 - (1.0 - recipe.expert_final_lr_frac) * frac)

    return lr


def build_zoo(out: Path, recipe: ZooRecipe = ZooRecipe(), progress: Callable[[str], None] | None = None) -> Zoo:
    """Train base and experts into ``out`` (written to a temp dir, then renamed into place)."""
    note = progress or (lambda msg: log.info(msg))
    unknown = [t for t in recipe.tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown synthetic task(s) {unknown}; known: {sorted(TASKS)}")
    if len(recipe.base_mix) != len(recipe.tasks):
        raise ValueError("base_mix needs one weight per task")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    try:
        return build_staged(out, lambda staging: _build_into(staging, out, recipe, note))
    finally:
        torch.set_num_threads(previous_threads)


def build_staged(out: Path, fill: Callable[[Path], None]) -> Zoo:
    """``fill`` a staging directory beside ``out``, then put it in ``out``'s place: a build that
    fails half way never leaves a half-built zoo behind."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        fill(staging)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return Zoo.load(out)


def _build_into(staging: Path, final: Path, recipe: ZooRecipe, note: Callable[[str], None]) -> None:
    torch.manual_seed(recipe.seed)
    rng = random.Random(recipe.seed)
    tok = build_char_tokenizer()
    pools = [_encode_examples(tok, read_split(t, "train")) for t in recipe.tasks]
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_heads,
        max_position_embeddings=recipe.max_positions,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    base = LlamaForCausalLM(config)
    note(f"training base ({recipe.base_steps} steps on {', '.join(recipe.tasks)})")
    _train(base, pools, recipe.base_mix, recipe.base_steps, _base_lr(recipe), recipe, tok.pad_token_id, rng)
    _save(base, tok, staging / "base")
    base_state = {k: v.clone() for k, v in base.state_dict().items()}

    experts = []
    for i, task in enumerate(recipe.tasks):
        note(f"training expert '{task}' ({recipe.expert_steps} steps)")
        base.load_state_dict(base_state)
        _train(base, [pools[i]], [1.0], recipe.expert_steps, _expert_lr(recipe), recipe, tok.pad_token_id, rng)
        _save(base, tok, staging / f"expert-{task}")
        experts.append({"name": task, "path": str(final / f"expert-{task}"), "tasks": [f"mmmo_{task}"],
                        "calibration": f"{task}/train.jsonl"})

    meta = {"format": ZOO_FORMAT, "recipe": asdict(recipe), "base": str(final / "base"), "experts": experts}
    (staging / "zoo.json").write_text(json.dumps(meta, indent=2))


def _save(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, path: Path) -> None:
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)


def default_zoo_dir(cache_dir: Path, recipe: ZooRecipe = ZooRecipe()) -> Path:
    return cache_dir / f"zoo-{recipe.fingerprint()}"


def ensure_zoo(cache_dir: Path, recipe: ZooRecipe = ZooRecipe(), progress: Callable[[str], None] | None = None) -> Zoo:
    """Return the cached zoo for ``recipe``, building it once (a file lock guards parallel callers)."""
    out = default_zoo_dir(cache_dir, recipe)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if (out / "zoo.json").exists():
            return Zoo.load(out)
        return build_zoo(out, recipe, progress)


