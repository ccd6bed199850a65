"""Settings: the environment and the CLI reach the engine's config; bad values are refused with the key's name."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from server.engine.config import EngineConfig
from server.settings import Settings


def test_environment_reaches_the_engine_config(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAPLEX_LORA_DTYPE", "bfloat16")
    monkeypatch.setenv("LORAPLEX_PACK_WEIGHTS", "false")
    monkeypatch.setenv("LORAPLEX_KEEP_FREED_MEMORY", "0")
    monkeypatch.setenv("LORAPLEX_MAX_NUM_SEQS", "5")
    monkeypatch.setenv("LORAPLEX_PREFILL_CHUNK", "0")
    config = Settings(data_dir=tmp_path).section(EngineConfig)
    assert (config.lora_dtype, config.pack_weights, config.keep_freed_memory, config.max_num_seqs) == (
        "bfloat16", False, False, 5)  # fmt: skip
    assert config.prefill_chunk == 0
    for key in ("LORAPLEX_LORA_DTYPE", "LORAPLEX_PACK_WEIGHTS", "LORAPLEX_KEEP_FREED_MEMORY", "LORAPLEX_PREFILL_CHUNK"):
        monkeypatch.delenv(key)
    defaults = Settings(data_dir=tmp_path).section(EngineConfig)
    assert (defaults.lora_dtype, defaults.pack_weights, defaults.keep_freed_memory) == ("auto", True, True)
    assert defaults.prefill_chunk == 512


@pytest.mark.parametrize(("key", "value"), [("lora_dtype", "int8"), ("dtype", "float64"), ("lora_backend", "cuda"), ("prefill_chunk", 2), ("prefill_chunk", -1)])
def test_bad_values_are_refused(tmp_path, key, value):
    with pytest.raises(ValidationError, match=key):
        Settings(data_dir=tmp_path, **{key: value})


def test_device_and_dtype_choices():
    import torch

    from server.engine.model import pick_dtype

    assert Settings().device == "auto" and Settings().dtype == "auto"
    assert pick_dtype("auto", torch.device("cpu")) == "float32"
    assert pick_dtype("auto", torch.device("cuda")) == "bfloat16"
    assert pick_dtype("float16", torch.device("cpu")) == "float16"
    for key, value in (("device", "tpu"), ("memory_fraction", 1.5), ("memory_fraction", 0), ("training_device", "gpu")):
        with pytest.raises(ValidationError, match=key):
            Settings(**{key: value})
