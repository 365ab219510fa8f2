"""Settings: the one place that reads the environment (``MMMO_*`` variables)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

_UNITS = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6, "gb": 10**9,
          "tb": 10**12, "b": 1}


def parse_bytes(text: str | int) -> int:
    """``20GB``, ``512MiB``, ``1e9`` -> bytes."""
    if isinstance(text, int):
        return text
    lowered = text.strip().lower()
    for unit, factor in _UNITS.items():
        if lowered.endswith(unit):
            return int(float(lowered.removesuffix(unit)) * factor)
    return int(float(lowered))


def _default_home() -> Path:
    return Path.home() / ".mmmo"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MMMO_", extra="ignore")

    home: Path = Field(default_factory=_default_home, description="state: database, tokens")
    cache_dir: Path = Field(default_factory=lambda: Path.home() / ".cache" / "mmmo",
                            description="demo zoo and other rebuildable files")
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; SQLite in home if unset")
    data_roots: Annotated[list[Path] | None, NoDecode] = Field(
        default=None, description="directories specs may name files under (models, calibration and perplexity "
        "data, task directories), `:`-separated or a JSON list; unset: the home and cache directories for the "
        "embedded single user, none (Hugging Face ids only) for a team deployment")
    trusted_task_paths: Annotated[list[Path], NoDecode] = Field(
        default_factory=list, description="lm-eval task directories whose YAML may run Python (`!function`), "
        "`:`-separated or a JSON list; the bundled tasks always may. Server and workers")
    max_data_file_bytes: int = Field(default=2**30, gt=0, description="largest calibration or perplexity file "
                                     "a spec may name")
    server_url: str = Field(default="http://127.0.0.1:8765", description="the API, for CLI commands that call it")
    lease_seconds: float = Field(default=120.0, gt=0, description="a lease not renewed in time is re-leased")
    max_attempts: int = Field(default=3, ge=1, description="leases per trial before it is failed")
    token: str | None = Field(default=None, description="API token for workers and CLI commands that call the API")
    token_file: Path | None = Field(default=None, description="file holding the token (default: HOME/token)")
    artifact_dir: Path | None = Field(default=None, description="materialised models; shared by all servers "
                                      "(default: HOME/artifacts)")
    max_upload_bytes: int = Field(default=2**40, gt=0, description="largest model archive a worker may upload")
    db_pool_size: int = Field(default=40, ge=1, description="database connections per server process")
    max_body_bytes: int = Field(default=2**20, gt=0, description="largest JSON request body")
    offline: bool = Field(default=False, description="no Hugging Face hub calls: models from paths or the local "
                          "hub cache only (`mmmo demo` and the tests always run offline)")
    secure_cookies: bool = Field(default=False, description="the dashboard's cookies are marked Secure (sent over "
                                 "HTTPS only): set it when clients reach the service through TLS")

    # `mmmo serve`
    host: str = Field(default="127.0.0.1", description="address `mmmo serve` binds")
    port: int = Field(default=8765, ge=0, le=65535, description="port `mmmo serve` listens on")

    # `mmmo worker` (and `mmmo study run` for the device)
    device: str = Field(default="cpu", pattern=r"^(auto|cpu|cuda|cuda:\d+|mps)$",
                        description="auto (the first GPU torch sees, else cpu), cpu, cuda or cuda:N")
    batch_size: int | Literal["auto"] = Field(default=64, description="lm-eval batch size, or 'auto'")
    max_memory: int | None = Field(default=None, gt=0, description="keep several model sets resident up to "
                                   "this many bytes (`40GB` is read too); unset: only the last set used")
    memory_plan: Literal["auto", "resident", "host", "files"] = Field(
        default="auto", description="where a set's experts live: on the device (resident), in host memory streamed "
        "to it (host), or read from their files each trial (files); auto: the fastest that fits the budget")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        default=None, description="what models are held and merged into when a spec names no dtype; unset: each "
        "checkpoint's own")
    worker_name: str | None = Field(default=None, max_length=200, description="recorded with each trial "
                                    "(default: host name and pid)")
    prefetch: bool = Field(default=True, description="lease the next trial while the current one runs")
    poll_seconds: float = Field(default=1.0, gt=0, description="how often an idle worker asks for work")

    @field_validator("data_roots", "trusted_task_paths", mode="before")
    @classmethod
    def _path_list(cls, value: object) -> object:
        """``/a:/b`` (os.pathsep) or a JSON list; an empty string is no paths."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [p for p in text.split(os.pathsep) if p.strip()]
        return value

    def resolved_data_roots(self) -> list[Path]:
        """Where files named by specs may lie: the configured roots, else (embedded) the home and
        cache directories, else none."""
        if self.data_roots is not None:
            return list(self.data_roots)
        if self.is_embedded():
            return [Path.home(), self.cache_dir]
        return []

    @field_validator("dtype", mode="before")
    @classmethod
    def _unset_if_empty(cls, value: object) -> object:
        """An empty value (``MMMO_DTYPE=`` in an env file) is unset."""
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("memory_plan", mode="before")
    @classmethod
    def _auto_if_empty(cls, value: object) -> object:
        return "auto" if isinstance(value, str) and not value.strip() else value

    @field_validator("max_memory", mode="before")
    @classmethod
    def _bytes(cls, value: object) -> object:
        return parse_bytes(value) if isinstance(value, str) and value.strip() else value or None

    def is_embedded(self) -> bool:
        """No database configured: the single-user default, which makes its own team and token."""
        return not self.database_url

    def resolved_token_file(self) -> Path:
        return self.token_file or self.home / "token"

    def resolved_token(self) -> str | None:
        """MMMO_TOKEN, else the token file's content, else None."""
        if self.token:
            return self.token
        path = self.resolved_token_file()
        return path.read_text().strip() if path.is_file() else None

    def resolved_artifact_dir(self) -> Path:
        path = self.artifact_dir or self.home / "artifacts"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        self.home.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{self.home / 'mmmo.db'}"

    def resolved_device(self) -> str:
        """``auto``: the first GPU torch sees, else the CPU (imports torch: workers only)."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda:0" if torch.cuda.is_available() else "cpu"
