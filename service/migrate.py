"""Apply the Alembic migrations that ship in the package (`dpft migrate`)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

import migrations
from service.settings import get_settings


def alembic_config(database_url: str | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    url = database_url or get_settings().resolved_database_url
    # Alembic's config is an INI parser: a literal % in a URL (an escaped password) must be doubled.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(database_url: str | None = None, revision: str = "head") -> None:
    if database_url is None:
        get_settings().ensure_dirs()  # the embedded default's SQLite file lives in the data directory
    command.upgrade(alembic_config(database_url), revision)
