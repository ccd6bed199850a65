"""OpenAI-compatible request schemas (completions, chat) with vLLM's extensions and ours.

Unknown fields are ignored, as vLLM does; fields we cannot honour are refused, never ignored. What a client sends
is bounded here, before anything else looks at it: every float finite, every string valid Unicode (a lone UTF-16
surrogate can be neither tokenized nor sent back), `seed` a 64-bit integer, the counts of messages and stop sequences capped (the prompts' count and lengths are
checked against the queue and the context before tokenization, in `server.http.prompts`).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from adapters.names import NAME_PATTERN
from adapters.training.config import Hyperparameters

MAX_MESSAGES = 4096
MAX_STOP = 16  # stop sequences
MAX_STOP_CHARS = 1024  # characters of one stop sequence
MAX_STOP_TOKEN_IDS = 256


def _valid_unicode(s: str) -> str:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the text holds a lone UTF-16 surrogate (not valid Unicode)") from None
    return s


Text = Annotated[str, AfterValidator(_valid_unicode)]
TokenId = Annotated[int, Field(ge=0, lt=2**31)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class StreamOptions(_Request):
    include_usage: bool = False


class AdapterWeight(_Request):
    """Extension: one adapter of a weighted composition."""

    name: str = Field(pattern=NAME_PATTERN)
    weight: float = Field(1.0, ge=-100, le=100)


class _Sampling(_Request):
    model: Text
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: (
        Annotated[Text, Field(max_length=MAX_STOP_CHARS)]
        | list[Annotated[Text, Field(max_length=MAX_STOP_CHARS)]]
        | None
    ) = Field(None, validate_default=True)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: Text | None = None
    # vLLM extensions
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: list[TokenId] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    # loraplex extension
    adapters: list[AdapterWeight] | None = Field(None, max_length=16)

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> list[str]:
        if v is None:
            return []
        stops = [v] if isinstance(v, str) else v
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        return stops

    def unsupported(self) -> str | None:
        """The first requested feature this server does not implement, if any."""
        if self.presence_penalty or self.frequency_penalty:
            return "presence_penalty and frequency_penalty are not supported"
        return None


class CompletionRequest(_Sampling):
    prompt: Text | list[Text] | list[TokenId] | list[list[TokenId]]  # counts and lengths: server.http.prompts
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: Text | None = None
    best_of: int | None = None

    def unsupported(self) -> str | None:
        if self.suffix:
            return "suffix is not supported"
        if self.best_of not in (None, 1, self.n):
            return "best_of is not supported"
        return super().unsupported()


class TextPart(_Request):
    type: Literal["text"]
    text: Text


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict] | None = None
    response_format: dict | None = None
    add_generation_prompt: bool = True

    def unsupported(self) -> str | None:
        if self.tools:
            return "tools are not supported"
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            return "response_format other than text is not supported"
        return super().unsupported()


# --- training jobs (API.md, Training jobs) -------------------------------------------------

PositiveInt = Annotated[int, Field(ge=1)]


class JobHyperparameters(Hyperparameters):
    """The trainer's hyperparameters (one set of fields and defaults: adapters.training.config), with OpenAI's
    "auto" for the three it names and its `learning_rate_multiplier` (of the default learning rate); unknown keys are
    refused (a typo must not train with a default)."""

    n_epochs: PositiveInt | Literal["auto"] | None = Hyperparameters.model_fields["n_epochs"].default
    batch_size: PositiveInt | Literal["auto"] = Hyperparameters.model_fields["batch_size"].default
    learning_rate: Annotated[float, Field(gt=0, le=10)] | Literal["auto"] = Hyperparameters.model_fields[
        "learning_rate"
    ].default
    learning_rate_multiplier: Annotated[float, Field(gt=0, le=100)] | Literal["auto"] | None = None
    """OpenAI's alternative to learning_rate: a multiple of the default learning rate."""

    def resolved(self) -> Hyperparameters:
        """The trainer's hyperparameters, "auto" taking the default (ValueError for two learning rates)."""
        values = {k: v for k, v in self.model_dump(exclude_unset=True).items() if v != "auto"}
        multiplier = values.pop("learning_rate_multiplier", None)
        if multiplier is not None:
            if "learning_rate" in values:
                raise ValueError("give learning_rate or learning_rate_multiplier, not both")
            values["learning_rate"] = Hyperparameters.model_fields["learning_rate"].default * multiplier
        return Hyperparameters(**values)


class Supervised(BaseModel):
    """OpenAI's `method.supervised` (= LoRA here): its hyperparameters."""

    model_config = ConfigDict(extra="forbid")

    hyperparameters: JobHyperparameters | None = None


class Method(BaseModel):
    """`{"type": "supervised" | "lora" | "switchlora", "hyperparameters"?: {...}, "supervised"?: {...}}`: OpenAI's
    shape (supervised = LoRA, its hyperparameters under `supervised`) or ours (under `hyperparameters`)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["supervised", "lora", "switchlora"] = "lora"
    hyperparameters: JobHyperparameters | None = None
    supervised: Supervised | None = None


class JobCreateRequest(_Request):
    training_file: Text
    adapter_name: Text | None = None  # extension; OpenAI's `suffix` names the adapter too (one of the two)
    suffix: Text | None = Field(None, max_length=64)
    validation_file: Text | None = None
    model: Text | None = None  # OpenAI requires it; here it may name the base model (or be left out)
    method: Method = Field(default_factory=Method)
    hyperparameters: JobHyperparameters | None = None  # OpenAI's deprecated place for them
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    max_seconds: float | None = Field(None, gt=0)  # extension: wall-clock budget (default: the server's limit)
    overwrite: bool = False  # extension: replace an adapter of that name when the job succeeds

    def resolved_hyperparameters(self) -> Hyperparameters:
        """The trainer's hyperparameters from wherever the request put them (`method.hyperparameters`,
        `method.supervised.hyperparameters`, or the legacy top level: learning_rate_multiplier scales the default
        learning rate); ValueError if it put them in two places."""
        given = [h for h in (self.method.hyperparameters, self.method.supervised and self.method.supervised.hyperparameters) if h]
        if self.method.supervised and self.method.type != "supervised":
            raise ValueError("method.supervised is for method.type 'supervised'")
        if len(given) + (self.hyperparameters is not None) > 1:
            raise ValueError("give the hyperparameters once: method.hyperparameters, method.supervised.hyperparameters "
                             "or hyperparameters")
        if self.hyperparameters is not None:
            given.append(self.hyperparameters)
        return (given[0] if given else JobHyperparameters()).resolved()
