"""One dataclass per command, validated before anything expensive (the engine) starts.

Each field is declared once with its help, flag, aliases, choices, checks and resume rule
(`settings.setting`); the click options, recipe files and checks are derived from that. A new
choice (say a dtype) is one entry in its tuple here.
"""

from __future__ import annotations

import importlib.util
import operator
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping

from .estimator import ESTIMATORS, SCHEDULES
# ConfigError is defined with the settings machinery; the package imports it from here.
from .settings import (ConfigError, OnResume, above, at_least, check_settings, finite, flag_of, in_half_open,
                       kind, not_empty, setting, setting_of, typed_values)

# The engine's dtypes (`bench` measures each). The master adapter is always fp32. A choice that
# resolves to one of these (say "auto") goes into the `dtype` setting's choices below, not here.
DTYPES = ("float32", "bfloat16", "float16")
OVERFLOW = ("truncate", "reject")
# loss: the batch loss from log-probs; f1: −F1 of greedy answers (generation tasks, MeZO's
# non-differentiable objective)
OBJECTIVES = ("loss", "f1")
# vllm: the product; reference: transformers + PEFT, same seeds and scoring (the oracle, slow)
ENGINES = ("vllm", "reference")
# vLLM 0.32 sizes its LoRA slots by max_lora_rank, which must be one of these (`MaxLoRARanks`
# in vllm/config/lora.py). Any adapter rank up to the largest works: the engine starts vLLM with
# the next one up (`vllm_lora_rank`) and the adapter fills the first r rows of each slot.
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# --report-to: none, or TensorBoard event files in RUN/tensorboard/ (the extra mezo-vllm[tensorboard])
REPORT_TO = ("none", "tensorboard")
_TRUST = "let the model folder run its own Python code (HF auto_map); off by default"


def _same_model(a: str | None, b: str | None) -> bool:
    """One base model: None is the embedded default, and a folder may be spelled two ways."""
    from .model import DEFAULT_MODEL

    a, b = a or DEFAULT_MODEL, b or DEFAULT_MODEL
    return a == b or Path(a).resolve() == Path(b).resolve()


def vllm_lora_rank(r: int) -> int:
    """The max_lora_rank vLLM is started with for an adapter of rank r (the adapter keeps r)."""
    return next(rank for rank in LORA_RANKS if rank >= r)


def _vllm_rank(r: int) -> str | None:
    return None if r <= LORA_RANKS[-1] else f"must be ≤ {LORA_RANKS[-1]} (the largest LoRA rank vLLM supports), got {r}"


def _not_blank(v: str) -> str | None:
    return None if v.strip() else "is empty (leave it out for a local Ray cluster)"


@dataclass(frozen=True, kw_only=True)
class ModelSettings:
    """The base model and the LoRA adapter on it: the settings `tune` and `validate` share."""

    model: str | None = setting(None, "HF model folder (safetensors), hub id (org/name, downloaded where the hub "
                                "is reachable) or embedded model (`mezo-vllm model list`); default: the embedded "
                                "SmolLM2-135M-Instruct",
                                same=_same_model)
    targets: tuple[str, ...] = setting(("q_proj", "v_proj"), "LoRA target modules, comma-separated, or all-linear",
                                       aliases=("--lora_target_modules",), checks=(not_empty,))
    rank: int = setting(8, "LoRA rank r", aliases=("--lora_r",),
                        checks=(above(0), _vllm_rank))
    alpha: float = setting(16.0, "LoRA α (the adapter's output is scaled by α/r)", aliases=("--lora_alpha",),
                           checks=(above(0), finite))
    max_length: int = setting(1024, "most tokens of an example (prompt and target)", checks=(above(0),))
    # Let the engine run Python code that a model folder ships (HF `auto_map`). Only the user
    # grants it: a resumed run takes it from the command line, never from config.json.
    trust_remote_code: bool = setting(False, _TRUST, on_resume=OnResume.ASK_AGAIN)


# Settings added with a default that changes what a run does: a config.json (or a study's result
# file) written before one existed lacks it and ran as this value, which a resumed run keeps.
UNTIL_ADDED: dict[str, Any] = {"normalise": 0}


@dataclass(frozen=True, kw_only=True)
class TuneConfig(ModelSettings):
    """`mezo-vllm tune`. Defaults are the MeZO paper's LoRA settings except where the study
    measured better ones on the default model and task (4 directions a step, g normalised by its
    recent RMS, lr, eval and save intervals: docs/results.md, "The study"; `tune --task sst2` is
    its chosen setting)."""

    out: str = setting(help="run folder", path=True, aliases=("--output_dir",))
    task: str | None = setting(None, "built-in task (see `mezo-vllm tasks`)")
    data: str | None = setting(None, "training data, JSONL or CSV: prompt/completion, prompt/options/label, text, "
                               "or (JSONL) chat messages", path=True)
    init_adapter: str | None = setting(None, "start from this PEFT LoRA adapter folder (of --rank and --targets) "
                                       "instead of PEFT's initialisation", path=True)
    eval_data: str | None = setting(None, "dev data for --data", path=True)
    eval_split: float = setting(0.0, "hold out this fraction of --data (drawn with --seed) as dev data",
                                checks=(in_half_open(0, 1),))
    lr: float = setting(8e-3, "learning rate (its peak under --lr-schedule)", aliases=("--learning_rate",),
                        checks=(above(0), finite))
    lr_schedule: str = setting("linear", "linear or cosine: decay to 0 at the last step; constant: hold --lr",
                               choices=SCHEDULES)
    warmup_steps: int = setting(0, "steps that ramp the lr up to --lr before the schedule", checks=(at_least(0),))
    eps: float = setting(1e-2, "ε: the variants are θ ± εz", checks=(above(0), finite))
    batch_size: int = setting(16, "examples per step", aliases=("--per_device_train_batch_size",),
                              checks=(above(0),))
    steps: int = setting(300, "MeZO steps; a resumed run may raise it", aliases=("--max_steps",),
                         checks=(above(0),), on_resume=OnResume.MAY_CHANGE)
    directions: int = setting(4, "n-SPSA: average this many ±εz estimates per step (2n LoRA slots, 2n + 1 "
                                 "with --estimator curvature; one engine call)",
                              checks=(above(0),))
    seed: int = setting(0, "seed of the adapter's initialisation, the batches and the directions z")
    weight_decay: float = setting(0.0, "decoupled weight decay of the adapter", checks=(at_least(0), finite))
    # The update rule (estimator.py): zo-sgd, momentum (EMA of the last momentum_window
    # estimates, rebuilt from their seeds), lozo (low-rank directions, V redrawn every lozo_period
    # steps), fzoo (--directions one-sided estimates around one unperturbed pass, std-normalised),
    # curvature (the ± pairs and one unperturbed pass; g divided by the measured curvature)
    estimator: str = setting("zo-sgd", "update rule: ZO-SGD, ZO-SGD with momentum, LOZO (low-rank directions), "
                             "FZOO (n one-sided estimates + one clean pass, normalised: its lr is a step length), "
                             "curvature (the n ± pairs + one clean pass, each g divided by the curvature along the "
                             "directions, averaged over --normalise steps: its lr is a fraction of a Newton step)",
                             choices=ESTIMATORS)
    momentum: float = setting(0.9, "--estimator momentum: β of the moving average", checks=(in_half_open(0, 1),))
    momentum_window: int = setting(16, "--estimator momentum: steps kept (their z is regenerated every step)",
                                   checks=(at_least(1),))
    lozo_rank: int = setting(2, "--estimator lozo: rank of each matrix's direction U·Vᵀ", checks=(at_least(1),))
    lozo_period: int = setting(50, "--estimator lozo: steps between redraws of V", checks=(at_least(1),))
    normalise: int = setting(25, "divide each g by the RMS of the g's of the last N steps (0 = off): the lr "
                             "then sets the step's length whatever the loss's scale (fzoo normalises its own way and "
                             "ignores it; curvature averages its curvature over N steps instead)", checks=(at_least(0),))
    # Which part of the adapter a direction perturbs (adapter.Masked), for every update rule
    sparsity: float = setting(0.0, "Sparse-MeZO: share of each tensor's entries a direction leaves out, "
                              "chosen from its seed (0 = dense)", checks=(in_half_open(0, 1),))
    train_only: str | None = setting(None, "B: perturb and train only the B matrices; A stays at its "
                                     "seeded initialisation", choices=("B",))
    objective: str = setting("loss", "loss: log-prob loss; f1: −F1 of greedy answers (generation tasks)",
                             choices=OBJECTIVES)
    dtype: str = setting("auto", "the engine's dtype (auto: bfloat16 on GPU, whose LoRA kernels take 16-bit "
                         "only, and on CPUs with AMX or AVX512-BF16; float32 on other CPUs, which "
                         "emulate bf16); the master adapter is always fp32", choices=(*DTYPES, "auto"))
    eval_every: int = setting(25, "steps between dev evaluations (0 = only before and after); RUN/best is the "
                              "best of these", checks=(at_least(0),))
    save_every: int = setting(50, "steps between checkpoints (0 = only at the end)", checks=(at_least(0),))
    save_total_limit: int = setting(0, "also keep the last N checkpoints as RUN/checkpoint-STEP/ (0: only "
                                    "RUN/checkpoint/, the latest)", aliases=("--save_total_limit",),
                                    checks=(at_least(0),), on_resume=OnResume.MAY_CHANGE)
    report_to: str = setting("none", "also log train loss, lr, |g| and dev metrics to TensorBoard "
                             "(RUN/tensorboard/)", choices=REPORT_TO, aliases=("--report_to",),
                             on_resume=OnResume.MAY_CHANGE)
    overflow: str = setting("truncate", "examples longer than --max-length: cut the context from the left, "
                            "or drop them", choices=OVERFLOW)
    eval_examples: int = setting(0, "dev examples per evaluation (0 = all)", checks=(at_least(0),))
    fast: bool = setting(True, "run without the speed-up patches (for comparison)", flag="--stock-vllm")
    # vLLM's CPU compilation kept on with LoRA (patches.compiled_lora): steps 1.08-1.31x as fast on an
    # AVX512-BF16 EPYC, 1.31-1.57x in bf16 on AMX, losses within 8.8e-7 in fp32 (docs/benchmarks.md);
    # off by default because every start costs ~40 s more (~70 s the first time), which the
    # default 300-step run only wins back.
    compile: bool = setting(False, "compile the engine's forward pass (torch.compile, LoRA ops as custom ops): "
                            "faster steps; the first start of a model/rank compiles ~70 s, later ones read "
                            "vLLM's cache", on_resume=OnResume.MAY_CHANGE)
    engine: str = setting("vllm", "reference: transformers + PEFT with the same seeds and scoring "
                          "(the oracle; slow)", choices=ENGINES)
    # Scale-out (README, "Scaling out"): data-parallel replicas on Ray (a local cluster unless
    # ray_address names one), and vLLM's tensor/pipeline parallelism inside each engine. Where
    # a run computes changes no number of its trajectory, so a resumed run may change them.
    replicas: int = setting(1, "data-parallel vLLM engines on Ray, each scoring a share of the batch",
                            checks=(at_least(1),), on_resume=OnResume.MAY_CHANGE)
    ray_address: str | None = setting(None, "an existing Ray cluster for the replicas (default: start a local one)",
                                      checks=(_not_blank,), on_resume=OnResume.MAY_CHANGE)
    tensor_parallel_size: int = setting(1, "vLLM tensor parallelism inside each engine", checks=(at_least(1),),
                                        on_resume=OnResume.MAY_CHANGE)
    pipeline_parallel_size: int = setting(1, "vLLM pipeline parallelism inside each engine", checks=(at_least(1),),
                                          on_resume=OnResume.MAY_CHANGE)

    def validate(self) -> None:
        """Each setting's own checks, then the ones between settings."""
        check_settings(self)
        if self.engine == "reference" and not self.fast:
            raise ConfigError("--stock-vllm goes with --engine vllm")
        if self.compile and (self.engine == "reference" or not self.fast):
            raise ConfigError("--compile compiles the patched vLLM engine: not with --engine reference or --stock-vllm")
        if self.engine == "reference" and (self.replicas > 1 or self.ray_address is not None
                                           or self.tensor_parallel_size * self.pipeline_parallel_size > 1):
            raise ConfigError("--replicas, --ray-address and --tensor/--pipeline-parallel-size go with --engine vllm")
        if (self.replicas > 1 or self.ray_address is not None) and importlib.util.find_spec("ray") is None:
            raise ConfigError("--replicas/--ray-address need Ray: pip install 'mezo-vllm[ray]'")
        if self.report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
            raise ConfigError("--report-to tensorboard needs TensorBoard: pip install 'mezo-vllm[tensorboard]'")
        if (self.task is None) == (self.data is None):
            raise ConfigError("give exactly one of --task NAME or --data FILE")
        if self.estimator == "fzoo" and self.directions < 2:
            raise ConfigError("--estimator fzoo normalises by the spread of its estimates: it needs --directions ≥ 2")
        if self.warmup_steps >= self.steps:
            raise ConfigError(f"--warmup-steps {self.warmup_steps} must be below --steps {self.steps}")
        if self.train_only == "B" and self.weight_decay:
            raise ConfigError("--train-only B keeps A at its initialisation: --weight-decay would shrink it")
        if self.task is not None and (self.eval_data is not None or self.eval_split):
            raise ConfigError("--eval-data and --eval-split go with --data (a built-in task has its own dev split)")
        if self.eval_data is not None and self.eval_split:
            raise ConfigError("--eval-split holds dev data out of --data: not with --eval-data")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> "TuneConfig":
        """A saved config (a run's config.json); ConfigError, naming the field, if it is not one.
        Keys that are no setting (another version's) are skipped."""
        if not isinstance(data, dict):
            raise ConfigError(f"must be a JSON object, got {type(data).__name__}")
        if not isinstance(data.get("out"), str):
            raise ConfigError("field 'out': missing or not a string")
        return cls(**typed_values(cls, {**UNTIL_ADDED, **data}, unknown_keys=False))

    def resumed(self, run_dir: str, given: Mapping[str, Any]) -> "TuneConfig":
        """This saved run continued in `run_dir` (it may have moved) with the settings the user
        gave again (`given`: command line and recipe).

        A setting that is the run's for good must equal the saved one: silently training on with
        another model, rank or learning rate than the checkpoint's would be worse than an error.
        A setting that may change replaces the saved one when given; trust_remote_code is never
        read back (only the user grants it).
        """
        by_name = {f.name: f for f in fields(self)}
        rule = {name: setting_of(f).on_resume for name, f in by_name.items()}
        may_change = [flag_of(f) for r in (OnResume.MAY_CHANGE, OnResume.ASK_AGAIN)
                      for f in by_name.values() if rule[f.name] is r]
        for name, value in given.items():
            f, old = by_name[name], getattr(self, name)
            if name == "out":
                if Path(value).resolve() != Path(run_dir).resolve():
                    raise ConfigError(f"--out {value}: --resume {run_dir} is the run folder; give one of them")
            elif rule[name] is OnResume.KEEP and not (setting_of(f).same or operator.eq)(value, old):
                shown = flag_of(f) if kind(f) == "bool" else f"{flag_of(f)} {value}"
                raise ConfigError(f"{shown}: the run in {run_dir} was started with {name}={old!r}; "
                                  f"a resumed run keeps its settings (only {_listed(may_change)} may change)")
        changed = {name: value for name, value in given.items() if rule[name] is OnResume.MAY_CHANGE}
        asked = {f.name: given.get(f.name, f.default) for f in by_name.values() if rule[f.name] is OnResume.ASK_AGAIN}
        return replace(self, out=run_dir, **changed, **asked)


def _listed(names: list[str]) -> str:
    return ", ".join(names[:-1]) + f" and {names[-1]}" if len(names) > 1 else names[0]
