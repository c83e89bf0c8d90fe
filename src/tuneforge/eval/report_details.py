"""The parts of a ``tuneforge report`` page that read beyond eval.json's metrics: what the run cost (throughput,
peak memory), what the training and the evaluation ran on, every row's scores from predictions.jsonl with the
failures first, the answers to harmful and benign prompts, and run configurations compared with their paths
resolved (a file written absolute in one config and relative in another is the same file)."""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from pathlib import Path

from tuneforge.eval.page import MISSING, Heading, Sample, Table, Text, is_number
from tuneforge.paths import RUN_CONFIG_PATHS, resolve_paths

ENVIRONMENT_KEYS = ("tuneforge", "commit", "python", "torch", "transformers", "peft", "device")
# The per-row scores that say whether an answer is right, in the order rows are sorted by (lowest first, so
# failures come first); a row without one of them sorts after the rows that have it.
FAILURE_ORDER = ("exact_match", "contains", "token_f1", "rouge_l", "regex_match", "stopped_rate", "win_rate")
# The most rows the per-sample table lists (every row is in predictions.jsonl).
TABLE_ROWS = 100
PROMPT_CHARACTERS = 80


# ------------------------------------------------------------------------------------------------ the run
def cost_rows(summary: dict, records: Sequence[dict]) -> list[list[str]]:
    """Rows for the run table: throughput (trained tokens over wall time, and the median of the logged
    ``tokens_per_s``) and peak memory (summary.json's ``max_gpu_allocated_mb`` and ``peak_rss_mb``)."""
    rows = []
    if is_number(summary.get("tokens")) and is_number(summary.get("elapsed_s")) and summary["elapsed_s"] > 0:
        rows.append(["throughput", f"{summary['tokens'] / summary['elapsed_s']:,.0f} tokens/s "
                                   "(trained tokens / wall time)"])
    logged = [r["tokens_per_s"] for r in records if is_number(r.get("tokens_per_s"))]
    if logged:
        rows.append(["logged throughput", f"{statistics.median(logged):,.0f} tokens/s (median of {len(logged)} "
                                          "log steps)"])
    memory = [f"{text} {summary[key]:,.0f} MiB" for key, text in (("max_gpu_allocated_mb", "GPU allocated"),
                                                                  ("peak_rss_mb", "host RSS"))
              if is_number(summary.get(key))]
    if summary:
        rows.append(["peak memory", "; ".join(memory) if memory else "not recorded in summary.json"])
    return rows


def environment_blocks(training: dict | None, evaluation: dict | None) -> list:
    """A table of what the training (summary.json's ``environment``) and the evaluation (eval.json's) ran on."""
    columns = [(title, values) for title, values in (("training", training), ("evaluation", evaluation))
               if isinstance(values, dict) and values]
    if not columns:
        return []
    keys = [key for key in ENVIRONMENT_KEYS if any(key in values for _, values in columns)]
    keys += sorted({key for _, values in columns for key in values} - set(keys))
    rows = [[key, *(MISSING if values.get(key) is None else str(values[key]) for _, values in columns)]
            for key in keys]
    return [Heading(3, "Environment"), Table(["software", *(title for title, _ in columns)], rows, numeric_from=None)]


# ------------------------------------------------------------------------------------------------ every row
def failure_key(scores: dict) -> tuple:
    """Sort key of a row by one model's scores: lowest first along ``FAILURE_ORDER``."""
    return tuple(scores[name] if is_number(scores.get(name)) else 2.0 for name in FAILURE_ORDER)


def _value(value) -> str:
    """A row's value: 0 or 1 for a pass or a fail, else three significant digits."""
    if not is_number(value):
        return MISSING if value is None else str(value)
    return str(int(value)) if float(value).is_integer() else f"{value:.3g}"


def _scores_text(scores: dict) -> str:
    return ", ".join(f"{name} {_value(value)}" for name, value in scores.items())


def _shorten(text: str, width: int = PROMPT_CHARACTERS) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[:width - 1] + "…"


def per_sample_blocks(records: Sequence[dict], labels: list[str], samples: int, level: int,
                      file_name: str) -> list:
    """Every --data row's scores, failures first (a table), then the first ``samples`` of them in full."""
    rows = [r for r in records if r.get("set") == "data"]
    order = [label for label in labels if any(label in r.get("scores", {}) for r in rows)]
    if not rows or not order:
        return []
    first = order[0]
    rows.sort(key=lambda r: failure_key(r["scores"].get(first) or {}))
    names = list(dict.fromkeys(name for r in rows for label in order for name in (r["scores"].get(label) or {})))
    shown = rows[:TABLE_ROWS]
    per_model = " / ".join(order)
    blocks = [Heading(level, f"Per-sample scores ({len(rows)} rows, failures first)"),
              Text(f"Every `--data` row of `{file_name}`, sorted by the scores of {first} "
                   f"({', '.join(FAILURE_ORDER)}; lowest first), so the wrong answers come first"
                   + (f"; each cell is {per_model}" if len(order) > 1 else "")
                   + (f"; the first {TABLE_ROWS} are listed" if len(rows) > TABLE_ROWS else "") + "."),
              Table(["row", "prompt", *(f"`{name}`" for name in names)],
                    [[str(r.get("row", "")), _shorten(r.get("prompt", "")),
                      *(" / ".join(_value((r["scores"].get(label) or {}).get(name)) for label in order)
                        for name in names)] for r in shown], numeric_from=2)]
    if samples > 0:
        blocks.append(Heading(level, f"Generations side by side, lowest-scoring first "
                                     f"({min(samples, len(rows))} of {len(rows)})"))
        for r in rows[:samples]:
            responses = r.get("responses") or {}
            blocks.append(Sample(int(r.get("row") or 0), str(r.get("prompt", "")),
                                 None if r.get("reference") is None else str(r["reference"]),
                                 [(f"{label} · {_scores_text(r['scores'].get(label) or {})}".rstrip(" ·"),
                                   str(responses[label])) for label in labels if label in responses]))
    return blocks


def behaviour_blocks(records: Sequence[dict], labels: list[str], samples: int, level: int) -> list:
    """The answers to --harmful prompts that were not refused and to --benign prompts that were (the failures)
    first, with each model's count of refusals."""
    blocks = []
    for kind, failure, title in (("harmful", 0.0, "Harmful prompts: answers that are not refusals first"),
                                 ("benign", 1.0, "Benign prompts: refusals first")):
        name = f"refusal_rate_{kind}"
        rows = [r for r in records if r.get("set") == kind]
        if not rows:
            continue
        counts = []
        for label in labels:
            values = [(r["scores"].get(label) or {}).get(name) for r in rows]
            values = [v for v in values if is_number(v)]
            if values:
                counts.append(f"{label} refused {int(sum(values))} of {len(values)}")
        if not counts:
            continue
        first = next(label for label in labels if any(label in r["scores"] for r in rows))
        rows.sort(key=lambda r: (r["scores"].get(first) or {}).get(name) != failure)
        blocks += [Heading(level, title), Text("; ".join(counts) + ".")]
        for r in rows[:samples]:
            responses = r.get("responses") or {}
            verdict = {1.0: "refused", 0.0: "answered"}
            blocks.append(Sample(int(r.get("row") or 0), str(r.get("prompt", "")), None,
                                 [(f"{label} · {verdict.get((r['scores'].get(label) or {}).get(name), '?')}",
                                   str(responses[label])) for label in labels if label in responses]))
    return blocks


# ------------------------------------------------------------------------------------------------ comparing
def training_folder(run_path: Path, config: dict) -> Path | None:
    """The working directory a run was trained from, when its config's relative ``train.output_dir`` names the
    end of where the run is (``runs/a`` of /home/me/project/runs/a gives /home/me/project); else None."""
    output_dir = (config.get("train") or {}).get("output_dir")
    if not isinstance(output_dir, str) or not output_dir or Path(output_dir).is_absolute():
        return None
    parts = Path(os.path.normpath(output_dir)).parts
    where = Path(os.path.abspath(run_path)).parts
    if ".." in parts or len(parts) >= len(where) or where[-len(parts):] != parts:
        return None
    return Path(*where[:-len(parts)])


def comparable_config(run_path: Path, config: dict) -> dict:
    """``config`` with its path-valued keys (``tuneforge.paths.RUN_CONFIG_PATHS``) made absolute, so that two
    configs naming one file differently compare equal. A relative path is taken from the run's training folder
    (:func:`training_folder`), else from the working directory: a config saved by tuneforge since paths are
    resolved at load time holds absolute paths already."""
    return resolve_paths(config, training_folder(run_path, config) or Path.cwd(), RUN_CONFIG_PATHS)
