"""One dataclass per command, validated before anything expensive (the engine) starts."""

from __future__ import annotations

import importlib.util
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from .estimator import ESTIMATORS, SCHEDULES

DTYPES = ("float32", "bfloat16")
OVERFLOW = ("truncate", "reject")
# loss: the batch loss from log-probs; f1: −F1 of greedy answers (generation tasks, MeZO's
# non-differentiable objective)
OBJECTIVES = ("loss", "f1")
# vllm: the product; reference: transformers + PEFT, same seeds and scoring (the oracle, slow)
ENGINES = ("vllm", "reference")
# The engine starts vLLM with max_lora_rank = --rank, and vLLM 0.32 accepts only these
# (`MaxLoRARanks` in vllm/config/lora.py); anything else fails deep inside engine start-up.
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


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
    lr: float = 2e-3
    lr_schedule: str = "linear"
    eps: float = 1e-2
    batch_size: int = 16
    steps: int = 300
    directions: int = 1
    seed: int = 0
    weight_decay: float = 0.0
    # The update rule (estimator.py): zo-sgd, momentum (EMA of the last momentum_window
    # estimates, rebuilt from their seeds), lozo (low-rank directions, V redrawn every lozo_period steps)
    estimator: str = "zo-sgd"
    momentum: float = 0.9
    momentum_window: int = 16
    lozo_rank: int = 2
    lozo_period: int = 50
    objective: str = "loss"
    dtype: str = "float32"
    eval_every: int = 100
    save_every: int = 100
    max_length: int = 1024
    overflow: str = "truncate"
    eval_examples: int = 0  # 0 = the whole dev split
    fast: bool = True
    engine: str = "vllm"
    # Scale-out (README, "Scaling out"): data-parallel replicas on Ray (a local cluster unless
    # ray_address names one), and vLLM's tensor/pipeline parallelism inside each engine.
    replicas: int = 1
    ray_address: str | None = None
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    # Let the engine run Python code that a model folder ships (HF `auto_map`). Only the user
    # grants it: a resumed run takes it from the command line, never from config.json.
    trust_remote_code: bool = False

    def validate(self) -> None:
        _check_types(self)
        positive = {"lr": self.lr, "eps": self.eps, "batch_size": self.batch_size,
                    "steps": self.steps, "rank": self.rank, "alpha": self.alpha,
                    "directions": self.directions, "max_length": self.max_length}
        for name, value in positive.items():
            if not value > 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {value}")
        for name in ("lr", "eps", "alpha", "weight_decay"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"--{name.replace('_', '-')} must be finite, got {getattr(self, name)}")
        if self.rank not in LORA_RANKS:
            raise ConfigError(f"--rank must be one of {', '.join(map(str, LORA_RANKS))} "
                              f"(the LoRA ranks vLLM supports), got {self.rank}")
        for name in ("eval_every", "save_every", "eval_examples", "weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be ≥ 0, got {getattr(self, name)}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.lr_schedule not in SCHEDULES:
            raise ConfigError(f"--lr-schedule must be one of {', '.join(SCHEDULES)}, got {self.lr_schedule!r}")
        if self.estimator not in ESTIMATORS:
            raise ConfigError(f"--estimator must be one of {', '.join(ESTIMATORS)}, got {self.estimator!r}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"--momentum must be in [0, 1), got {self.momentum}")
        for name in ("momentum_window", "lozo_rank", "lozo_period"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(self, name)}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.objective == "f1" and (self.engine != "vllm" or self.replicas > 1):
            raise ConfigError("--objective f1 generates with one vLLM engine: not with --engine reference or --replicas")
        if self.engine not in ENGINES:
            raise ConfigError(f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.engine == "reference" and not self.fast:
            raise ConfigError("--stock-vllm goes with --engine vllm")
        for name in ("replicas", "tensor_parallel_size", "pipeline_parallel_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(self, name)}")
        if self.engine == "reference" and (self.replicas > 1 or self.ray_address is not None
                                           or self.tensor_parallel_size * self.pipeline_parallel_size > 1):
            raise ConfigError("--replicas, --ray-address and --tensor/--pipeline-parallel-size go with --engine vllm")
        if self.ray_address is not None and not self.ray_address.strip():
            raise ConfigError("--ray-address is empty (leave it out for a local Ray cluster)")
        if (self.replicas > 1 or self.ray_address is not None) and importlib.util.find_spec("ray") is None:
            raise ConfigError("--replicas/--ray-address need Ray: pip install 'mezo-vllm[ray]'")
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
        """A saved config (a run's config.json); ConfigError, naming the field, if it is not one."""
        if not isinstance(data, dict):
            raise ConfigError(f"must be a JSON object, got {type(data).__name__}")
        if not isinstance(data.get("out"), str):
            raise ConfigError("field 'out': missing or not a string")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        targets = values.get("targets", ())
        if not isinstance(targets, (list, tuple)):
            raise ConfigError(f"field 'targets': must be a list of strings, got {targets!r}")
        values["targets"] = tuple(targets)
        cfg = cls(**values)
        _check_types(cfg, prefix="field ")
        return cfg


_NONE = type(None)
# Field annotation (a string: `from __future__ import annotations`) → the accepted Python types.
_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,), "str | None": (str, _NONE), "int": (int,), "float": (int, float), "bool": (bool,),
    "tuple[str, ...]": (tuple,),
}


def _check_types(cfg: Any, prefix: str = "--") -> None:
    """A config built from JSON or by a caller can hold a wrong type; say which, not TypeError."""
    for f in fields(cfg):
        value, accepted = getattr(cfg, f.name), _TYPES.get(str(f.type))
        if accepted is None:
            continue
        wrong = not isinstance(value, accepted) or (bool not in accepted and isinstance(value, bool))
        if f.type == "tuple[str, ...]" and not wrong:
            wrong = not all(isinstance(v, str) for v in value)
        if wrong:
            name = f"--{f.name.replace('_', '-')}" if prefix == "--" else f"{prefix}{f.name!r}"
            raise ConfigError(f"{name} must be {f.type}, got {type(value).__name__} {value!r:.60}")
