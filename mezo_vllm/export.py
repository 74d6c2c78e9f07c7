"""Merging an adapter into its base model, for serving without LoRA."""

from __future__ import annotations

import json
from pathlib import Path

from .model import resolve_model
from .rundir import write_whole


def merge_adapter(adapter_dir: Path, dest: Path) -> None:
    """PEFT's own merge (W + s·BA), saved as safetensors beside the base model's tokenizer.

    Written whole or not at all (`rundir.write_whole`), so a failed merge leaves nothing behind.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    base_dir = resolve_model(base)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()

    def write(folder: Path) -> None:
        merged.save_pretrained(folder, safe_serialization=True)
        AutoTokenizer.from_pretrained(base_dir).save_pretrained(folder)

    write_whole(dest, write)
