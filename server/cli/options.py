"""Command-line options made from pydantic fields: each option's name, type, choices, help text and default
come from the config that owns the setting, so no help text is written twice.

`options_of(Config)` gives typer parameters (all optional: an option left out is not passed, so the config's
own default, or the environment for `Settings`, applies); `given(values)` keeps the options that were set.
"""

from __future__ import annotations

import inspect
import types
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import typer
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

M = TypeVar("M", bound=BaseModel)


def _plain(annotation: Any) -> Any:
    """The annotation without `None` in a union."""
    if get_origin(annotation) in (Union, types.UnionType):
        rest = [a for a in get_args(annotation) if a is not type(None)]
        return rest[0] if len(rest) == 1 else str
    return annotation


def _literal_values(annotation: Any) -> list[str] | None:
    """The values of a Literal (nested ones too: Literal["auto", Literal[...]]), else None."""
    if get_origin(annotation) is not Literal:
        return None
    values: list[str] = []
    for a in get_args(annotation):
        values += _literal_values(a) or [a]
    return values


def _option(name: str, field: FieldInfo, env_prefix: str | None) -> inspect.Parameter:
    kind = _plain(field.annotation)
    choices = _literal_values(kind)
    if choices is not None:
        kind = Literal[tuple(choices)]  # flat, as typer shows and checks the choices
    elif get_origin(kind) is list:
        kind = str  # a comma-separated list (see `given`)
    elif kind not in (bool, int, float, str, Path):
        kind = str
    default = field.get_default(call_default_factory=False)
    notes = [f"default: {default}" if default is not None else "default: unset"]
    if env_prefix:
        notes.insert(0, f"env {env_prefix}{name.upper()}")
    help_text = f"{(field.description or '').strip()} [{'; '.join(notes)}]"
    option = typer.Option(help=help_text, show_default=False)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[kind | None, option])  # fmt: skip


def options_of(config: type[BaseModel], exclude: set[str] = frozenset(), env_prefix: str | None = None
               ) -> list[inspect.Parameter]:  # fmt: skip
    """A keyword-only typer parameter for each field of `config` but `exclude`."""
    return [_option(name, f, env_prefix) for name, f in config.model_fields.items() if name not in exclude]


def given(values: dict[str, Any], config: type[BaseModel]) -> dict[str, Any]:
    """The options of `values` that were set, as `config`'s fields take them (comma-separated lists split)."""
    out = {}
    for name, value in values.items():
        if value is None or name not in config.model_fields:
            continue
        if get_origin(_plain(config.model_fields[name].annotation)) is list:
            value = [v.strip() for v in value.split(",") if v.strip()]
        out[name] = value
    return out


def with_options(fn, parameters: list[inspect.Parameter]):
    """`fn` (taking **options) as typer sees a function with `parameters` after its own."""
    own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.kind is not p.VAR_KEYWORD]
    fn.__signature__ = inspect.Signature(own + parameters)
    return fn


def build(config: type[M], **values: Any) -> M:
    """`config(**values)`; a bad value is one line naming its field (no traceback), then exit 2."""
    try:
        return config(**values)
    except ValidationError as e:
        for err in e.errors():
            where = ".".join(map(str, err["loc"])) or config.__name__
            typer.secho(f"error: {where}: {err['msg'].removeprefix('Value error, ')}", fg="red", err=True)
        raise typer.Exit(2) from None
