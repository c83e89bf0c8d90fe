"""The run directory: refused if it exists (unless overwrite), and what a finished run leaves in it.

Layout::

    RUN_DIR/config.yaml          resolved config
    RUN_DIR/tuneforge_run.json   method, kind (lora | full), base model, template
    RUN_DIR/adapter/             PEFT adapter (LoRA runs)      | RUN_DIR/model/  full model (full runs)
    RUN_DIR/tokenizer/           tokenizer (LoRA runs; full runs keep it in model/)
    RUN_DIR/metrics.jsonl        one line per logging step
    RUN_DIR/data_report.json     rows kept, dropped by reason, truncated, tokens
    RUN_DIR/README.md            model card (models/card.py), rewritten after summary.json and tuneforge eval
    RUN_DIR/.tuneforge.lock      while a run trains: its pid and host (engine/lock.py)

A run directory whose run never completed a step (a failed start: a logger that could not start, a crash
before the first step) holds nothing worth keeping; a new run replaces it without overwrite.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tuneforge.config import RunConfig, save_config
from tuneforge.engine.lock import LOCK_FILE
from tuneforge.engine.metrics import read_metrics
from tuneforge.errors import UserError, option
from tuneforge.models.card import write_run_card
from tuneforge.models.loading import RUN_MARKER
from tuneforge.models.merge import save_tokenizer


def _contents(path: Path) -> list[Path]:
    """What a run directory holds besides the lock of the run now starting in it."""
    return [item for item in path.iterdir() if item.name != LOCK_FILE]


def completed_a_step(path: Path) -> bool:
    """Whether the tuneforge run directory ``path`` records a trained step: a finished-run marker, a summary, any
    checkpoint folder (even a partial one), or a metrics record of step 1 or later (an unreadable metrics file
    counts as one: when unsure, keep the directory)."""
    checkpoints = path / "checkpoints"
    if (path / RUN_MARKER).exists() or (path / "summary.json").exists():
        return True
    if checkpoints.exists() and (not checkpoints.is_dir() or any(checkpoints.iterdir())):
        return True
    metrics = path / "metrics.jsonl"
    if not metrics.exists():
        return False
    try:
        return any(not isinstance(record, dict) or record.get("step", 0) >= 1 for record in read_metrics(metrics))
    except (UserError, OSError, TypeError):
        return True


def check_run_dir(path: str | Path, overwrite: bool, log=None) -> None:
    """Raise if ``path`` may not become this run's directory; deletes nothing (call it before heavy work).

    A tuneforge run directory whose run never completed a step may be replaced without ``overwrite`` (``log`` says
    so); one that did, only with it. The lock file of the run now starting does not count as content.
    """
    path = Path(path)
    if path.exists() and (not path.is_dir() or _contents(path)):
        tuneforge = path.is_dir() and ((path / RUN_MARKER).exists() or (path / "config.yaml").exists())
        if not overwrite and tuneforge and not completed_a_step(path):
            if log is not None:
                log(f"replacing {path}: the leftovers of a run that never completed a step")
            return
        if not overwrite:
            raise UserError(f"run directory {path} already exists; choose another train.output_dir or pass "
                            f"{option('overwrite')} to replace it")
        if not tuneforge:
            # Never delete something tuneforge did not make, even with --overwrite.
            raise UserError(f"{path} exists and is not a tuneforge run directory; refusing to overwrite it")


def prepare_run_dir(path: str | Path, overwrite: bool) -> Path:
    """Create an empty run directory; an existing non-empty one is kept unless ``overwrite`` (or its run never
    completed a step). The lock file of the run now starting stays, so the directory is never unlocked."""
    path = Path(path)
    check_run_dir(path, overwrite)
    if path.is_dir():
        for item in _contents(path):
            if item.is_dir() and not item.is_symlink():
                shutil.rmtree(item)
            else:
                item.unlink()
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
        save_tokenizer(tokenizer, path / "tokenizer", template)
    else:
        model.save_pretrained(path / "model", **extra)
        save_tokenizer(tokenizer, path / "model", template)
    base = config.model.name_or_path
    if Path(base).expanduser().exists():
        # A local base must still be found when the run is used from another working directory.
        base = str(Path(base).expanduser().resolve())
    marker = {"method": config.method, "kind": "lora" if lora else "full", "base_model": base,
              "template": template.to_dict()}
    (path / RUN_MARKER).write_text(json.dumps(marker, indent=2))
    write_run_card(path)  # after the marker: the card reads it, and a card is never what makes a run complete
