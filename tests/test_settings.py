"""Settings declared once: the options generated from the config dataclasses are the ones users
typed before (names, defaults, types, choices), every one has help, recipes and aliases give the
same config as flags, and the resume rule read from the metadata is the one the CLI had.

Nothing here starts an engine: `trainer.tune` is replaced by a stub that records the config.
"""

from __future__ import annotations

import json
from dataclasses import fields
from importlib.metadata import version

import click
import pytest
from click.testing import CliRunner

import mezo_vllm
import mezo_vllm.trainer
from mezo_vllm import bench
from mezo_vllm.cli import main
from mezo_vllm.config import DTYPES, TuneConfig
from mezo_vllm.estimator import ESTIMATORS, SCHEDULES
from mezo_vllm.settings import ConfigError, OnResume, setting_of
from mezo_vllm.validate import ValidateConfig

# The options as they were hand-written in cli.py before they were generated:
# flag → (default, type name or choices). Flags (is_flag) have the default False. The defaults of
# --lr, --directions, --eval-every and --save-every are issue 12's study's choice (they were 0.002,
# 1, 100 and 100).
TUNE = {
    "--task": (None, "text"), "--data": (None, "path"), "--eval-data": (None, "path"), "--eval-split": (0.0, "float"),
    "--model": (None, "text"), "--out": (None, "path"), "--resume": (None, "path"),
    "--overwrite": (False, "boolean"), "--targets": ("q_proj,v_proj", "text"), "--rank": (8, "integer"),
    "--alpha": (16.0, "float"), "--lr": (0.008, "float"), "--lr-schedule": ("linear", ("constant", "linear", "cosine")),
    "--eps": (0.01, "float"), "--batch-size": (16, "integer"), "--steps": (300, "integer"),
    "--directions": (4, "integer"), "--estimator": ("zo-sgd", ("zo-sgd", "momentum", "lozo", "fzoo", "curvature")),
    "--momentum": (0.9, "float"), "--momentum-window": (16, "integer"), "--lozo-rank": (2, "integer"),
    "--lozo-period": (50, "integer"), "--normalise": (25, "integer"), "--objective": ("loss", ("loss", "f1")), "--seed": (0, "integer"),
    "--weight-decay": (0.0, "float"), "--dtype": ("auto", ("float32", "bfloat16", "float16", "auto")),
    "--eval-every": (25, "integer"), "--eval-examples": (0, "integer"), "--save-every": (50, "integer"),
    "--max-length": (1024, "integer"), "--overflow": ("truncate", ("truncate", "reject")),
    "--stock-vllm": (False, "boolean"), "--engine": ("vllm", ("vllm", "reference")),
    "--replicas": (1, "integer"), "--ray-address": (None, "text"), "--tensor-parallel-size": (1, "integer"),
    "--pipeline-parallel-size": (1, "integer"), "--trust-remote-code": (False, "boolean"),
    # added since (issue 14)
    "--verbose": (False, "boolean"), "--init-adapter": (None, "path"), "--save-total-limit": (0, "integer"),
    "--report-to": ("none", ("none", "tensorboard")),
    # added for issue 12 (defaults keep earlier runs' behaviour)
    "--warmup-steps": (0, "integer"), "--sparsity": (0.0, "float"), "--train-only": (None, ("B",)),
    # added for issue 11 (vLLM's CPU compilation kept on with LoRA; off: the eager engine of before)
    "--compile": (False, "boolean"),
}
VALIDATE = {
    "--task": (None, "text"), "--data": (None, "path"), "--model": (None, "text"), "--adapter": (None, "path"),
    "--out": ("runs/validate", "path"), "--targets": ("q_proj,v_proj", "text"), "--rank": (8, "integer"),
    "--alpha": (16.0, "float"), "--loss-examples": (32, "integer"), "--batch-size": (16, "integer"), "--seeds": (5, "integer"),
    "--vllm-directions": (100, "integer"), "--max-length": (1024, "integer"),
    "--trust-remote-code": (False, "boolean"),
    "--verbose": (False, "boolean"),  # added since: vLLM's output goes to OUT/engine.log unless given
}
EVAL = {
    "--adapter": (None, "path"), "--task": (None, "text"), "--split": ("test", ("dev", "test")),
    "--data": (None, "path"), "--model": (None, "text"), "--dtype": ("auto", ("float32", "bfloat16", "float16", "auto")),
    "--max-length": (1024, "integer"), "--trust-remote-code": (False, "boolean"),
    "--verbose": (False, "boolean"),  # added since: vLLM's output goes to a log file unless given
}
ALIASES = {
    "--output_dir": "--out", "--learning_rate": "--lr", "--max_steps": "--steps", "--lora_r": "--rank",
    "--lora_alpha": "--alpha", "--lora_target_modules": "--targets", "--per_device_train_batch_size": "--batch-size",
    "--save_total_limit": "--save-total-limit", "--report_to": "--report-to",
}


def _options(command: str) -> dict[str, click.Option]:
    cmd = main.commands[command]
    return {p.opts[0]: p for p in cmd.params if isinstance(p, click.Option) and p.opts[0] != "--help"}


def _default(p: click.Option) -> object:
    """The default a user sees: click 8.5 marks "none given" with a sentinel (a flag's is False)."""
    if p.default is not None and type(p.default).__name__ != "Sentinel":
        return p.default
    return False if p.is_flag else None


def _described(p: click.Option) -> tuple:
    return _default(p), tuple(p.type.choices) if isinstance(p.type, click.Choice) else p.type.name


@pytest.mark.parametrize("command, expected", [("tune", TUNE), ("validate", VALIDATE), ("eval", EVAL)])
def test_generated_options_are_the_hand_written_ones(command, expected):
    options = _options(command)
    extra = {"--config"} if command == "tune" else set()
    assert set(options) == set(expected) | extra
    for flag, (default, type_) in expected.items():
        assert _described(options[flag]) == (default, type_), flag
        assert options[flag].is_flag == (type_ == "boolean"), flag


@pytest.mark.parametrize("command", ["tune", "validate", "eval"])
def test_every_option_has_help_and_shows_its_default(command):
    for flag, p in _options(command).items():
        assert p.help, f"{command} {flag} has no help"
        assert bool(p.show_default) == (_default(p) is not None and not p.is_flag), flag


def test_choices_come_from_one_place():
    tune = _options("tune")
    assert tuple(tune["--dtype"].type.choices) == (*DTYPES, "auto")
    assert tuple(tune["--lr-schedule"].type.choices) == SCHEDULES
    assert tuple(tune["--estimator"].type.choices) == ESTIMATORS
    assert tuple(_options("eval")["--dtype"].type.choices) == (*DTYPES, "auto")
    assert bench.DTYPES is DTYPES


def test_aliases_are_listed_in_help():
    out = CliRunner().invoke(main, ["tune", "--help"]).output
    for alias, flag in ALIASES.items():
        assert f"{flag}, {alias}" in out


def test_saved_config_keys_are_unchanged():
    """A run's config.json from before resumes: no field was renamed or dropped, and the ones added
    since (warmup_steps, sparsity, train_only, compile, normalise) read as what runs did before
    them (normalise, on by default since, as 0)."""
    assert {f.name for f in fields(TuneConfig)} == {
        "out", "model", "task", "data", "eval_data", "eval_split", "targets", "rank", "alpha", "lr", "lr_schedule", "eps",
        "batch_size", "steps", "directions", "seed", "weight_decay", "estimator", "momentum", "momentum_window",
        "lozo_rank", "lozo_period", "objective", "dtype", "eval_every", "save_every", "max_length", "overflow",
        "eval_examples", "fast", "engine", "replicas", "ray_address", "tensor_parallel_size",
        "pipeline_parallel_size", "trust_remote_code",
        "init_adapter", "save_total_limit", "report_to", "warmup_steps", "sparsity", "train_only", "compile",
        "normalise"}  # added since: a config.json without them resumes
    before = {k: v for k, v in TuneConfig(out="x", task="sst2").to_json().items()
              if k not in ("warmup_steps", "sparsity", "train_only", "compile", "normalise")}
    old = TuneConfig.from_json(before)
    assert (old.warmup_steps, old.sparsity, old.train_only, old.compile, old.normalise) == (0, 0.0, None, False, 0)
    assert TuneConfig.from_json({**before, "normalise": 25}).normalise == 25


def test_validate_shares_the_model_settings_with_tune():
    shared = {"model", "targets", "rank", "alpha", "max_length", "trust_remote_code"}
    tune, val = ({f.name: f for f in fields(c)} for c in (TuneConfig, ValidateConfig))
    for name in shared:
        assert setting_of(tune[name]) is setting_of(val[name]), name
    with pytest.raises(ConfigError, match="--rank must be ≤ 512"):
        ValidateConfig(task="sst2", rank=1024).validate()


# --------------------------------------------------------------------------- the command line → a config

@pytest.fixture
def configs(monkeypatch) -> list[TuneConfig]:
    """The configs `tune` would run, instead of running them."""
    seen: list[TuneConfig] = []
    monkeypatch.setattr(mezo_vllm.trainer, "tune", lambda cfg, **kw: seen.append(cfg) or
                        {"run": cfg.out, "before": None, "after": None})
    return seen


def _tune(*args):
    return CliRunner().invoke(main, ["tune", *map(str, args)])


def _one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    message = result.output.strip()
    assert len(message.splitlines()) == 1 and message.startswith("error: "), message
    return message


def test_defaults_on_the_command_line_are_the_dataclass_defaults(configs):
    assert _tune("--out", "r", "--task", "sst2").exit_code == 0
    assert configs == [TuneConfig(out="r", task="sst2")]


def test_flags_convert_to_config_values(configs):
    assert _tune("--out", "r", "--task", "sst2", "--targets", "q_proj, k_proj,", "--stock-vllm",
                 "--trust-remote-code").exit_code == 0
    assert configs[0].targets == ("q_proj", "k_proj") and configs[0].fast is False
    assert configs[0].trust_remote_code is True


def test_aliases_give_the_same_config(configs):
    canonical = ["--out", "r", "--lr", "0.01", "--steps", "5", "--rank", "16", "--alpha", "32",
                 "--targets", "q_proj,k_proj", "--batch-size", "4"]
    aliased = ["--output_dir", "r", "--learning_rate", "0.01", "--max_steps", "5", "--lora_r", "16",
               "--lora_alpha", "32", "--lora_target_modules", "q_proj,k_proj", "--per_device_train_batch_size", "4"]
    assert _tune("--task", "sst2", *canonical).exit_code == 0
    assert _tune("--task", "sst2", *aliased).exit_code == 0
    assert configs[0] == configs[1] != TuneConfig(out="r", task="sst2")


def test_version():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"mezo-vllm, version {version('mezo-vllm')}"
    assert mezo_vllm.__version__ == version("mezo-vllm")


# --------------------------------------------------------------------------- recipes

@pytest.mark.parametrize("name, text", [
    ("recipe.yaml", "task: sst2\nout: from-file\nlr: 1e-3\nsteps: 50\ntargets: [q_proj, k_proj]\nfast: false\n"),
    ("recipe.json", json.dumps({"task": "sst2", "out": "from-file", "lr": 1e-3, "steps": 50,
                                "targets": ["q_proj", "k_proj"], "fast": False})),
])
def test_recipe_then_flags_override_it(tmp_path, configs, name, text):
    recipe = tmp_path / name
    recipe.write_text(text)
    assert _tune("--config", recipe).exit_code == 0
    assert configs[0] == TuneConfig(out="from-file", task="sst2", lr=1e-3, steps=50, targets=("q_proj", "k_proj"),
                                    fast=False)
    assert _tune("--config", recipe, "--steps", "7", "--output_dir", "from-flag").exit_code == 0
    assert (configs[1].steps, configs[1].out, configs[1].lr) == (7, "from-flag", 1e-3)


def test_a_run_config_json_is_a_recipe(tmp_path, configs):
    recipe = tmp_path / "config.json"
    recipe.write_text(json.dumps(TuneConfig(out="old", task="rte", rank=16).to_json()))
    assert _tune("--config", recipe, "--out", "new").exit_code == 0
    assert configs[0] == TuneConfig(out="new", task="rte", rank=16)


@pytest.mark.parametrize("name, text, fragments", [
    ("r.yaml", "task: sst2\nlora_r: 16\n", ["r.yaml: unknown key 'lora_r' (did you mean 'rank'?)"]),
    ("r.yaml", "task: sst2\nlearning_rate: 0.1\n", ["unknown key 'learning_rate' (did you mean 'lr'?)"]),
    ("r.yaml", "task: sst2\nsteps_: 3\n", ["r.yaml: unknown key 'steps_' (did you mean 'steps'?)"]),
    ("r.json", '{"task": "sst2", "bogus": 1}', ["r.json: unknown key 'bogus'"]),
    ("r.yaml", "task: sst2\nrank: '8'\n", ["r.yaml: field 'rank' must be int, got str '8'"]),
    ("r.yaml", "task: sst2\nlr: fast\n", ["r.yaml: field 'lr' must be float, got str 'fast'"]),
    ("r.yaml", "task: sst2\nsteps: true\n", ["r.yaml: field 'steps' must be int, got bool True"]),
    ("r.yaml", "task: sst2\ntargets: q_proj\n", ["r.yaml: field 'targets': must be a list of strings"]),
    ("r.yaml", "- task\n", ["r.yaml: must be a mapping of settings (key: value), got list"]),
    ("r.yaml", "task: [sst2\n", ["r.yaml: not valid YAML"]),
    ("r.json", '{"task": ', ["r.json: not valid JSON"]),
    ("r.toml", "task = 'sst2'", ["r.toml: a recipe is .yaml, .yml or .json"]),
])
def test_bad_recipes(tmp_path, configs, name, text, fragments):
    recipe = tmp_path / name
    recipe.write_text(text)
    message = _one_line_error(_tune("--config", recipe, "--out", tmp_path / "run"))
    for fragment in fragments:
        assert fragment in message
    assert not configs


def test_a_recipe_value_gets_the_checks_of_its_flag(tmp_path, configs):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("task: sst2\nout: r\nrank: 1024\n")
    assert _tune("--config", recipe).exit_code == 0  # the stub of trainer.tune does not check
    with pytest.raises(ConfigError, match="--rank must be ≤ 512"):
        configs[0].validate()


def test_missing_recipe(tmp_path, configs):
    assert "cannot read" in _one_line_error(_tune("--config", tmp_path / "none.yaml"))


def test_yaml_exponents_are_floats(tmp_path, configs):
    """YAML 1.1 reads 1e-3 as a string; a recipe means the number."""
    recipe = tmp_path / "r.yml"
    recipe.write_text("task: sst2\nout: r\nlr: 1e-3\neps: 2.5E-1\nseed: 1_0\n")
    assert _tune("--config", recipe).exit_code == 0
    assert (configs[0].lr, configs[0].eps, configs[0].seed) == (1e-3, 0.25, 10)


# --------------------------------------------------------------------------- the resume rule

def test_resume_rules_are_the_clis_of_before():
    rules = {f.name: setting_of(f).on_resume for f in fields(TuneConfig)}
    assert {n for n, r in rules.items() if r is OnResume.MAY_CHANGE} == {
        "steps", "replicas", "ray_address", "tensor_parallel_size", "pipeline_parallel_size",
        "save_total_limit", "report_to", "compile"}  # compile changes speed, not a number beyond 3.4e-6
    assert {n for n, r in rules.items() if r is OnResume.ASK_AGAIN} == {"trust_remote_code"}


def test_resumed_config():
    saved = TuneConfig(out="old", task="sst2", steps=50, replicas=2, trust_remote_code=True)
    assert saved.resumed("run", {}) == TuneConfig(out="run", task="sst2", steps=50, replicas=2)
    assert saved.resumed("run", {"steps": 80, "replicas": 1, "ray_address": "ray://h:1", "rank": 8,
                                 "trust_remote_code": True}) == \
        TuneConfig(out="run", task="sst2", steps=80, ray_address="ray://h:1", trust_remote_code=True)
    with pytest.raises(ConfigError, match=r"^--lr 0.5: the run in run was started with lr=0.008; .*"
                                          r"\(only --steps, --save-total-limit, --report-to, --compile, --replicas, "
                                          r"--ray-address, --tensor-parallel-size, "
                                          r"--pipeline-parallel-size and --trust-remote-code may change\)$"):
        saved.resumed("run", {"lr": 0.5})
    with pytest.raises(ConfigError, match=r"^--stock-vllm: the run in run was started with fast=True"):
        saved.resumed("run", {"fast": False})
    assert saved.resumed("run", {"model": None}).model is None  # None and the default are one model
