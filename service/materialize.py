"""A merged model written to disk: ``mmmo merge``, ``mmmo study materialize`` and a worker's
materialise job all come through here, on the merge engine's file path (one tensor at a time)."""

from __future__ import annotations

import tarfile
import tempfile
from pathlib import Path

from merging.config import MergeConfig


def obim_stats(config: MergeConfig, cache_dir: Path | None, device: str, dtype=None) -> dict:
    """The calibration statistics a merge of ``config`` reads (``merging.saliency.Stats``, cached on
    disk), computed on ``device`` in ``dtype`` (a torch dtype; None: the checkpoints'); other methods
    and OBIM's magnitude saliency read none."""
    from merging.saliency import readings_of

    if not readings_of(config):
        return {}
    from evals.texts import calibration_texts
    from merging.saliency import stats_for

    return stats_for(config, cache_dir, device, texts_of=calibration_texts, dtype=dtype)


def write_model(config: MergeConfig, out_dir: Path, *, dtype: str | None, device: str,
                cache_dir: Path | None, **kwargs) -> Path:
    """``config``'s merged model written through the merge engine's file path."""
    from merging.files import merge_to_dir, parse_dtype

    stats = obim_stats(config, cache_dir, device, parse_dtype(config.dtype))
    return merge_to_dir(config, out_dir, dtype=dtype, device=device, stats=stats,
                        **kwargs)


def materialize(config: MergeConfig, out_tar: Path, *, dtype: str | None, device: str,
                cache_dir: Path | None) -> int:
    """Write ``config``'s merged model and pack it as a tar archive (safetensors do not compress:
    no gzip); returns the archive's size."""
    with tempfile.TemporaryDirectory(prefix="mmmo-materialize-") as tmp:
        model_dir = write_model(config, Path(tmp) / "model", dtype=dtype, device=device, cache_dir=cache_dir)
        with tarfile.open(out_tar, "w") as tar:
            for path in sorted(model_dir.iterdir()):
                tar.add(path, arcname=path.name)
    return out_tar.stat().st_size
