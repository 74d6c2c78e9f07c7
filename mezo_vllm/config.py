"""One dataclass per command, validated before anything expensive (the engine) starts."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

DTYPES = ("float32", "bfloat16")
OVERFLOW = ("truncate", "reject")


class ConfigError(Exception):
    """A setting that cannot work; the message names the setting."""


@dataclass(frozen=True)
class TuneConfig:
    """`mezo-vllm tune`. Defaults are the MeZO paper's LoRA settings except where measured
    otherwise on the default model and task (README, "Choosing the defaults")."""

    out: str
    model: str | None = None
    task: str | None = None
    data: str | None = None
    eval_data: str | None = None
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    rank: int = 8
    alpha: float = 16.0
    lr: float = 1e-4
    eps: float = 1e-2
    batch_size: int = 16
    steps: int = 1000
    directions: int = 1
    seed: int = 0
    weight_decay: float = 0.0
    dtype: str = "float32"
    eval_every: int = 100
    save_every: int = 100
    max_length: int = 1024
    overflow: str = "truncate"
    eval_examples: int = 0  # 0 = the whole dev split
    fast: bool = True

    def validate(self) -> None:
        positive = {"lr": self.lr, "eps": self.eps, "batch_size": self.batch_size,
                    "steps": self.steps, "rank": self.rank, "alpha": self.alpha,
                    "directions": self.directions, "max_length": self.max_length}
        for name, value in positive.items():
            if not value > 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {value}")
        for name in ("eval_every", "save_every", "eval_examples", "weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be ≥ 0, got {getattr(self, name)}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.overflow not in OVERFLOW:
            raise ConfigError(f"--overflow must be one of {', '.join(OVERFLOW)}, got {self.overflow!r}")
        if (self.task is None) == (self.data is None):
            raise ConfigError("give exactly one of --task NAME or --data FILE")
        if self.task is not None and self.eval_data is not None:
            raise ConfigError("--eval-data goes with --data (a built-in task has its own dev split)")
        if not self.targets:
            raise ConfigError("--targets is empty")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "TuneConfig":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["targets"] = tuple(values.get("targets", ()))
        return cls(**values)
