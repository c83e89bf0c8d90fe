"""The run directory: refused if it exists (unless overwrite), and what a finished run leaves in it.

Layout::

    RUN_DIR/config.yaml          resolved config
    RUN_DIR/tuneforge_run.json   method, kind (lora | full), base model, template
    RUN_DIR/adapter/             PEFT adapter (LoRA runs)      | RUN_DIR/model/  full model (full runs)
    RUN_DIR/tokenizer/           tokenizer (LoRA runs; full runs keep it in model/)
    RUN_DIR/metrics.jsonl        one line per logging step
    RUN_DIR/data_report.json     rows kept, dropped by reason, truncated, tokens
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tuneforge.config import RunConfig, save_config
from tuneforge.errors import UserError
from tuneforge.models.loading import RUN_MARKER


def check_run_dir(path: str | Path, overwrite: bool) -> None:
    """Raise if ``path`` may not become this run's directory; deletes nothing (call it before heavy work)."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        if not overwrite:
            raise UserError(f"run directory {path} already exists; choose another train.output_dir or pass "
                            "--overwrite to replace it")
        if not path.is_dir() or (not (path / RUN_MARKER).exists() and not (path / "config.yaml").exists()):
            # Never delete something tuneforge did not make, even with --overwrite.
            raise UserError(f"{path} exists and is not a tuneforge run directory; refusing to overwrite it")


def prepare_run_dir(path: str | Path, overwrite: bool) -> Path:
    """Create an empty run directory; an existing non-empty one is kept unless ``overwrite``."""
    path = Path(path)
    check_run_dir(path, overwrite)
    if path.exists() and any(path.iterdir()):
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_run(path: Path, config: RunConfig, model, tokenizer, template, lora: bool,
             state_dict: dict | None = None) -> None:
    """Write the trained weights, tokenizer, template and config; the run marker goes last, so a directory with
    a marker is always complete. ``state_dict`` supplies gathered weights when the model is sharded (FSDP)."""
    save_config(config, path / "config.yaml")
    extra = {"state_dict": state_dict} if state_dict is not None else {}
    if lora:
        model.save_pretrained(path / "adapter", **extra)
        tokenizer.save_pretrained(path / "tokenizer")
    else:
        model.save_pretrained(path / "model", **extra)
        tokenizer.save_pretrained(path / "model")
    base = config.model.name_or_path
    if Path(base).expanduser().exists():
        # A local base must still be found when the run is used from another working directory.
        base = str(Path(base).expanduser().resolve())
    marker = {"method": config.method, "kind": "lora" if lora else "full", "base_model": base,
              "template": template.to_dict()}
    (path / RUN_MARKER).write_text(json.dumps(marker, indent=2))
