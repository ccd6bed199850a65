"""The PEFT LoRA format, read, checked and written in this one place.

Files: `adapter_config.json` + `adapter_model.safetensors` (never pickle). Keys
`base_model.model.<module>.lora_A.weight` (r×in) and `.lora_B.weight` (out×r); scale α/r, or
α/√r with `use_rslora`; `rank_pattern` / `alpha_pattern` matched as PEFT's `get_pattern_key`
does. Validation collects every problem before raising, as vLLM's `PEFTHelper` does, so one
attempt tells the user all that is wrong.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
_CARRIED_KEYS = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "fan_in_fan_out", "target_modules")
_KEY_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")


class AdapterError(ValueError):
    """An adapter that cannot be served; `problems` lists every reason found."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


@dataclass
class LoraModule:
    """One adapted module: A (r, in), B (out, r) and its scale."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]


@dataclass
class LoraWeights:
    """One adapter in host memory, keyed by the HF module path (e.g. `model.layers.0.self_attn.q_proj`)."""

    config: dict
    modules: dict[str, LoraModule] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return max((m.rank for m in self.modules.values()), default=0)

    @property
    def alpha(self) -> float:
        return self.config.get("lora_alpha", 8)

    @property
    def target_modules(self) -> list[str]:
        return sorted({name.rsplit(".", 1)[-1] for name in self.modules})

    @property
    def nbytes(self) -> int:
        return sum(m.lora_A.nbytes + m.lora_B.nbytes for m in self.modules.values())

    def prepared(self, dtype: torch.dtype, pin: bool = False) -> LoraWeights:
        """The same adapter with each module's scaling folded into B (scaling 1.0), cast to `dtype`, in page-ready
        layout (B's transpose contiguous) and, with `pin`, in pinned memory: what a device pool copies as is."""
        modules = {}
        for name, m in self.modules.items():
            a, bt = m.lora_A.to(dtype).contiguous(), (m.lora_B.T * m.scaling).to(dtype).contiguous()
            if pin:
                a, bt = a.pin_memory(), bt.pin_memory()
            modules[name] = LoraModule(lora_A=a, lora_B=bt.T, scaling=1.0)
        return LoraWeights(config=self.config, modules=modules)


def _pattern_value(patterns: dict, module: str, default):
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _check_pattern(config: dict, key: str) -> list[str]:
    patterns = config.get(key) or {}
    if not isinstance(patterns, dict):
        return [f"{key} must be an object mapping module patterns to values"]
    problems = []
    for k, v in patterns.items():
        try:
            re.compile(k)
        except re.error:
            problems.append(f"{key} has an invalid pattern {k!r}")
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
            problems.append(f"{key}[{k!r}] must be a positive number")
    return problems


def module_scaling(config: dict, module: str, rank: int) -> float:
    """α_m / r_m (or α_m / √r_m with rsLoRA), with PEFT's per-module pattern overrides."""
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
    r = rank
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _check_config(config: object) -> list[str]:
    if not isinstance(config, dict):
        return [f"{CONFIG_NAME} must hold a JSON object"]
    problems = []
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type {config.get('peft_type')!r} is not supported (only LORA)")
    if config.get("use_dora"):
        problems.append("DoRA adapters (use_dora=true) are not supported")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save {config['modules_to_save']!r} is not supported (only LoRA weights are served)")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        problems.append("LoRA bias terms (bias != 'none' or lora_bias) are not supported")
    for key in ("r", "lora_alpha"):
        if key in config and (not isinstance(config[key], (int, float)) or isinstance(config[key], bool)):
            problems.append(f"{key} must be a number")
    problems += _check_pattern(config, "rank_pattern") + _check_pattern(config, "alpha_pattern")
    return problems


def read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError([f"{CONFIG_NAME} is not valid JSON ({e.__class__.__name__})"]) from None
    problems = _check_config(config)
    if problems:
        raise AdapterError(problems)
    return config


def load_peft_adapter(
    directory: Path, shapes: dict[str, tuple[int, int]] | None = None, max_rank: int | None = None
) -> LoraWeights:
    """Read a PEFT adapter directory, and check it against the base model's adaptable layers
    {module: (in, out)} when `shapes` is given; raises AdapterError listing every problem."""
    directory = Path(directory)
    problems: list[str] = []
    if (directory / "adapter_model.bin").exists() and not (directory / WEIGHTS_NAME).exists():
        raise AdapterError(["pickle weights (adapter_model.bin) are refused: convert them to adapter_model.safetensors"])
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            problems.append(f"missing {name}")
    if problems:
        raise AdapterError(problems)
    try:
        config = read_config(directory / CONFIG_NAME)
    except AdapterError as e:
        problems.extend(e.problems)
        config = {}
    try:
        tensors = load_file(directory / WEIGHTS_NAME)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        problems.append(f"{WEIGHTS_NAME} is not a valid safetensors file ({str(e)[:120]})")
        raise AdapterError(problems) from None
    weights = LoraWeights(config=config)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        stripped = key.removeprefix(KEY_PREFIX)
        if "lora_embedding_" in key:
            problems.append(f"embedding LoRA ({key}) is not supported")
            continue
        if "lora_magnitude_vector" in key:
            problems.append(f"DoRA weights ({key}) are not supported")
            continue
        m = _KEY_RE.match(stripped)
        if not m or not key.startswith(KEY_PREFIX):
            problems.append(f"unexpected tensor {key!r} (only LoRA A/B weights can be served)")
            continue
        if tensor.ndim != 2:
            problems.append(f"{key} must be 2-D, has shape {list(tensor.shape)}")
            continue
        if not tensor.is_floating_point():
            problems.append(f"{key} has non-float dtype {tensor.dtype}")
            continue
        if not torch.isfinite(tensor).all():
            problems.append(f"{key} contains NaN or Inf values")
            continue
        pairs.setdefault(m["module"], {})[m["which"]] = tensor
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            problems.append(f"{module} has lora_{'A' if 'A' in ab else 'B'} without its lora_{'B' if 'A' in ab else 'A'}")
            continue
        a, b = ab["A"], ab["B"]
        if a.shape[0] != b.shape[1]:
            problems.append(f"{module}: lora_A rank {a.shape[0]} does not match lora_B rank {b.shape[1]}")
            continue
        if a.shape[0] == 0:
            problems.append(f"{module}: rank 0")
            continue
        lm = LoraModule(lora_A=a.float(), lora_B=b.float(), scaling=module_scaling(config, module, a.shape[0]))
        weights.modules[module] = lm
    if not pairs and not problems:
        problems.append("the adapter holds no LoRA weights")
    if shapes is not None:
        problems += fit_problems(weights, shapes, max_rank)
    if problems:
        raise AdapterError(problems)
    return weights


def fit_problems(weights: LoraWeights, shapes: dict[str, tuple[int, int]], max_rank: int | None) -> list[str]:
    """What keeps `weights` from fitting the base model's adaptable layers {module: (in, out)}."""
    problems = []
    for module, lm in weights.modules.items():
        if module not in shapes:
            problems.append(f"target module {module!r} is not an adaptable linear layer of the base model")
            continue
        in_f, out_f = shapes[module]
        if lm.lora_A.shape[1] != in_f or lm.lora_B.shape[0] != out_f:
            problems.append(
                f"{module}: shapes A {list(lm.lora_A.shape)}, B {list(lm.lora_B.shape)} "
                f"do not fit the base layer ({in_f} in, {out_f} out)"
            )
        if max_rank is not None and lm.rank > max_rank:
            problems.append(f"{module}: rank {lm.rank} is over the limit of {max_rank}")
    return problems


def check_fits(weights: LoraWeights, shapes: dict[str, tuple[int, int]], max_rank: int | None) -> None:
    """Raise AdapterError unless `weights` fits the base model's adaptable layers."""
    problems = fit_problems(weights, shapes, max_rank)
    if problems:
        raise AdapterError(problems)


def save_peft_adapter(weights: LoraWeights, directory: Path, base_model: str | None = None) -> None:
    """Write `weights` as a PEFT adapter directory that `peft.PeftModel.from_pretrained` loads."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, lm in weights.modules.items():
        tensors[f"{KEY_PREFIX}{module}.lora_A.weight"] = lm.lora_A.contiguous()
        tensors[f"{KEY_PREFIX}{module}.lora_B.weight"] = lm.lora_B.contiguous()
    # the keys that shape the math are carried over from the source config; the rest are PEFT's defaults
    carried = {k: weights.config[k] for k in _CARRIED_KEYS if weights.config.get(k) is not None}
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": weights.rank,
        "lora_alpha": weights.alpha,
        "lora_dropout": 0.0,
        "target_modules": weights.target_modules,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
        "init_lora_weights": True,
    } | carried
    save_file(tensors, str(directory / WEIGHTS_NAME))
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2))


def describe_peft_adapter(directory: Path) -> tuple[int, float, list[str]]:
    """(rank, alpha, target modules) of a stored adapter, from its config and the safetensors
    header only: registering thousands of stored adapters reads no weights."""
    config = read_config(Path(directory) / CONFIG_NAME)
    ranks, modules = [], set()
    with safe_open(Path(directory) / WEIGHTS_NAME, framework="pt") as f:
        for key in f.keys():
            m = _KEY_RE.match(key.removeprefix(KEY_PREFIX))
            if m and m["which"] == "A":
                ranks.append(f.get_slice(key).get_shape()[0])
                modules.add(m["module"].rsplit(".", 1)[-1])
    return max(ranks, default=0), config.get("lora_alpha", 8), sorted(modules)
