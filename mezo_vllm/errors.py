"""The exceptions that mean the user's input is wrong: each command shows one line and exits
with code 2 (no traceback). The CLI and the benchmark's child processes both use this list."""

from __future__ import annotations

from .adapter import AdapterError
from .config import ConfigError
from .data import DataError
from .model import ModelError

USER_ERRORS = (ConfigError, DataError, AdapterError, ModelError)
