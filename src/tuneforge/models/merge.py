"""Merge a LoRA run into its base model and save a plain Hugging Face checkpoint."""

from __future__ import annotations

from pathlib import Path

from tuneforge.errors import UserError
from tuneforge.models.loading import load_model, load_tokenizer, resolve_model


def merge_run(run_dir: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Load base + adapter, fold W + (alpha/r)·BA into W, save weights and tokenizer (loads with transformers
    alone). Refuses to write into an existing non-empty folder."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"{out_dir} exists and is not empty; choose a new output folder")
    source = resolve_model(str(run_dir))
    if source.adapter is None:
        raise UserError(f"{run_dir} is not a LoRA run directory (nothing to merge)")
    model = load_model(source, dtype)
    tokenizer = load_tokenizer(source)
    merged = model.merge_and_unload()
    merged.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
