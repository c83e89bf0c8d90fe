"""Metrics: one JSON object per logging step appended to ``RUN_DIR/metrics.jsonl``, and a progress bar."""

from __future__ import annotations

import json
import sys
from pathlib import Path


class MetricsLog:
    """Appends records to ``metrics.jsonl`` and shows a progress bar when stderr is a terminal."""

    def __init__(self, path: str | Path | None, total_steps: int, show_progress: bool | None = None):
        self.path = Path(path) if path is not None else None
        self.bar = None
        if show_progress is None:
            show_progress = sys.stderr.isatty()
        if show_progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True)

    def log(self, record: dict) -> None:
        if self.path is not None:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
        if self.bar is not None and "loss" in record:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
