"""examples/quality.py's table of the defaults without an engine: each seed's best/ score joined
to its own run, mean ± std over seeds, SST-2 read from the study's finished runs."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

_SPEC = importlib.util.spec_from_file_location("quality", Path(__file__).parent.parent / "examples" / "quality.py")
quality = sys.modules["quality"] = importlib.util.module_from_spec(_SPEC)  # dataclasses look it up there
_SPEC.loader.exec_module(quality)


def _write(folder: Path, name: str, **record) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(record))


def test_defaults_rows_join_each_seeds_best_and_read_sst2_from_the_study(tmp_path):
    results, study = tmp_path / "results", tmp_path / "study"
    _write(results, "rte-zero-shot", zero_shot=0.5, test_examples=77)
    for seed, final, best in ((0, 0.40, None), (1, 0.50, 0.60), (2, 0.60, 0.30)):
        _write(results, f"rte-defaults-s{seed}", seed=seed, test=final, train_s=600.0 * (seed + 1), test_examples=77)
        if best is not None:
            _write(results, f"rte-defaults-s{seed}-scored", test_adapter=final, test_best=best)
    _write(results, "rte-defaults-s3", seed=3, train_s=60.0, test_examples=77)  # stopped: no test score yet
    _write(results, "sst2-first-order", test=0.9, train_s=300.0, steps=300)
    _write(results, "sst2-first-order-s1", test=0.8, train_s=360.0, steps=300)
    _write(results, "sst2-first-order-s2", train_s=300.0, steps=300)  # not scored yet
    # another base model's first-order runs are not the default model's ceiling
    _write(results, quality._first_order_name("sst2", "gemma3-270m"), test=0.1, train_s=60.0, steps=30)
    for seed, status in ((0, "done"), (1, "done"), (2, "diverged")):
        _write(study, f"{quality.STUDY_DEFAULTS}-s{seed}", status=status, test_accuracy=0.8 + seed / 10,
               test_accuracy_best=0.7, wall_s=480.0, test_examples=272)
    _write(study, "review-n4-lr-8e-3-s0", status="done", test_accuracy=0.1, test_accuracy_best=0.1, wall_s=1.0,
           test_examples=272)

    rows = {row.task: row for row in quality.defaults_rows(results, study)}

    assert set(rows) == {"sst2", "rte"}
    assert rows["rte"].final == [0.40, 0.50, 0.60] and rows["rte"].best == [0.60, 0.30]
    assert rows["rte"].minutes == [10.0, 20.0, 30.0] and rows["rte"].zero_shot == 0.5
    assert rows["sst2"].final == [0.8, 0.9] and sorted(rows["sst2"].first_order) == [0.8, 0.9]
    assert sorted(rows["sst2"].first_order_minutes) == [5.0, 6.0] and rows["sst2"].first_order_steps == [300]
    table = quality.defaults_table(list(rows.values()))
    assert "| rte | accuracy | 77 | 50.0 | **50.0 ± 10.0** | 45.0 ± 21.2 (2 seeds) | 3 | 20.0 ± 10.0 min | — |" in table
    assert "| sst2 | accuracy | 272 | — | **85.0 ± 7.1** | 70.0 ± 0.0 | 2 | 8.0 ± 0.0 min | 85.0 ± 7.1 (2; 300 steps, 5.5 ± 0.7 min) |" in table
