"""The trainable state: a LoRA adapter kept as an fp32 master copy, in PEFT's format.

MeZO never stores a perturbation: z is a pure function of (seed, tensor name), so any process
holding the master copy (a vLLM worker, a data-parallel replica, the reference engine) can
regenerate the same z for its own tensors, and only seeds and scalars need to travel.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
ALL_LINEAR = "all-linear"


class AdapterError(Exception):
    """An adapter folder or target list that cannot be used; the message says why."""


@dataclass(frozen=True)
class LoraSpec:
    """What PEFT's LoraConfig says about the adapter's shape (PEFT defaults otherwise)."""

    r: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


@dataclass(frozen=True)
class LowRank:
    """A low-rank direction (LOZO): per matrix z = U·Vᵀ/√rank, U [out, rank] drawn from
    `u_seed`, V [in, rank] from `v_seed`, so entries have unit variance like the dense z.
    A tensor that is not a matrix gets the dense z of `u_seed`."""

    u_seed: int
    v_seed: int
    rank: int


@dataclass(frozen=True)
class Masked:
    """`direction`'s z on part of the adapter only, 0 elsewhere, so only that part moves.

    `sparsity` (Sparse-MeZO): that share of each tensor's entries is left out, the mask drawn
    from the direction's seed and the tensor name like z itself, so every holder of θ draws the
    same one and a step's ± variants and its update share it. The kept entries keep unit
    variance (ε means what it means for a dense z); the expected step is then (1 − sparsity)
    times ZO-SGD's, over an effective dimension that many times smaller, so a larger lr fits.
    `b_only`: the A matrices get no z, so A stays at its seeded initialisation."""

    direction: int | LowRank
    sparsity: float = 0.0
    b_only: bool = False


Direction = int | LowRank | Masked  # an int seed is a dense Gaussian direction


@dataclass(frozen=True)
class Update:
    """θ ← (1 − decay)·θ + Σ coeff·z(direction): every update rule reduces to seeds and scalars."""

    terms: tuple[tuple[Direction, float], ...]
    decay: float = 0.0


def peft_key(module: str, matrix: str) -> str:
    """PEFT's name of a module's LoRA matrix ("A" or "B") in adapter_model.safetensors."""
    return f"{_PEFT_PREFIX}{module}.lora_{matrix}.weight"


def noise_seed(seed: int, name: str) -> int:
    """A per-tensor seed that depends on the name, not on the order tensors are visited in."""
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _masked_noise(direction: Masked, name: str, shape: torch.Size) -> torch.Tensor:
    if direction.b_only and name.endswith(".lora_A.weight"):
        return torch.zeros(shape, dtype=torch.float32)
    z = noise(direction.direction, name, shape)
    if not direction.sparsity:
        return z
    base = direction.direction.u_seed if isinstance(direction.direction, LowRank) else direction.direction
    generator = torch.Generator().manual_seed(noise_seed(base, f"sparse-mask:{name}"))
    kept = torch.rand(shape, generator=generator) >= direction.sparsity
    return torch.where(kept, z, torch.zeros((), dtype=z.dtype))


def noise(seed: Direction, name: str, shape: torch.Size) -> torch.Tensor:
    if isinstance(seed, Masked):
        return _masked_noise(seed, name, shape)
    if isinstance(seed, LowRank):
        if len(shape) != 2:
            return noise(seed.u_seed, name, shape)
        u = noise(seed.u_seed, name, torch.Size([shape[0], seed.rank]))
        v = noise(seed.v_seed, name, torch.Size([shape[1], seed.rank]))
        return (u @ v.T) * (seed.rank ** -0.5)
    generator = torch.Generator().manual_seed(noise_seed(seed, name))
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def model_linear_shapes(model_dir: str | Path) -> dict[str, tuple[int, int]]:
    """Module name → (out, in) of every 2-D `.weight` inside the decoder layers.

    Read from the safetensors headers, so no weights are loaded and any HF architecture works.
    """
    shapes: dict[str, tuple[int, int]] = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if not key.endswith(".weight") or ".layers." not in key:
                    continue
                shape = f.get_slice(key).get_shape()
                if len(shape) == 2:
                    shapes[key[: -len(".weight")]] = (int(shape[0]), int(shape[1]))
    return shapes


def resolve_targets(targets: Iterable[str], shapes: dict[str, tuple[int, int]]) -> tuple[str, ...]:
    """PEFT's suffix matching of target names (or `all-linear`) against the model's modules."""
    names = list(targets)
    suffixes = {m.rsplit(".", 1)[-1] for m in shapes}
    if names == [ALL_LINEAR]:
        return tuple(sorted(suffixes))
    missing = [t for t in names if t not in suffixes]
    if missing:
        raise AdapterError(
            f"target modules {missing} not in the model (it has: {', '.join(sorted(suffixes))})"
        )
    return tuple(names)


class LoraAdapter:
    """fp32 master tensors keyed by PEFT's names (`base_model.model.<module>.lora_A.weight`)."""

    def __init__(self, spec: LoraSpec, tensors: dict[str, torch.Tensor]):
        self.spec = spec
        self.tensors = tensors

    @classmethod
    def init(cls, spec: LoraSpec, shapes: dict[str, tuple[int, int]], seed: int) -> "LoraAdapter":
        """PEFT's default initialisation: A ~ kaiming-uniform(a=√5), B = 0, so θ₀ is the base model."""
        tensors: dict[str, torch.Tensor] = {}
        for module in sorted(m for m in shapes if m.rsplit(".", 1)[-1] in spec.targets):
            out_f, in_f = shapes[module]
            bound = 1.0 / math.sqrt(in_f)
            g = torch.Generator().manual_seed(noise_seed(seed, module))
            a = torch.empty(spec.r, in_f).uniform_(-bound, bound, generator=g)
            tensors[peft_key(module, "A")] = a
            tensors[peft_key(module, "B")] = torch.zeros(out_f, spec.r)
        if not tensors:
            raise AdapterError(f"no module of the model matches targets {list(spec.targets)}")
        return cls(spec, tensors)

    def modules(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Module name (as the model names it) → (A, B)."""
        out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        suffix = ".lora_A.weight"
        for key, a in self.tensors.items():
            if key.endswith(suffix):
                module = key[len(_PEFT_PREFIX) : -len(suffix)]
                out[module] = (a, self.tensors[peft_key(module, "B")])
        return out

    def variants(self, writes: Sequence[tuple[Direction, float]]) -> list[dict[str, torch.Tensor]]:
        """θ + scale·z(seed) for each (seed, scale); z is generated once per seed, so the ± pair
        of a MeZO step costs one draw, not two."""
        out: list[dict[str, torch.Tensor]] = [{} for _ in writes]
        for key, t in self.tensors.items():
            drawn: dict[int, torch.Tensor] = {}
            for variant, (seed, scale) in zip(out, writes):
                if scale == 0.0:
                    variant[key] = t
                    continue
                if seed not in drawn:
                    drawn[seed] = noise(seed, key, t.shape)
                variant[key] = t + scale * drawn[seed]
        return out

    def apply(self, update: Update) -> None:
        for key, t in self.tensors.items():
            if update.decay:
                t.mul_(1.0 - update.decay)
            for seed, coeff in update.terms:
                if coeff:
                    t.add_(noise(seed, key, t.shape), alpha=coeff)

    def copy(self) -> "LoraAdapter":
        return LoraAdapter(self.spec, {k: v.clone() for k, v in self.tensors.items()})

    def num_params(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    def save(self, folder: str | Path, base_model: str) -> None:
        """PEFT's on-disk format, so PEFT, transformers and vLLM load it as any other adapter."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": self.spec.r,
            "lora_alpha": self.spec.alpha,
            "target_modules": list(self.spec.targets),
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": True,
            "init_lora_weights": True,
            "modules_to_save": None,
            "use_rslora": False,
            "use_dora": False,
        }
        (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(folder / ADAPTER_WEIGHTS))
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):  # safetensors writes 0600: a server run
            (folder / name).chmod(0o644)  # by another user must read the adapter

    @classmethod
    def load(cls, folder: str | Path) -> "LoraAdapter":
        folder = Path(folder)
        config_path, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
        if not config_path.is_file():
            raise AdapterError(f"{folder}: no {ADAPTER_CONFIG}")
        if not weights_path.is_file():
            pickled = [p.name for p in folder.glob("*.bin")]
            why = f" (pickled {pickled[0]} is refused: convert it to safetensors)" if pickled else ""
            raise AdapterError(f"{folder}: no {ADAPTER_WEIGHTS}{why}")
        try:
            config = json.loads(config_path.read_text())
            targets = config["target_modules"]
            spec = LoraSpec(
                r=int(config["r"]),
                alpha=float(config["lora_alpha"]),
                targets=(targets,) if isinstance(targets, str) else tuple(targets),
            )
        except (ValueError, KeyError, TypeError) as e:
            raise AdapterError(f"{config_path}: not a PEFT LoRA config ({e})") from e
        tensors = {k: v.float() for k, v in load_file(str(weights_path)).items()}
        return cls(spec, tensors)


def expected_shapes(spec: LoraSpec, shapes: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """PEFT name → shape of every LoRA matrix an adapter of `spec` has on a model of `shapes`."""
    out: dict[str, tuple[int, int]] = {}
    for module in sorted(m for m in shapes if m.rsplit(".", 1)[-1] in spec.targets):
        out_f, in_f = shapes[module]
        out[peft_key(module, "A")], out[peft_key(module, "B")] = (spec.r, in_f), (out_f, spec.r)
    return out


def init_from(folder: str | Path, spec: LoraSpec, shapes: dict[str, tuple[int, int]]) -> LoraAdapter:
    """An existing PEFT LoRA adapter as a run's starting point, refused unless it has exactly
    the run's matrices (targets, rank, the model's shapes). Its scale (α/r, rsLoRA's α/√r) is
    folded into B for the run's α, so it starts by computing what it computed before."""
    loaded = LoraAdapter.load(folder)
    config = json.loads((Path(folder) / ADAPTER_CONFIG).read_text())
    if config.get("use_dora"):
        raise AdapterError(f"{folder}: a DoRA adapter (use_dora): only plain LoRA can be tuned")
    if loaded.spec.r != spec.r:
        raise AdapterError(f"{folder}: rank {loaded.spec.r}, the run's --rank is {spec.r}")
    want = expected_shapes(spec, shapes)
    missing = sorted(set(want) - set(loaded.tensors))
    if missing:
        raise AdapterError(f"{folder}: no {missing[0]} (the run's --targets {','.join(spec.targets)}; "
                           f"its target_modules: {','.join(loaded.spec.targets)})")
    extra = sorted(set(loaded.tensors) - set(want))
    if extra:
        raise AdapterError(f"{folder}: {extra[0]} is not a LoRA matrix of the run's --targets {','.join(spec.targets)}")
    for key, shape in want.items():
        if tuple(loaded.tensors[key].shape) != shape:
            raise AdapterError(f"{folder}: {key} has shape {list(loaded.tensors[key].shape)}, the model needs "
                               f"{list(shape)} (another base model?)")
    scale = loaded.spec.alpha / (math.sqrt(spec.r) if config.get("use_rslora") else spec.r)
    factor = scale / spec.scaling
    return LoraAdapter(spec, {k: v * factor if ".lora_B." in k else v for k, v in loaded.tensors.items()})
