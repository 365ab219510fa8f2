"""Settings: the one place that reads the environment (``MMMO_*`` variables)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_home() -> Path:
    return Path.home() / ".mmmo"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MMMO_", extra="ignore")

    home: Path = Field(default_factory=_default_home, description="state: database, tokens")
    cache_dir: Path = Field(default_factory=lambda: Path.home() / ".cache" / "mmmo",
                            description="demo zoo and other rebuildable files")
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; SQLite in home if unset")
    server_url: str = Field(default="http://127.0.0.1:8765", description="the API, for CLI commands that call it")
    lease_seconds: float = Field(default=120.0, gt=0, description="a lease not renewed in time is re-leased")
    max_attempts: int = Field(default=3, ge=1, description="leases per trial before it is failed")

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        self.home.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{self.home / 'mmmo.db'}"
