"""The PEFT LoRA format, read, checked and written in this one place.

Files: `adapter_config.json` + `adapter_model.safetensors` (never pickle). Keys
`base_model.model.<module>.lora_A.weight` (r×in) and `.lora_B.weight` (out×r); scale α/r, or
α/√r with `use_rslora`; `rank_pattern` / `alpha_pattern` keys match a module as PEFT's
`get_pattern_key` matches module names (the whole path, or a suffix after a dot), with plain
string comparisons: a key is a module name, never run as a regular expression (an uploaded
pattern must not be able to stall the process). Validation collects every problem before
raising, as vLLM's `PEFTHelper` does, so one attempt tells the user all that is wrong. What can
be served is bounded: α finite and at most `MAX_ALPHA`, every tensor finite, and every module's
delta `scaling · B·A` provably finite (`delta_bound`), so no adapter can turn another request's
output (or merged base weights) into NaN or Inf. The config cannot lie about the tensors
(`config_problems`): `r` / `rank_pattern` must give every module its tensors' rank, `target_modules`
must name exactly the modules that have weights, every pattern key must name one of them, `use_rslora` must be
a boolean; so what is served is what `peft.PeftModel.from_pretrained` builds from the same files, and every
download loads there.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
_CARRIED_KEYS = ("lora_alpha", "use_rslora", "fan_in_fan_out")  # the rest of a written config comes from the tensors
MAX_CONFIG_BYTES = 1 << 20  # an adapter_config.json is a few hundred bytes; PEFT's largest are a few KB
MAX_PATTERNS = 4096  # entries of rank_pattern / alpha_pattern (one per module at most, in practice)
MAX_ALPHA = 2.0**16  # |lora_alpha| and alpha_pattern values; PEFT's usual values are 8 .. 512
PEFT_DEFAULT_R = 8  # LoraConfig's r when a config names none
MAX_DELTA = 2.0**16  # bound on |scaling · (B·A)_ij|: finite in float16, far beyond any trained adapter's
_PATTERN_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


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


def split_key(key: str) -> tuple[str, str] | None:
    """(module, "A" or "B") of a tensor name `<module>.lora_A.weight` / `.lora_B.weight` (prefix removed), else None."""
    for which in "AB":
        suffix = f".lora_{which}.weight"
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], which
    return None


def pattern_matches(key: str, module: str) -> bool:
    """Whether the pattern key `key` names `module` (a module path): the whole path or a suffix after a dot, as PEFT's
    `get_pattern_key` matches module names, compared as plain strings."""
    return module == key or module.endswith("." + key)


def _pattern_value(patterns: dict, module: str, default):
    for key, value in patterns.items():
        if pattern_matches(key, module):
            return value
    return default


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _alpha_problem(what: str, v: object) -> str | None:
    if not _is_number(v) or not math.isfinite(v) or abs(v) > MAX_ALPHA:
        return f"{what} must be a finite number of magnitude at most {MAX_ALPHA:g} (got {str(v)[:40]})"
    return None


def _check_pattern(config: dict, key: str) -> list[str]:
    patterns = config.get(key) or {}
    if not isinstance(patterns, dict):
        return [f"{key} must be an object mapping module names to values"]
    if len(patterns) > MAX_PATTERNS:
        return [f"{key} has {len(patterns)} entries, more than the {MAX_PATTERNS} allowed"]
    problems = []
    for k, v in patterns.items():
        if not k or len(k) > 256 or not _PATTERN_CHARS.issuperset(k) or k.startswith(".") or k.endswith("."):
            problems.append(f"{key} key {k[:80]!r} is not a module name: keys are module names or dotted suffixes "
                            "of module paths (e.g. 'q_proj', 'layers.0.self_attn.q_proj'), never regular expressions")
        elif key == "alpha_pattern":
            if problem := _alpha_problem(f"{key}[{k!r}]", v):
                problems.append(problem)
        elif not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            problems.append(f"{key}[{k!r}] must be a positive integer")
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
    if "r" in config and (not isinstance(config["r"], int) or isinstance(config["r"], bool) or config["r"] <= 0):
        problems.append("r must be a number (a positive integer)")
    if "lora_alpha" in config and (problem := _alpha_problem("lora_alpha", config["lora_alpha"])):
        problems.append(problem)
    problems += _check_pattern(config, "rank_pattern") + _check_pattern(config, "alpha_pattern")
    return problems


def read_config(path: Path) -> dict:
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise AdapterError([f"{CONFIG_NAME} is larger than {MAX_CONFIG_BYTES} bytes"])
    try:
        config = json.loads(path.read_text())  # NaN / Infinity parse (PEFT writes them): the checks refuse them
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError([f"{CONFIG_NAME} is not valid JSON ({e.__class__.__name__})"]) from None
    except RecursionError:
        raise AdapterError([f"{CONFIG_NAME} nests too deeply"]) from None
    problems = _check_config(config)
    if problems:
        raise AdapterError(problems)
    return config


def _counted(modules: list[str]) -> str:
    return modules[0] if len(modules) == 1 else f"{modules[0]} and {len(modules) - 1} more modules"


def config_problems(config: dict, ranks: dict[str, int]) -> list[str]:
    """Where `adapter_config.json` disagrees with the tensors ({module: rank} of the LoRA pairs found), field by
    field, every disagreement once: what PEFT would build from the config must be what the tensors hold."""
    problems = []
    modules = sorted(ranks)
    rank_pattern = config.get("rank_pattern") or {}
    r = config.get("r", PEFT_DEFAULT_R)
    wrong: dict[tuple[str, int, int], list[str]] = {}
    for module in modules:
        key = next((k for k in rank_pattern if pattern_matches(k, module)), None)
        claimed = rank_pattern[key] if key is not None else r
        if claimed != ranks[module]:
            where = f"rank_pattern[{key!r}]" if key is not None else "r"
            wrong.setdefault((where, claimed, ranks[module]), []).append(module)
    for (where, claimed, actual), names in sorted(wrong.items()):
        problems.append(f"{CONFIG_NAME} says {where}={claimed}, but the tensors of {_counted(names)} have rank {actual}")
    targets, leaves = config.get("target_modules"), sorted({m.rsplit(".", 1)[-1] for m in modules})
    if targets is None or (isinstance(targets, str) and targets != "all-linear"):  # PEFT: a str is a regex
        what = "names no target_modules" if targets is None else f"has target_modules {targets[:80]!r}, a regex"
        problems.append(f"{CONFIG_NAME} {what}: list the module names (the tensors adapt {leaves})")
    elif not isinstance(targets, str) and (not isinstance(targets, list) or not all(isinstance(t, str) for t in targets)):
        problems.append("target_modules must be a list of module names")
    elif isinstance(targets, list):
        if untargeted := [m for m in modules if not any(pattern_matches(t, m) for t in targets)]:
            problems.append(f"target_modules {sorted(targets)} do not name {sorted({m.rsplit('.', 1)[-1] for m in untargeted})}, which the tensors adapt ({_counted(untargeted)})")
        if unused := sorted(t for t in targets if not any(pattern_matches(t, m) for m in modules)):
            problems.append(f"target_modules {unused} have no LoRA tensors in {WEIGHTS_NAME}")
    for field_name in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(field_name) or {}
        if unused := sorted(k for k in patterns if not any(pattern_matches(k, m) for m in modules)):
            problems.append(f"{field_name} keys {unused[:10]} name no module that has LoRA tensors")
    if "use_rslora" in config and not isinstance(config["use_rslora"], bool):
        problems.append(f"use_rslora must be true or false (got {str(config['use_rslora'])[:40]})")
    return problems


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
        m = split_key(stripped)
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
        pairs.setdefault(m[0], {})[m[1]] = tensor
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
        if not delta_bound(lm) <= MAX_DELTA:  # also catches a NaN bound
            problems.append(f"{module}: lora_A, scaling·lora_B or the delta scaling·B·A reach {delta_bound(lm):.3g} in "
                            f"magnitude, over the limit of {MAX_DELTA:g} (lora_alpha / alpha_pattern or the weights "
                            "are out of range)")
            continue
        weights.modules[module] = lm
    if not pairs and not problems:
        problems.append("the adapter holds no LoRA weights")
    if config and pairs:  # a config that did not parse has been reported already
        ranks = {m: ab["A"].shape[0] for m, ab in pairs.items() if "A" in ab}
        problems += config_problems(config, ranks)
    if shapes is not None:
        problems += fit_problems(weights, shapes, max_rank)
    if problems:
        raise AdapterError(problems)
    return weights


def delta_bound(m: LoraModule) -> float:
    """An upper bound on the magnitude of every number serving module `m` computes from its weights: A's entries,
    scaling·B's (what the pool keeps) and the delta's, |s·(B·A)_ij| <= |s| · Σ_k max_i|B_ik| · max_j|A_kj|. In
    float64, so no overflow hides a large one; O(r·(in + out)), where B·A itself would be O(r·in·out)."""
    a = m.lora_A.detach().abs().amax(dim=1).double()  # (r,)
    b = m.lora_B.detach().abs().amax(dim=0).double() * abs(m.scaling)  # (r,)
    return max(float((a * b).sum()), float(a.max()), float(b.max()))


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
    """Write `weights` as a PEFT adapter directory that `peft.PeftModel.from_pretrained` loads: `r`, `rank_pattern`
    and `target_modules` are written from the tensors (so the config cannot disagree with them); the scaling keys
    (`lora_alpha`, `alpha_pattern` for these modules, `use_rslora`) are carried over from the source config."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, lm in weights.modules.items():
        tensors[f"{KEY_PREFIX}{module}.lora_A.weight"] = lm.lora_A.contiguous()
        tensors[f"{KEY_PREFIX}{module}.lora_B.weight"] = lm.lora_B.contiguous()
    ranks = [lm.rank for lm in weights.modules.values()]
    r = max(set(ranks), key=lambda k: (ranks.count(k), k)) if ranks else PEFT_DEFAULT_R  # the most common rank
    source = weights.config
    alpha_pattern = {k: v for k, v in (source.get("alpha_pattern") or {}).items()
                     if any(pattern_matches(k, m) for m in weights.modules)}  # fmt: skip
    carried = {k: source[k] for k in _CARRIED_KEYS if source.get(k) is not None}
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "lora_alpha": weights.alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "inference_mode": True,
        "init_lora_weights": True,
    } | carried | {
        "r": r,
        "rank_pattern": {m: lm.rank for m, lm in sorted(weights.modules.items()) if lm.rank != r},
        "alpha_pattern": alpha_pattern,
        "target_modules": weights.target_modules,
    }
    save_file(tensors, str(directory / WEIGHTS_NAME))
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2))


def describe_peft_adapter(directory: Path) -> tuple[int, float, list[str]]:
    """(rank, alpha, target modules) of a stored adapter, from its config and the safetensors
    header only: registering thousands of stored adapters reads no weights."""
    config = read_config(Path(directory) / CONFIG_NAME)
    ranks, modules = [], set()
    try:
        with safe_open(Path(directory) / WEIGHTS_NAME, framework="pt") as f:
            for key in f.keys():
                m = split_key(key.removeprefix(KEY_PREFIX))
                if m and m[1] == "A":
                    ranks.append(f.get_slice(key).get_shape()[0])
                    modules.add(m[0].rsplit(".", 1)[-1])
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterError([f"{WEIGHTS_NAME} is not a valid safetensors file ({str(e)[:120]})"]) from None
    return max(ranks, default=0), config.get("lora_alpha", 8), sorted(modules)
