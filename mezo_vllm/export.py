"""Merging an adapter into its base model, for serving without LoRA."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from .model import resolve_model


def merge_adapter(adapter_dir: Path, dest: Path) -> None:
    """PEFT's own merge (W + s·BA), saved as safetensors beside the base model's tokenizer.

    Written to a temporary folder and renamed, so a failed merge leaves nothing half-written.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    base_dir = resolve_model(base)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(base_dir).save_pretrained(tmp)
        tmp.chmod(0o755)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
