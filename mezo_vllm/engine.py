"""The vLLM engine as MeZO's forward-pass engine: variant slots written in place, span scoring.

Everything that touches vLLM lives here or in `mezo_vllm/patches/`. The engine holds one `LLM` with LoRA
enabled and one slot per variant (θ+εz, θ−εz, ...). The fp32 master adapter lives on the worker
side; the driver sends seeds and scalars only, and each worker regenerates z for its tensors.
"""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

import contextlib
import itertools
import tempfile
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from . import patches as _patches
from .patches import compiled_lora
from .patches import plugin as _plugin
from .adapter import Direction, LoraAdapter, Update
from .config import ConfigError, vllm_lora_rank
from .data import Request
from .errors import EngineStartError
from .worker import DISK_ADAPTER_ID, QUALNAME

_BASE = None  # variant index meaning "the base model, no adapter"


@dataclass(frozen=True)
class EngineConfig:
    model: str
    dtype: str = "bfloat16"
    max_model_len: int = 1024
    n_variants: int = 2
    seed: int = 0
    kv_cache_gib: float = 1.0
    fast: bool = True  # apply the speed-up patches (False: stock vLLM, for the benchmark)
    trust_remote_code: bool = False  # run a model folder's own Python code: only on request
    # fast only: requests that share a prefix (an example's options, few-shot demonstrations)
    # compute it once (patches.prefix_sharing); only whole KV blocks are shared.
    prefix_sharing: bool = True
    # KV cache block size. None: 32 for fast engines (the CPU attention kernel's smallest; more
    # of an example's context is shared between its options), vLLM's default (128) otherwise.
    block_size: int | None = None
    # vLLM's model parallelism inside this one engine; each worker holds the whole (small) fp32
    # master adapter, regenerates the whole z from the seed and lets vLLM's LoRA layers slice
    # out its shard, so a sharded engine writes exactly the variants an unsharded one does.
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    # fast only: keep vLLM's CPU compilation (Dynamo + Inductor) on with LoRA
    # (patches.compiled_lora); the first start compiles, later ones read vLLM's cache.
    compile: bool = False


def _block_size(config: EngineConfig) -> dict[str, int]:
    """LLM(block_size=...) for this config, or nothing (vLLM's default)."""
    if config.block_size is not None:
        return {"block_size": config.block_size}
    return {"block_size": 32} if config.fast else {}


def _worker_env(config: EngineConfig) -> dict[str, str]:
    """Environment for the worker processes vLLM starts (tensor/pipeline parallel engines).

    They apply our patches through the `vllm.general_plugins` entry point (mezo_vllm/patches/plugin.py),
    which acts only when asked. On CPU, vLLM's default thread binding ("auto") puts one rank on
    each NUMA node and refuses more ranks than nodes (one node on small machines): unless the user
    set VLLM_CPU_OMP_THREADS_BIND, this process's cores are split between the ranks instead.
    """
    env = {_plugin.ENV: "all" if config.fast else "required",
           compiled_lora.ENV: "1" if config.fast and config.compile else "0"}
    world = config.tensor_parallel_size * config.pipeline_parallel_size
    if world == 1 or "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return env
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return env
    from vllm.utils.cpu_resource_utils import get_visible_memory_node

    if len(get_visible_memory_node()) >= world:
        return env
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < world:  # more ranks than cores: one unbound thread each
        return {**env, "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1"}
    per = len(cores) // world
    lists = [",".join(map(str, cores[k * per:(k + 1) * per])) for k in range(world)]
    return {**env, "VLLM_CPU_OMP_THREADS_BIND": "|".join(lists)}


@contextlib.contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    """`env` set while vLLM starts its workers, then restored, so a later stock engine in this
    process stays stock. vLLM freezes its view of the environment once an engine has started
    (`vllm.envs.enable_envs_cache`): unfrozen here, so a second engine reads its own settings."""
    from vllm import envs

    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    envs.disable_envs_cache()
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _refusal(error: Exception) -> str:
    """The line of a vLLM config error that says what is wrong (pydantic wraps it in others)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    line = next((line for line in lines if line.startswith("Value error, ")), lines[0] if lines else "")
    return line.removeprefix("Value error, ").split(" [type=")[0]


def _start_failure(error: Exception) -> str:
    """One line for an exception out of vLLM's start-up: its type and the line that says why."""
    return f"{type(error).__name__}: {_refusal(error)[:300]}" if str(error).strip() else type(error).__name__


class VllmEngine:
    """One vLLM `LLM`, `n_variants` LoRA slots, and the master adapter on its workers.

    Two scoring backends behind `score`: on vLLM's V1 model runner (CPU; CUDA with
    VLLM_USE_V2_MODEL_RUNNER=0) `patches.span_logprobs`, on V2 (CUDA's default) vLLM's native
    prompt-token-id log-probs (`v2_scoring`); `fast=False` is upstream's prompt log-probs.
    """

    def __init__(self, config: EngineConfig, adapter: LoraAdapter):
        """vLLM started with one slot per variant holding `adapter`. Whatever vLLM raises on the
        way (a model it cannot load, too little memory, a worker that died) is an
        EngineStartError naming the cause in one line."""
        _patches.apply_all(_patches.for_engine("all" if config.fast else "required"))
        self.config = config
        from .platform_policy import check_pipeline_parallel, platform_name

        check_pipeline_parallel(config.pipeline_parallel_size, platform_name())
        try:
            self._start(config, adapter)
        except (ConfigError, _patches.PatchVersionError):
            raise
        except Exception as e:
            raise EngineStartError(f"vLLM failed to start on {config.model} ({_start_failure(e)})") from e

    def _start(self, config: EngineConfig, adapter: LoraAdapter) -> None:
        from vllm import LLM, SamplingParams

        from .platform_policy import expected_runner, runner_is_v2

        parallel = config.tensor_parallel_size * config.pipeline_parallel_size > 1
        try:
            with _environment(_worker_env(config)):
                self.llm = LLM(
                    model=config.model,
                    dtype=config.dtype,
                    # + 1: a scoring request asks for one generated token after its prompt, and
                    # vLLM refuses a prompt of max_model_len tokens plus that one
                    max_model_len=config.max_model_len + 1,
                    enable_lora=True,
                    max_loras=config.n_variants + 1,  # + one slot for adapters read from disk
                    max_cpu_loras=config.n_variants + 1,
                    max_lora_rank=vllm_lora_rank(adapter.spec.r),  # the adapter fills [:r] of a slot
                    # only the adapter's modules get LoRA layers: vLLM otherwise wraps every
                    # linear layer, the embeddings and the lm_head, and runs LoRA ops on zeros
                    lora_target_modules=list(adapter.spec.targets),
                    seed=config.seed,
                    trust_remote_code=config.trust_remote_code,
                    kv_cache_memory_bytes=int(config.kv_cache_gib * (1 << 30)),
                    tensor_parallel_size=config.tensor_parallel_size,
                    pipeline_parallel_size=config.pipeline_parallel_size,
                    worker_extension_cls=QUALNAME,
                    **_block_size(config),
                )
        except ValueError as e:  # vLLM's config validation (pydantic's errors are ValueErrors)
            if not parallel:
                raise
            raise ConfigError(f"--tensor-parallel-size {config.tensor_parallel_size} "
                              f"--pipeline-parallel-size {config.pipeline_parallel_size}: "
                              f"vLLM refuses: {_refusal(e)}") from None
        self.v2 = runner_is_v2(self.llm.llm_engine.vllm_config)
        if self.v2 != (expected_runner() == "v2"):
            raise RuntimeError(f"vLLM runs model runner {'V2' if self.v2 else 'V1'}, but the patches "
                               f"for {expected_runner().upper()} were applied (mezo_vllm.platform_policy."
                               "expected_runner is out of date for this vLLM)")
        self.tokenizer = self.llm.get_tokenizer()
        # fast=False scores with upstream's prompt log-probs (the benchmark's stock vLLM)
        self._params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        self._span_keys = itertools.count()
        self.tokens = {"prompt": 0, "cached": 0}
        self._dir = tempfile.TemporaryDirectory(prefix="mezo-vllm-slots-")
        adapter.save(self._dir.name, base_model=config.model)
        self._names = itertools.count()
        self._loras = self._fresh_loras()
        self.score([Request(0, 0, (0, 0), 1)], list(range(config.n_variants)))  # load into slots
        self.load_master(adapter)

    def _rpc(self, method: str, *args: Any) -> list[Any]:
        """`worker.MezoWorkerExtension.<method>` on every worker, by name."""
        return self.llm.collective_rpc(method, args=args)

    def _fresh_loras(self) -> list[Any]:
        """New names for the same slots: vLLM's prefix cache keys on the name, not the weights."""
        from vllm.lora.request import LoRARequest

        round_ = next(self._names)
        return [
            LoRARequest(f"mezo-{round_}-v{k}", k + 1, self._dir.name)
            for k in range(self.config.n_variants)
        ]

    @property
    def max_model_len(self) -> int:
        return self.config.max_model_len

    def write_variants(self, writes: Sequence[tuple[Direction, float]]) -> None:
        """Slot k ← θ + scaleₖ·z(directionₖ) for the k-th (direction, scale), computed from the
        master."""
        if len(writes) > self.config.n_variants:
            raise ValueError(f"{len(writes)} variants for {self.config.n_variants} slots")
        self._rpc("mezo_write", [(k + 1, direction, scale) for k, (direction, scale) in enumerate(writes)])
        self._loras = self._fresh_loras()

    def apply_update(self, update: Update) -> None:
        self._rpc("mezo_apply_update", update)

    def master(self) -> dict[str, torch.Tensor]:
        return self._rpc("mezo_master")[0]

    def load_master(self, adapter: LoraAdapter) -> None:
        self._rpc("mezo_install", adapter.spec, adapter.tensors)

    def slot_tensors(self, variant: int) -> dict[str, torch.Tensor]:
        """What variant slot k holds now (B times α/r, as vLLM computes with it)."""
        return self._rpc("mezo_read_slot", variant + 1)[0]

    def score_from_disk(self, adapter_dir: str, requests: Sequence[Request]) -> np.ndarray:
        """Score with a PEFT folder loaded by vLLM itself (`LoRARequest`), in the spare slot.

        The adapter is removed afterwards, so the variant slots are never evicted.
        """
        from vllm.lora.request import LoRARequest

        lora = LoRARequest(f"disk-{next(self._names)}", DISK_ADAPTER_ID, adapter_dir)
        try:
            return self._score_with(requests, [lora])[0]
        finally:
            self.llm.llm_engine.remove_lora(DISK_ADAPTER_ID)

    def generate(self, contexts: Sequence[Sequence[int]], max_tokens: int,
                 variants: Sequence[int | None], stop: str = "\n") -> list[list[str]]:
        """Greedy continuations of token-id contexts, [variant][context], all in one engine call
        (generation tasks' F1, and MeZO's F1 objective, which compares the ± variants)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=[stop])
        loras = self._variant_loras(variants)
        prompts = [TokensPrompt(prompt_token_ids=list(c)) for _ in loras for c in contexts]
        outputs = self.llm.generate(prompts, params, lora_request=[lr for lr in loras for _ in contexts],
                                    use_tqdm=False)
        texts = [o.outputs[0].text for o in outputs]
        return [texts[k * len(contexts):(k + 1) * len(contexts)] for k in range(len(loras))]

    def score(self, requests: Sequence[Request], variants: Sequence[int | None]) -> np.ndarray:
        """Summed target log-probs of every scored column (`Request.targets`, in request order):
        shape [len(variants), columns].

        One engine call for all of them; variant-major order keeps each slot's tokens contiguous.
        `None` as a variant scores the base model without any adapter.
        """
        return self._score_with(requests, self._variant_loras(variants))

    def _variant_loras(self, variants: Sequence[int | None]) -> list[Any]:
        return [None if v is _BASE else self._loras[v] for v in variants]

    def _score_with(self, requests: Sequence[Request], variant_loras: Sequence[Any]) -> np.ndarray:
        """`score` with explicit LoRARequests (None: the base model), one row per LoRA.

        fast=True: the target rows only (V1: patches.span_logprobs; V2: vLLM's native scoring);
        fast=False: upstream's prompt log-probs (the benchmark's stock vLLM). All give the same
        sums up to rounding.
        """
        if self.config.fast:
            return self._score_spans(requests, variant_loras)
        return self._score_prompt_logprobs(requests, variant_loras)

    def _score_spans(
        self, requests: Sequence[Request], variant_loras: Sequence[Any],
        share_prefix: bool | None = None,
    ) -> np.ndarray:
        """Score the target rows only (the lm_head never runs on the others).

        With `share_prefix` (default: the config's `prefix_sharing`) requests read the prefix
        cache up to their span (patches.prefix_sharing), so equal prefixes are computed once.
        """
        columns = [values.sum(0) for values in self._span_results(requests, variant_loras, share_prefix)]
        return np.concatenate(columns).reshape(len(variant_loras), -1)

    def _span_results(
        self, requests: Sequence[Request], variant_loras: Sequence[Any], share_prefix: bool | None,
    ) -> list[np.ndarray]:
        """One engine call: the [n_targets, columns] log-probs of every request under every LoRA,
        LoRA-major (variant-major order keeps each slot's tokens contiguous)."""
        from vllm.inputs import TokensPrompt

        from . import v2_scoring
        from .patches import span_logprobs

        share = self.config.prefix_sharing if share_prefix is None else share_prefix
        everyone = [r for _ in variant_loras for r in requests]
        loras = [lora for lora in variant_loras for _ in requests]
        if self.v2:  # V2 scores rows up to the prompt's last but one: the whole span is sent
            prompts = [TokensPrompt(prompt_token_ids=list(r.token_ids)) for r in everyone]
            params = v2_scoring.sampling_params(everyone, read_prefix_cache=share)
            outputs = self.llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
            self._count(outputs)
            return v2_scoring.parse_outputs(outputs, everyone)
        # V1 (patches.span_logprobs): a span's last token is never input, only a candidate
        prompts = [TokensPrompt(prompt_token_ids=list(r.token_ids[:-1])) for r in everyone]
        keys = [next(self._span_keys) for _ in everyone]
        params = [span_logprobs.span_params(r.span_start, key, [list(row) for row in r.candidates],
                                            read_prefix_cache=share)
                  for key, r in zip(keys, everyone)]
        try:
            outputs = self.llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
        finally:
            results = self._rpc("mezo_take_spans")  # also clears what a failed call left behind
        self._count(outputs)
        return span_logprobs.gather(results, keys)

    def _count(self, outputs: Sequence[Any]) -> None:
        """Prompt tokens scored, and those the prefix cache served (the benchmark's figures)."""
        self.tokens["prompt"] += sum(len(o.prompt_token_ids) for o in outputs)
        self.tokens["cached"] += sum(o.num_cached_tokens or 0 for o in outputs)

    def token_logprobs(
        self, requests: Sequence[Request], variants: Sequence[int | None],
        share_prefix: bool | None = None,
    ) -> list[list[np.ndarray]]:
        """log p of each target token, [variant][request] arrays [n_targets, columns] (fast
        engines): what `score` sums, for the correctness oracle (`mezo_vllm.validate`,
        tests/test_oracle.py)."""
        if not self.config.fast:
            raise ValueError("token_logprobs needs a fast engine (target rows only)")
        values = iter(self._span_results(requests, self._variant_loras(variants), share_prefix))
        return [[next(values) for _ in requests] for _ in variants]

    def _score_prompt_logprobs(
        self, requests: Sequence[Request], variant_loras: Sequence[Any]
    ) -> np.ndarray:
        """Score through upstream's prompt log-probs (every prompt position, full vocabulary),
        which give only the prompt's own tokens: a request with alternatives becomes one
        request per column, as a stock vLLM user scores options."""
        from vllm.inputs import TokensPrompt

        requests = [column for r in requests for column in r.columns()]
        prompts = [TokensPrompt(prompt_token_ids=list(r.token_ids)) for _ in variant_loras for r in requests]
        loras = [lora for lora in variant_loras for _ in requests]
        outputs = self.llm.generate(prompts, self._params, lora_request=loras, use_tqdm=False)
        self._count(outputs)
        sums = np.empty(len(prompts), dtype=np.float64)
        for i, (out, r) in enumerate(zip(outputs, itertools.cycle(requests))):
            plp = out.prompt_logprobs
            sums[i] = sum(plp[t][tok].logprob for t, tok in enumerate(r.token_ids) if t >= r.span_start)
        return sums.reshape(len(variant_loras), len(requests))
