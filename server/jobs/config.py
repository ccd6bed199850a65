"""Limits and resources of training jobs; importable without torch (server.settings reads it)."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class JobsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    max_training_file_bytes: int = Field(64 * 2**20, ge=1024)
    """Largest training or validation file upload."""
    max_training_examples: int = Field(100_000, ge=1)
    """Most examples in one training file."""
    max_train_steps: int = Field(20_000, ge=1)
    """Most optimizer steps one job may take."""
    max_job_seconds: float = Field(6 * 3600, gt=0)
    """Longest wall-clock time one job may train (a job may ask for less with max_seconds)."""
    max_concurrent_jobs: int = Field(1, ge=1)
    """Jobs training at the same time; more wait in the queue."""
    training_threads: int = Field(max(1, (os.cpu_count() or 2) // 2), ge=1)
    """Torch threads of each training worker process (serving keeps the rest)."""
    training_nice: int = Field(10, ge=0, le=19)
    """Niceness of training worker processes: serving keeps priority on shared cores."""
    jobs_db_synchronous: Literal["full", "normal"] = "full"
    """SQLite durability of the job database (WAL): full survives kill -9 and power loss; normal survives kill -9
    and may lose the last commits to a power loss."""
    training_device: Literal["cpu", "cuda"] = "cpu"
    """Where training workers put their own copy of the model: the CPU unless set to cuda (a job on the serving GPU
    takes memory the engine's budget does not know of)."""
