"""Click options generated from a settings dataclass (as HF's `HfArgumentParser` and TRL build
argparse from their argument dataclasses): flag, aliases, type, choices, default and help all
come from the field (`settings.Setting`), so the command line cannot drift from the config.
"""

from __future__ import annotations

from dataclasses import MISSING, Field, fields
from typing import Any, Callable, Iterable, TypeVar

import click

from .settings import flag_of, kind, setting_of

F = TypeVar("F", bound=Callable[..., Any])

_CLICK_TYPES: dict[str, Any] = {"int": int, "float": float, "str": str, "str | None": str}


def settings_options(cls: Any, only: Iterable[str] | None = None) -> Callable[[F], F]:
    """A decorator adding one option per field of `cls` (or of the fields named in `only`), in
    field order. The command receives each value as the config holds it (a tuple of targets,
    `fast=False` for --stock-vllm)."""
    chosen = [f for f in fields(cls) if only is None or f.name in set(only)]

    def decorate(fn: F) -> F:
        for f in reversed(chosen):
            fn = click.option(*option_names(f), f.name, **_option_settings(f))(fn)
        return fn

    return decorate


def option_names(f: Field) -> list[str]:
    return [flag_of(f), *setting_of(f).aliases]


def _option_settings(f: Field) -> dict[str, Any]:
    s = setting_of(f)
    default = None if f.default is MISSING else f.default
    if kind(f) == "bool":
        # A flag turns its setting away from the default (--stock-vllm sets fast=False).
        return {"is_flag": True, "help": s.help, "callback": _negate if default else None}
    if kind(f) == "tuple[str, ...]":
        return {"default": ",".join(default), "show_default": True, "help": s.help, "callback": _comma_list}
    type_ = click.Choice(s.choices) if s.choices else click.Path() if s.path else _CLICK_TYPES[kind(f)]
    return {"type": type_, "default": default, "show_default": default is not None, "help": s.help}


def _negate(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    return not value


def _comma_list(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in value.split(",") if t.strip())


def given_settings(cls: Any, values: dict[str, Any]) -> dict[str, Any]:
    """The settings of `cls` among a command's `values` that the user typed (not defaults):
    what overrides a recipe and what a resumed run compares with its saved config."""
    ctx = click.get_current_context()
    return {f.name: values[f.name] for f in fields(cls)
            if f.name in values and ctx.get_parameter_source(f.name) is click.core.ParameterSource.COMMANDLINE}
