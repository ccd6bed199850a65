"""Settings: the environment and the CLI reach the engine's config; bad values are refused with the key's name."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from server.settings import Settings


def test_environment_reaches_the_engine_config(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAPLEX_LORA_DTYPE", "bfloat16")
    monkeypatch.setenv("LORAPLEX_PACK_WEIGHTS", "false")
    monkeypatch.setenv("LORAPLEX_MAX_NUM_SEQS", "5")
    config = Settings(data_dir=tmp_path).engine_config()
    assert (config.lora_dtype, config.pack_weights, config.max_num_seqs) == ("bfloat16", False, 5)
    monkeypatch.delenv("LORAPLEX_LORA_DTYPE")
    monkeypatch.delenv("LORAPLEX_PACK_WEIGHTS")
    defaults = Settings(data_dir=tmp_path).engine_config()
    assert (defaults.lora_dtype, defaults.pack_weights) == ("auto", True)


@pytest.mark.parametrize(("key", "value"), [("lora_dtype", "int8"), ("dtype", "float64"), ("lora_backend", "cuda")])
def test_bad_values_are_refused(tmp_path, key, value):
    with pytest.raises(ValidationError, match=key):
        Settings(data_dir=tmp_path, **{key: value})
