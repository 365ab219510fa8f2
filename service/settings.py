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
    token: str | None = Field(default=None, description="API token for workers and CLI commands that call the API")
    token_file: Path | None = Field(default=None, description="file holding the token (default: HOME/token)")
    artifact_dir: Path | None = Field(default=None, description="materialised models; shared by all servers "
                                      "(default: HOME/artifacts)")
    max_upload_bytes: int = Field(default=2**40, gt=0, description="largest model archive a worker may upload")
    db_pool_size: int = Field(default=40, ge=1, description="database connections per server process")
    max_body_bytes: int = Field(default=2**20, gt=0, description="largest JSON request body")

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
