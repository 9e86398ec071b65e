"""Settings from the environment (prefix ``DPFT_``).

With nothing set, dpft runs on the embedded default: a SQLite database and a Celery broker on a
SQLite file of its own (kombu's SQLAlchemy transport), both under ``DPFT_DATA_DIR``. Production
sets ``DPFT_DATABASE_URL`` (PostgreSQL) and ``DPFT_BROKER_URL`` (Redis).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DPFT_", extra="ignore", env_ignore_empty=True)

    data_dir: Path = Field(
        Path(".dpft"),
        description="Where the embedded default keeps its SQLite database, broker file and artifacts.",
    )
    database_url: str | None = Field(
        None, description="SQLAlchemy URL of the database; default: SQLite under data_dir."
    )
    broker_url: str | None = Field(
        None, description="Celery broker URL (redis://...); default: a SQLite file under data_dir."
    )
    broker_key_prefix: str = Field(
        "",
        description="Prefix for every Redis key the broker writes, to share one Redis between deployments.",
    )
    artifact_dir: Path | None = Field(
        None, description="Directory for datasets, checkpoints and adapters; default: data_dir/artifacts."
    )
    api_url: str = Field("http://127.0.0.1:8000", description="Base URL of the API, for the client and CLI.")
    api_key: str | None = Field(None, description="API key the client and CLI send.")
    api_keys: str = Field(
        "",
        description="Keys to accept without `dpft keys create`, as comma-separated `tenant:key` pairs; "
        "stored hashed at start-up (useful for compose deployments).",
    )
    allowed_models: str = Field(
        "",
        description="Comma-separated hub ids or local paths allowed as base_model, besides the built-in presets.",
    )
    max_upload_bytes: int = Field(
        512 * 1024 * 1024, description="Largest dataset upload accepted (413 beyond)."
    )
    max_record_chars: int = Field(100_000, description="Longest text field accepted in a dataset record.")
    task_time_limit_s: int = Field(24 * 3600, description="Hard time limit of one training task.")
    metrics_flush_s: float = Field(1.0, description="How often the worker writes buffered metrics.")

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'dpft.db').resolve()}"

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{(self.data_dir / 'broker.db').resolve()}"

    @property
    def resolved_artifact_dir(self) -> Path:
        return (self.artifact_dir or self.data_dir / "artifacts").resolve()

    @property
    def is_embedded(self) -> bool:
        return self.database_url is None and self.broker_url is None

    def ensure_dirs(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.resolved_artifact_dir.mkdir(parents=True, exist_ok=True)


@lru_cache
def get_settings() -> Settings:
    return Settings()
