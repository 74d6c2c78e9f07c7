"""The exceptions that end a command in one line instead of a traceback.

USER_ERRORS mean the user's input (or install) is wrong: one line, exit code 2, before anything
is written. The CLI and the benchmark's child processes both use this list. `EngineStartError`
means vLLM refused to start on valid settings (exit code 1): its own log says more.
"""

from __future__ import annotations

from .adapter import AdapterError
from .config import ConfigError
from .data import DataError
from .model import ModelError
from .patches import PatchVersionError


class EngineStartError(RuntimeError):
    """vLLM raised while starting (loading the model, sizing the KV cache, a worker died)."""


USER_ERRORS = (ConfigError, DataError, AdapterError, ModelError, PatchVersionError)
