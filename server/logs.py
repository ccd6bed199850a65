"""One logging configuration for the whole process: loraplex's loggers, uvicorn's (errors and access lines),
transformers' and the training workers' all write through one handler, as text (the default) or as one JSON object
a line (`log_format=json`, `python-json-logger`), and no library draws progress bars into it."""

from __future__ import annotations

import logging.config
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(message)s"


def logging_config(level: str = "info", fmt: str = "text") -> dict[str, Any]:
    """The `logging.config.dictConfig` dictionary (uvicorn takes the same as its `log_config`)."""
    formatter: dict[str, Any] = {"format": TEXT_FORMAT}
    if fmt == "json":
        formatter = {"()": "pythonjsonlogger.json.JsonFormatter", "format": JSON_FIELDS,
                     "rename_fields": {"asctime": "time", "levelname": "level", "name": "logger"}}  # fmt: skip
    level = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "handlers": {"default": {"class": "logging.StreamHandler", "formatter": "default", "stream": "ext://sys.stderr"}},
        "root": {"handlers": ["default"], "level": level},
        "loggers": {name: {"handlers": [], "level": level, "propagate": True}
                    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "transformers", "huggingface_hub")},
    }  # fmt: skip


def configure_logging(level: str = "info", fmt: str = "text") -> dict[str, Any]:
    """Apply `logging_config` to this process (and quiet the libraries' own handlers and progress bars); returns it
    for uvicorn."""
    config = logging_config(level, fmt)
    logging.config.dictConfig(config)
    try:
        import transformers

        transformers.utils.logging.disable_default_handler()
        transformers.utils.logging.enable_propagation()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:
        pass
    return config
