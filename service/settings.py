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
    dataset_file_root: Path | None = Field(
        None, description="Directory that file:// dataset URIs may point into; unset: file:// is refused."
    )
    s3_endpoint_url: str | None = Field(
        None, description="Endpoint of an S3-compatible store for s3:// dataset URIs (default: AWS)."
    )
    max_upload_bytes: int = Field(512 * 1024 * 1024, description="Largest dataset upload accepted (413 beyond).")
    max_record_chars: int = Field(100_000, description="Longest text field accepted in a dataset record.")
    webhook_secret: str | None = Field(
        None, description="Secret for the HMAC signature of webhooks; jobs may name a webhook_url only when set."
    )
    metrics_token: str | None = Field(
        None,
        description="Bearer token that GET /metrics requires; unset: /metrics is open (serve it on an internal "
        "network only).",
    )
    webhook_max_attempts: int = Field(8, ge=1, description="Webhook delivery attempts before giving up.")
    webhook_backoff_s: float = Field(2.0, gt=0, description="Wait before the first retry; doubles each time.")
    task_time_limit_s: int = Field(24 * 3600, description="Hard time limit of one training task.")
    metrics_flush_s: float = Field(1.0, description="How often the worker writes buffered metrics.")
    heartbeat_lease_s: float = Field(
        120.0,
        description="A running job whose heartbeat is older than this goes back to the queue (and resumes).",
    )
    max_attempts: int = Field(3, description="Claims a job may have; a job that loses its worker after that fails.")
    sweep_interval_s: float = Field(
        10.0, description="How often each worker's sweeper looks for stale heartbeats and lost messages."
    )
    resend_after_s: float = Field(
        30.0, description="A queued job with no broker message for this long is sent again (Redis lost it)."
    )
    checkpoint_every: int = Field(50, description="Noisy steps between training checkpoints (for resume).")
    metrics_max_outage_s: float = Field(
        300.0,
        description="How long training continues while metrics cannot be written; past it the job stops.",
    )
    require_gpu: bool = Field(False, description="Refuse to start a worker that sees no CUDA device.")

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
