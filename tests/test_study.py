"""examples/study.py without an engine: which runs are left, the refusal of results from other
settings, the bf16 skip, and the report's mean ± std over seeds (synthetic result files)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

_SPEC = importlib.util.spec_from_file_location("study", Path(__file__).parent.parent / "examples" / "study.py")
study = sys.modules["study"] = importlib.util.module_from_spec(_SPEC)  # dataclasses look it up there
_SPEC.loader.exec_module(study)


def _result(root: Path, setting: str, seed: int, status: str = "done", **values) -> None:
    cfg = study.config(study.BY_NAME[setting], seed, root)
    record = {"name": f"{setting}-s{seed}", "config": study._as_saved(cfg), "status": status, "seed": seed,
              "steps": cfg.steps, "dev_curve": [{"step": cfg.steps, "accuracy": values.get("dev_final", 0.5),
                                                  "wall_s": 60.0}], **values}
    (root / f"{setting}-s{seed}.json").write_text(json.dumps(record))


def test_pending_skips_finished_runs_and_refuses_other_settings(tmp_path):
    _result(tmp_path, "base", 0)
    _result(tmp_path, "base", 1, status="diverged")
    _result(tmp_path, "base", 2, status=None)  # a sitting stopped by --minutes: to be resumed
    todo = study._pending([study.BY_NAME["base"], study.BY_NAME["cosine"]], [0, 1, 2], tmp_path, None)
    assert [(s.name, seed) for s, seed in todo] == [("base", 2), ("cosine", 0), ("cosine", 1), ("cosine", 2)]
    with pytest.raises(Exception, match=r"base-s0.json was run with other settings \(eval_every, save_every, steps\)"):
        study._pending([study.BY_NAME["base"]], [0], tmp_path, 5)  # a smoke run into the real results


def test_steps_override_scales_warmup_and_intervals():
    cfg = study.config(study.BY_NAME["cosine-warmup-30"], 1, Path("r"), steps=100)
    assert (cfg.steps, cfg.warmup_steps, cfg.eval_every, cfg.save_every, cfg.seed) == (100, 10, 8, 16, 1)
    assert cfg.out == "r/cosine-warmup-30-s1"
    fzoo = study.config(study.BY_NAME["fzoo-n4-lr-1e-2"], 0, Path("r"))
    assert (fzoo.estimator, fzoo.directions, fzoo.steps) == ("fzoo", 4, 120)  # 5 variants/step: 2/5 of 300
    for setting in study.GRID:
        study.config(setting, 0, Path("r")).validate()


def test_bf16_settings_are_skipped_without_native_bf16(tmp_path, monkeypatch):
    children = []  # never start an engine here, even if the skip breaks
    monkeypatch.setattr(study.subprocess, "run",
                        lambda command: children.append(command) or subprocess.CompletedProcess(command, 0))
    monkeypatch.setattr(study, "native_bf16", lambda: (False, "neither avx512_bf16 nor amx_bf16"))
    result = CliRunner().invoke(study.main, ["run", "--setting", "bf16-*", "--setting", "base", "--seeds", "0",
                                             "--root", str(tmp_path)])
    out = result.output
    assert result.exit_code == 0, out
    assert "skipping the bf16 settings: this CPU has no native bf16 (neither avx512_bf16 nor amx_bf16)" in out
    assert "1 runs to do in 1 engine shapes" in out
    assert len(children) == 1 and children[0][-1] == "base-s0"


def test_report_table_is_mean_and_std_over_seeds_sorted_by_dev(tmp_path):
    for seed, (test, dev, wall) in enumerate([(0.80, 0.70, 600.0), (0.84, 0.74, 660.0), (0.88, 0.78, 720.0)]):
        _result(tmp_path, "cosine", seed, test_accuracy=test, test_accuracy_best=test + 0.01, dev_final=dev,
                wall_s=wall)
    _result(tmp_path, "base", 0, test_accuracy=0.9, dev_final=0.6, wall_s=300.0)
    _result(tmp_path, "base", 1, status="diverged")
    found = study.rows(tmp_path)
    assert [r.setting.name for r in found] == ["cosine", "base"]  # chosen on dev, not on test
    mean, std = found[0].stat("test_accuracy")
    assert mean == pytest.approx(0.84) and std == pytest.approx(0.04)  # sample std over the 3 seeds
    assert math.isnan(found[1].stat("test_accuracy")[1])
    text = study.table(found)
    assert "| cosine | schedule | lr_schedule=cosine | 3 | 300 | 74.0 ± 4.0 | 84.0 ± 4.0 | 85.0 ± 4.0 | 11.0 ± 1.0 |" in text
    # a result file older than the best/ figure shows none for it
    assert "| base | defaults | — | 1 (+1 diverged) | 300 | 60.0 | 90.0 | — | 5.0 |" in text
    result = CliRunner().invoke(study.main, ["report", "--root", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "table.md").read_text().strip() == text and (tmp_path / "study.png").stat().st_size > 10_000


def test_dev_curve_reads_the_dev_lines_among_the_train_lines(tmp_path):
    """metrics.jsonl holds a train line per step beside the dev evaluations: the curve is the latter."""
    lines = [{"step": 0, "accuracy": 0.5, "skipped_steps": 0, "wall_s": 4.0},
             {"step": 1, "train_loss": 1.2, "train_loss_ema": 1.2, "lr": 2e-3, "abs_g": 0.4},
             {"step": 1, "accuracy": 0.75, "skipped_steps": 0, "wall_s": 9.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert study._dev_curve(tmp_path) == [{"step": 0, "accuracy": 0.5, "wall_s": 4.0},
                                          {"step": 1, "accuracy": 0.75, "wall_s": 9.5}]


def test_a_result_file_older_than_a_setting_reads_it_as_its_default(tmp_path):
    """A result written before a setting existed (here `compile`) is the grid's run if the setting is
    at its default, and another run if the grid changes it."""
    _result(tmp_path, "base", 0)
    path = tmp_path / "base-s0.json"
    record = json.loads(path.read_text())
    del record["config"]["compile"]
    path.write_text(json.dumps(record))
    assert study._pending([study.BY_NAME["base"]], [0], tmp_path, None) == []
    record["config"]["seed"] = 5
    path.write_text(json.dumps(record))
    with pytest.raises(Exception, match=r"was run with other settings \(seed\)"):
        study._pending([study.BY_NAME["base"]], [0], tmp_path, None)


# --------------------------------------------------------------------------- the recipes it chose

# recipes/ file → the study setting it ships
RECIPES = {"sst2.yaml": "review-n4-norm-25-lr-8e-3", "sst2-gemma3-270m.yaml": "gemma3-270m-lr-2e-3"}
DEFAULT = "review-n4-norm-25-lr-8e-3"  # the study setting `mezo-vllm tune --task sst2` runs without flags (make tune)


def test_each_recipe_is_the_study_setting_that_chose_it():
    """recipes/ holds only settings the study measured: a recipe edited by hand (or a study
    setting changed after its recipe shipped) fails here. The recipe leaves dtype to auto, which
    is the study's bf16 on the CPUs it ran on."""
    from mezo_vllm.config import TuneConfig
    from mezo_vllm.recipe import read_recipe

    folder = Path(__file__).parent.parent / "recipes"
    assert sorted(p.name for p in folder.iterdir()) == sorted(RECIPES)
    for name, setting in RECIPES.items():
        values = read_recipe(str(folder / name))
        assert "dtype" not in values
        recipe = TuneConfig(out="x", **values)
        recipe.validate()
        measured = study.config(study.BY_NAME[setting], 0, Path("x"))
        assert measured.dtype == "bfloat16"
        differ = {k for k, v in study._as_saved(recipe).items() if study._as_saved(measured)[k] != v}
        assert differ == {"out", "dtype"}, differ


def test_the_defaults_are_the_study_setting_that_chose_them():
    """`mezo-vllm tune --task sst2` with no other flag is the chosen study setting, up to dtype
    (auto: the study's bf16 on the CPUs it ran on), and the Makefile's `make tune` runs it."""
    from mezo_vllm.config import TuneConfig

    default = TuneConfig(out="x", task="sst2")
    measured = study.config(study.BY_NAME[DEFAULT], 0, Path("x"))
    differ = {k for k, v in study._as_saved(default).items() if study._as_saved(measured)[k] != v}
    assert differ == {"out", "dtype"}, differ
    assert (default.dtype, measured.dtype) == ("auto", "bfloat16")
    make = (Path(__file__).parent.parent / "Makefile").read_text()
    assert "mezo-vllm tune --task sst2 --out runs/sst2-default $(ARGS)" in make


def test_sst2s_template_is_the_best_one_the_study_measured():
    """The task `sst2` prompts as the template with the best zero-shot accuracy in the committed
    `study.py templates` results (train and dev only), and `sst2-mezo` as MeZO's."""
    from mezo_vllm.data import load_task

    measured = json.loads((Path(__file__).parent.parent / "docs" / "study" / "templates.json").read_text())
    assert set(measured) == set(study.TEMPLATES)
    best = max(measured, key=lambda name: measured[name]["accuracy"])
    mezo = next(name for name in measured if "sst2-mezo" in name)
    assert measured[best]["accuracy"] > measured[mezo]["accuracy"] + 0.2
    reviews = [e.prompt.removesuffix(" It was") for e in load_task("sst2-mezo").train.examples[:20]]
    for task, name in (("sst2", best), ("sst2-mezo", mezo)):
        template, targets = study.TEMPLATES[name]
        examples = load_task(task).train.examples[:20]
        assert [e.prompt for e in examples] == [template.format(s=r) for r in reviews]
        assert all(e.targets == targets for e in examples)


def test_tail_average_is_the_mean_of_the_last_adapters(tmp_path):
    """The mean of a run's last K adapters, from its final adapter and trajectory alone, equals the
    mean of the iterates kept along the way: --normalise's window is rebuilt in order, and a
    skipped (non-finite) step moves nothing."""
    import numpy as np

    from mezo_vllm.adapter import LoraAdapter, LoraSpec, model_linear_shapes
    from mezo_vllm.config import TuneConfig
    from mezo_vllm.estimator import learning_rate
    from mezo_vllm.model import resolve_model
    from mezo_vllm.trainer import estimator_for, step_seed

    cfg = TuneConfig(out=str(tmp_path), task="sst2", steps=8, directions=2, normalise=3)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_json()))
    theta = LoraAdapter.init(LoraSpec(), model_linear_shapes(resolve_model(None)), seed=0)
    estimator, rng, iterates, lines = estimator_for(cfg), np.random.default_rng(0), [], []
    for step in range(cfg.steps):
        seeds, grads = [step_seed(0, step, k) for k in range(2)], rng.normal(size=2).tolist()
        lr = learning_rate(cfg.lr, cfg.lr_schedule, step, cfg.steps)
        if step == 5:
            lines.append({"step": step, "seeds": seeds, "grads": [math.nan, grads[1]], "lr": lr, "skipped": True})
        else:
            theta.apply(estimator.update(estimator.directions(step, seeds), grads, lr))
            lines.append({"step": step, "seeds": seeds, "grads": grads, "lr": lr})
        iterates.append(theta.copy())
    (tmp_path / "trajectory.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    theta.save(tmp_path / "adapter", "base")
    for k in (1, 4, 8):
        mean = study.tail_average(tmp_path, k).tensors
        expected = {key: sum(it.tensors[key] for it in iterates[-k:]) / k for key in mean}
        assert max((mean[key] - expected[key]).abs().max().item() for key in mean) < 1e-6
        moved = max((mean[key] - theta.tensors[key]).abs().max().item() for key in mean)
        assert (moved == 0.0) if k == 1 else (moved > 1e-3)
