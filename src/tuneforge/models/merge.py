"""Merge a LoRA run into its base model and save a plain Hugging Face checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path

from tuneforge.errors import UserError
from tuneforge.models.loading import load_model, load_tokenizer, resolve_model


def merge_run(run_dir: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Load base + adapter, fold W + (alpha/r)·BA into W, save weights and tokenizer (loads with transformers
    alone). Refuses to write into an existing non-empty folder.

    A QLoRA run (base trained in 4 or 8 bits) is merged into the *float* base in ``dtype``: the adapter learned
    to correct the quantized weights, so the merged model is close to, not exactly, what was trained. Merging
    into the quantized weights instead would round the update away.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"{out_dir} exists and is not empty; choose a new output folder")
    source = resolve_model(str(run_dir))
    if source.adapter is None:
        raise UserError(f"{run_dir} is not a LoRA run directory (nothing to merge)")
    if source.quantization is not None:
        logging.getLogger("tuneforge").warning(
            "%s was trained on a %s base; merging into the dequantised (original %s) base, so the merged model is not "
            "exactly the quantized model the adapter was trained on", run_dir, source.quantization.describe(), dtype)
    model = load_model(source, dtype, quantize=False)
    tokenizer = load_tokenizer(source)
    merged = model.merge_and_unload()
    merged.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
