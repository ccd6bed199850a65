"""All configuration in one place: `Settings`, read from `LORAPLEX_*` environment variables and the command line.

It inherits the fields of every per-concern config (`server.engine.config`, `server.http.config`,
`server.jobs.config`, `server.ray.config`), so each setting's name, type, default, limits and help text are written once, where the
concern lives; `loraplex serve` makes its options from these fields too. `section(Config)` hands a component its
own concern's config. Nothing below `server/` reads the environment. Importing this module loads no torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel
from pydantic_settings import BaseSettings, SettingsConfigDict

from server.engine.config import EngineConfig, ModelConfig
from server.http.config import HttpConfig
from server.jobs.config import JobsConfig
from server.ray.config import ClusterConfig

C = TypeVar("C", bound=BaseModel)


class Settings(ClusterConfig, JobsConfig, EngineConfig, ModelConfig, HttpConfig, BaseSettings):  # options list in reverse order
    model_config = SettingsConfigDict(env_prefix="LORAPLEX_", extra="ignore", use_attribute_docstrings=True)

    adapter_dir: Path | None = None
    """Every subdirectory holding a PEFT adapter is loaded at start under the subdirectory's name."""
    data_dir: Path = Path(".loraplex")
    """Uploaded adapters, training files and the job database."""
    cache_dir: Path | None = None
    """Where the converted default model is kept (default: <data_dir>/cache)."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Least severe log lines written."""
    log_format: Literal["text", "json"] = "text"
    """Log lines as text, or as one JSON object a line (time, level, logger, message), uvicorn's included."""

    @property
    def model_cache_dir(self) -> Path:
        return self.cache_dir or self.data_dir / "cache"

    def section(self, config: type[C]) -> C:
        """This configuration's fields of `config` (e.g. `settings.section(EngineConfig)`)."""
        return config(**{name: getattr(self, name) for name in config.model_fields})
