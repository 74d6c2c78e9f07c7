"""Data-parallel MeZO: N vLLM engines as Ray actors behind the trainer's one-engine protocol.

MeZO's seed trick makes replicas cheap. Every replica holds the same fp32 master adapter; each
step every replica writes the same ±εz(seed) variants, scores its shard of the batch and sends
back per-request log-prob sums; the driver computes g exactly as for one engine and broadcasts
the update, (seed, coefficient) pairs, which every replica applies by regenerating z. What
crosses the wire per step is seeds, scalars, the batch's token ids and its per-request sums:
nothing grows with the adapter or the model (`ReplicatedEngine.wire` counts it). The adapter
itself travels only at start, on resume (`load_master`) and at checkpoints (`master`).
"""

from __future__ import annotations

import os
import pickle
import sys
from typing import Any, Sequence

import numpy as np

from .adapter import LoraAdapter, LoraSpec, Update
from .config import ConfigError
from .data import Request
from .engine import EngineConfig


class ReplicaError(RuntimeError):
    """A replica died or failed; the message names it, so the user knows which machine to check."""


def shard_requests(requests: Sequence[Request], n: int) -> list[list[int]]:
    """Indices of `requests` for each of `n` replicas: an example's requests (its options) stay on
    one replica, so its shared prefix is still computed once; examples go, in batch order, to
    the replica with the fewest tokens so far, which evens out the replicas' work."""
    by_example: dict[int, list[int]] = {}
    for i, r in enumerate(requests):
        by_example.setdefault(r.example, []).append(i)
    shards: list[list[int]] = [[] for _ in range(n)]
    tokens = [0] * n
    for indices in by_example.values():
        k = tokens.index(min(tokens))
        shards[k].extend(indices)
        tokens[k] += sum(len(requests[i].token_ids) for i in indices)
    return shards


# Ray's switch between a local-only Ray and one that other machines may join (off by default on
# macOS and Windows; `ray._private.ray_constants.ENABLE_RAY_CLUSTER`). Off, the node's address is
# 127.0.0.1, and Ray's GCS, raylet, agents and workers then listen on loopback only. Ray reads it
# once, when it is imported.
RAY_LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def connect_ray(address: str | None, num_cpus: int) -> tuple[Any, bool]:
    """Ray, connected for the replicas, and whether this call started or joined it (so `close`
    ends it). An already initialised Ray (a notebook's, a test's) is used as it is, and so is
    the cluster at `address`; otherwise a local cluster is started for the run that listens on
    loopback only: a run that only talks to itself has no reason to be reachable from the
    network. Ray's token authentication is left as Ray sets it (on)."""
    if address is None and "ray" not in sys.modules:
        os.environ[RAY_LOCAL_ONLY_ENV] = "0"
    import ray

    if ray.is_initialized():
        return ray, False
    if address:
        ray.init(address=address, include_dashboard=False, logging_level="WARNING")
        return ray, True
    ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level="WARNING",
             object_store_memory=256 << 20)
    nodes = sorted({node["NodeManagerAddress"] for node in ray.nodes()})
    if nodes != ["127.0.0.1"]:  # Ray was imported before the switch could be set
        ray.shutdown()
        raise RuntimeError(f"the local Ray cluster came up on {', '.join(nodes)}, not on 127.0.0.1 only: "
                           f"Ray was imported before mezo_vllm.replicas could set {RAY_LOCAL_ONLY_ENV}=0")
    return ray, True


def _wire_size(payload: Any) -> int:
    """Bytes of a message as pickled (Ray's serialisation of plain data is pickle protocol 5)."""
    return len(pickle.dumps(payload, protocol=5))


class _Replica:
    """One Ray actor: a `VllmEngine` on its own threads (and cores, on a local cluster)."""

    def __init__(self, config: EngineConfig, spec: LoraSpec, tensors: dict, threads: int,
                 cores: list[int] | None) -> None:
        if cores:  # a local cluster: one replica per core set, so replicas never share a core
            os.sched_setaffinity(0, cores)
        import torch

        torch.set_num_threads(threads)  # before vLLM's CPU worker makes it a no-op
        from .engine import VllmEngine

        self.engine = VllmEngine(config, LoraAdapter(spec, tensors))

    def pid(self) -> int:
        return os.getpid()

    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def write_variants(self, writes: list[tuple[int, float]]) -> None:
        self.engine.write_variants(writes)

    def score(self, requests: list[Request], variants: list[int | None]) -> np.ndarray:
        return self.engine.score(requests, variants)

    def generate(self, contexts: list, max_tokens: int, variants: list[int | None]) -> list[list[str]]:
        return self.engine.generate(contexts, max_tokens, variants)

    def apply_update(self, update: Update) -> None:
        self.engine.apply_update(update)

    def master(self) -> dict:
        return self.engine.master()

    def load_master(self, spec: LoraSpec, tensors: dict) -> None:
        self.engine.load_master(LoraAdapter(spec, tensors))


class ReplicatedEngine:
    """`replicas` engines on Ray (a loopback-only local cluster by default, or the one at
    `address`), used by the trainer like one engine. `wire` counts the pickled bytes sent to and
    received from the replicas (what a step costs on the network)."""

    def __init__(self, config: EngineConfig, adapter: LoraAdapter, replicas: int,
                 address: str | None = None) -> None:
        cores = sorted(os.sched_getaffinity(0))
        # never fewer CPUs than replicas, or the last ones would wait for ever
        ray, self._own_cluster = connect_ray(address, num_cpus=max(len(cores), replicas))
        self._ray = ray
        cpus = int(ray.cluster_resources().get("CPU", 0))
        if cpus < replicas:
            raise ConfigError(f"--replicas {replicas}: the Ray cluster at {address or 'this machine'} has {cpus} CPUs, "
                              "one per replica is needed")
        threads = max(1, cpus // replicas)
        gpus = config.tensor_parallel_size * config.pipeline_parallel_size
        options: dict[str, Any] = {"num_cpus": threads, "max_restarts": 0}
        if ray.cluster_resources().get("GPU", 0):
            options["num_gpus"] = gpus
        actor = ray.remote(_Replica).options(**options)
        local = address is None and len(cores) >= replicas
        per = max(1, len(cores) // replicas)
        self.pids: list[int | str] = ["?"] * replicas
        self.replicas = [
            actor.remote(config, adapter.spec, adapter.tensors, threads,
                         cores[k * per:(k + 1) * per] if local else None)
            for k in range(replicas)
        ]
        self.pids = self._gather([a.pid.remote() for a in self.replicas], "start-up")
        self.tokenizer = self._gather([self.replicas[0].tokenizer.remote()], "start-up")[0]
        self.max_model_len = config.max_model_len
        self.wire = {"sent": 0, "received": 0}

    def _gather(self, refs: list[Any], what: str, replicas: Sequence[int] | None = None) -> list[Any]:
        """Every replica's answer, or a ReplicaError naming the first replica that died or failed."""
        ray, out = self._ray, []
        for k, ref in zip(replicas if replicas is not None else range(len(refs)), refs):
            name = f"replica {k} of {len(self.replicas)} (Ray actor, pid {self.pids[k]})"
            try:
                out.append(ray.get(ref))
            except ray.exceptions.RayActorError as e:
                raise ReplicaError(f"{name} died during {what}: its process is gone "
                                   f"({type(e).__name__}; killed, or out of memory?)") from e
            except ray.exceptions.RayTaskError as e:
                cause = e.cause if getattr(e, "cause", None) is not None else e
                first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
                raise ReplicaError(f"{name} failed during {what}: {type(cause).__name__}: {first}") from e
        return out

    def _broadcast(self, method: str, *args: Any) -> list[Any]:
        self.wire["sent"] += _wire_size(args) * len(self.replicas)
        return self._gather([getattr(a, method).remote(*args) for a in self.replicas], method)

    def write_variants(self, writes: Sequence[tuple[int, float]]) -> None:
        self._broadcast("write_variants", list(writes))

    def apply_update(self, update: Update) -> None:
        self._broadcast("apply_update", update)

    def score(self, requests: Sequence[Request], variants: Sequence[int | None]) -> np.ndarray:
        """Each replica scores its shard (whole examples); the column sums come back in request
        order, as from one engine."""
        shards = [(k, s) for k, s in enumerate(shard_requests(requests, len(self.replicas))) if s]
        refs = []
        for k, indices in shards:
            args = ([requests[i] for i in indices], list(variants))
            self.wire["sent"] += _wire_size(args)
            refs.append(self.replicas[k].score.remote(*args))
        parts = self._gather(refs, "score", [k for k, _ in shards])
        first = np.cumsum([0] + [len(r.targets) for r in requests])
        out = np.empty((len(variants), first[-1]), dtype=np.float64)
        for (_, indices), part in zip(shards, parts):
            self.wire["received"] += _wire_size(part)
            out[:, [c for i in indices for c in range(first[i], first[i + 1])]] = part
        return out

    def generate(self, contexts: Sequence[Sequence[int]], max_tokens: int,
                 variants: Sequence[int | None]) -> list[list[str]]:
        """Greedy answers [variant][context], each replica answering a contiguous share."""
        shares = [list(c) for c in np.array_split(np.arange(len(contexts)), len(self.replicas)) if len(c)]
        refs = []
        for k, indices in enumerate(shares):
            args = ([list(contexts[i]) for i in indices], max_tokens, list(variants))
            self.wire["sent"] += _wire_size(args)
            refs.append(self.replicas[k].generate.remote(*args))
        parts = self._gather(refs, "generate", list(range(len(shares))))
        self.wire["received"] += sum(_wire_size(part) for part in parts)
        return [[text for part in parts for text in part[v]] for v in range(len(variants))]

    def master(self) -> dict:
        tensors = self._gather([self.replicas[0].master.remote()], "master")[0]
        self.wire["received"] += _wire_size(tensors)
        return tensors

    def load_master(self, adapter: LoraAdapter) -> None:
        self._broadcast("load_master", adapter.spec, adapter.tensors)

    def close(self) -> None:
        """End the replicas (and the local Ray cluster this engine started, if any)."""
        for a in self.replicas:
            self._ray.kill(a)
        self.replicas = []
        if self._own_cluster:
            self._ray.shutdown()
