"""Settings files: a recipe (`tune --config recipe.yaml`, YAML or JSON) and a run's saved
`config.json`. Both hold the keys of `TuneConfig`; a recipe's unknown key or wrong type is an
error naming the file and the key, never a silently ignored setting.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from .config import TuneConfig
from .settings import ConfigError, typed_values


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-3` as a string (a float needs a dot there); YAML 1.2, JSON and every
    user writing `lr: 1e-3` mean a float."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)[eE][-+]?\d+$"),
                              list("-+0123456789."))


def read_recipe(path: str, cls: Any = TuneConfig) -> dict[str, Any]:
    """The settings a recipe file gives, types checked (the rest keep their defaults)."""
    suffix = Path(path).suffix.lower()
    if suffix not in (".yaml", ".yml", ".json"):
        raise ConfigError(f"{path}: a recipe is .yaml, .yml or .json, not {suffix or 'without an extension'}")
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read ({type(e).__name__}: {e})".splitlines()[0]) from None
    try:
        data = json.loads(text) if suffix == ".json" else yaml.load(text, Loader=_Loader)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML ({getattr(e, 'problem', None) or type(e).__name__}{where})") from None
    if data is None:  # an empty file
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must be a mapping of settings (key: value), got {type(data).__name__}")
    try:
        return typed_values(cls, data, unknown_keys=True)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def read_saved_config(run_dir: str) -> TuneConfig:
    """The config.json of a run folder."""
    saved = Path(run_dir) / "config.json"
    if not saved.is_file():
        raise ConfigError(f"{run_dir}: not a run folder (no config.json)")
    try:
        return TuneConfig.from_json(json.loads(saved.read_text()))
    except (OSError, UnicodeDecodeError, RecursionError) as e:
        raise ConfigError(f"{saved}: cannot read ({type(e).__name__})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{saved}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except ConfigError as e:
        raise ConfigError(f"{saved}: {e}") from None
