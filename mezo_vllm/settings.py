"""Settings declared once: each dataclass field of a command's config carries its help, flag,
aliases, choices, checks and what a resumed run may do with it, as PEFT's `LoraConfig` keeps
help and checks beside the field. The command line (`options.py`), recipe files (`recipe.py`),
the checks and the resume rule all read this metadata, so a new setting or a new choice is
one line in one place.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import MISSING, Field, dataclass, field, fields
from enum import Enum
from typing import Any, Callable, Mapping

# A check takes a value of the right type and returns what is wrong with it ("must be > 0,
# got -1"), or None. The message then reads "<flag> <what is wrong>".
Check = Callable[[Any], "str | None"]


class ConfigError(Exception):
    """A setting that cannot work; the message names the setting."""


class OnResume(Enum):
    """What `tune --resume` does with a setting given again (on the command line or in a recipe)."""

    KEEP = "keep"  # the run's for good: given again, it must equal the saved value
    MAY_CHANGE = "may change"  # given again, it replaces the saved value
    ASK_AGAIN = "ask again"  # never read back from a saved config: only the user grants it


@dataclass(frozen=True)
class Setting:
    """The metadata of one settings field (see `setting`)."""

    help: str
    flag: str | None = None  # the command-line flag; None: --field-name
    aliases: tuple[str, ...] = ()  # further flags, e.g. the names HF Trainer and TRL users type
    choices: tuple[str, ...] = ()  # the allowed values of a str setting
    checks: tuple[Check, ...] = ()
    on_resume: OnResume = OnResume.KEEP
    path: bool = False  # a file or folder (the shell completes it)
    same: Callable[[Any, Any], bool] | None = None  # equality for the resume rule; None: ==


def setting(default: Any = MISSING, help: str = "", **metadata: Any) -> Any:
    """A dataclass field with its `Setting` metadata; no default: the setting is required."""
    return field(default=default, metadata={"setting": Setting(help=help, **metadata)})


def setting_of(f: Field) -> Setting:
    return f.metadata["setting"]


def flag_of(f: Field) -> str:
    return setting_of(f).flag or "--" + f.name.replace("_", "-")


def settings_fields(cls: Any) -> dict[str, Field]:
    """Name → field, for every field of a settings dataclass (each one declared with `setting`)."""
    return {f.name: f for f in fields(cls)}


# --------------------------------------------------------------------------- checks

def above(bound: float) -> Check:
    return lambda v: None if v > bound else f"must be > {bound}, got {v!r}"


def at_least(bound: float) -> Check:
    return lambda v: None if v >= bound else f"must be ≥ {bound}, got {v!r}"


def between(low: int, high: int) -> Check:
    return lambda v: None if low <= v <= high else f"must be in {low}..{high}, got {v!r}"


def in_half_open(low: float, high: float) -> Check:
    return lambda v: None if low <= v < high else f"must be in [{low}, {high}), got {v!r}"


def finite(v: float) -> str | None:
    return None if math.isfinite(v) else f"must be finite, got {v!r}"


def one_of(values: tuple[Any, ...], why: str = "") -> Check:
    listed = ", ".join(map(str, values)) + (f" ({why})" if why else "")
    return lambda v: None if v in values else f"must be one of {listed}, got {v!r}"


def not_empty(v: Any) -> str | None:
    return None if v else "is empty"


def check_settings(cfg: Any) -> None:
    """Every field's type, then its checks (choices included); ConfigError names the flag."""
    for f in fields(cfg):
        complaint = type_error(f, getattr(cfg, f.name))
        if complaint:
            raise ConfigError(f"{flag_of(f)} {complaint}")
    for f in fields(cfg):
        s, value = setting_of(f), getattr(cfg, f.name)
        if value is None:  # an optional setting left out
            continue
        for check in (*((one_of(s.choices),) if s.choices else ()), *s.checks):
            complaint = check(value)
            if complaint:
                raise ConfigError(f"{flag_of(f)} {complaint}")


# --------------------------------------------------------------------------- types

_NONE = type(None)
# Field annotation (a string: `from __future__ import annotations`) → the accepted Python types.
# A setting of another type cannot be declared: `kind` refuses it.
KINDS: dict[str, tuple[type, ...]] = {
    "str": (str,), "str | None": (str, _NONE), "int": (int,), "float": (int, float), "bool": (bool,),
    "tuple[str, ...]": (tuple,),
}


def kind(f: Field) -> str:
    if str(f.type) not in KINDS:
        raise TypeError(f"setting {f.name}: type {f.type} is none of {', '.join(KINDS)}")
    return str(f.type)


def type_error(f: Field, value: Any) -> str | None:
    """A config built from a file or by a caller can hold a wrong type: say which, not TypeError."""
    accepted = KINDS[kind(f)]
    wrong = not isinstance(value, accepted) or (bool not in accepted and isinstance(value, bool))
    if kind(f) == "tuple[str, ...]" and not wrong:
        wrong = not all(isinstance(v, str) for v in value)
    return f"must be {f.type}, got {type(value).__name__} {value!r:.60}" if wrong else None


def typed_values(cls: Any, data: Mapping[str, Any], unknown_keys: bool) -> dict[str, Any]:
    """The settings in a JSON-like mapping (a saved config.json, a recipe), types checked.

    A list stands for a tuple (JSON has no tuples). `unknown_keys`: refuse keys that are no
    setting (a recipe: a typo must not pass silently) or skip them (a config.json written by
    another version). ConfigError names the key.
    """
    known = settings_fields(cls)
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known:
            if unknown_keys:
                raise ConfigError(f"unknown key {key!r}{_did_you_mean(cls, key)}")
            continue
        f = known[key]
        if kind(f) == "tuple[str, ...]":
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"field {key!r}: must be a list of strings, got {value!r}")
            value = tuple(value)
        complaint = type_error(f, value)
        if complaint:
            raise ConfigError(f"field {key!r} {complaint}")
        values[key] = value
    return values


def _did_you_mean(cls: Any, key: str) -> str:
    """The setting an alias names (`lora_r` → `rank`) or the nearest spelling."""
    known = settings_fields(cls)
    if not isinstance(key, str):  # YAML allows any key
        return ""
    for f in known.values():
        if any(alias.lstrip("-").replace("-", "_") == key for alias in setting_of(f).aliases):
            return f" (did you mean {f.name!r}?)"
    close = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
