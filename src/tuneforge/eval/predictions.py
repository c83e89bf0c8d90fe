"""Every row of an evaluation, scored: each row's value of each metric (``eval.json``'s metrics are their means),
the 95% intervals built from them, and ``predictions.jsonl``, written beside ``eval.json``.

A row's value of a metric is its contribution to the mean: 0 or 1 for a rate (``exact_match``, ``contains``,
``regex_match``, ``stopped_rate``, ``refusal_rate_*``, ``preference_accuracy``, ``win_rate`` with 0.5 for a tie),
the score for ``token_f1``, ``rouge_l``, ``preference_margin`` and user metrics, the word count for
``mean_response_words``. A metric is absent from a row it does not apply to (no reference, no ``pattern``, a pair
dropped for length). The loss has no per-row value (it is a ratio over all response tokens).

predictions.jsonl has one JSON object per row of each file (``docs/evaluation.md`` shows the layout), with every
model's answer and scores keyed by its label. It pairs with its eval file by name (:func:`predictions_path`):
eval.json with predictions.jsonl, and when an earlier eval.json is moved aside to eval.N.json, its
predictions.jsonl moves to predictions.N.jsonl with it. Nothing is ever overwritten.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from tuneforge.errors import UserError
from tuneforge.eval.intervals import TOKEN_RATIOS, metric_interval
from tuneforge.eval.metrics import score_each

# eval.json's names of the built-in answer metrics, in table order; the first three are eval.metrics' "f1" etc.
_SCORE_NAMES = {"exact_match": "exact_match", "token_f1": "f1", "rouge_l": "rouge_l"}
ROW_ORDER = ("exact_match", "contains", "token_f1", "rouge_l", "regex_match", "stopped_rate", "mean_response_words")
# Per-row values that are not a metric of their own: the judge's score of each answer (the win rate compares them).
JUDGE_SCORE = "judge_score"


# ------------------------------------------------------------------------------------------------ per-row scores
def row_pattern(row) -> str | None:
    """The row's ``pattern`` field (for ``regex_match``), None when absent or empty."""
    value = row.fields.get("pattern")
    return None if value in (None, "") else str(value)


def row_scores(rows: Sequence, generations: Sequence, metrics: set[str]) -> list[dict[str, float]]:
    """Each row's value of the selected built-in answer metrics (``HeldoutRow`` and ``generation.Generation``, one
    of each per row): reference metrics on rows with a reference (``contains`` checks the row's ``answer`` when it
    has one, else the reference), ``regex_match`` on rows with a ``pattern``, ``stopped_rate`` and
    ``mean_response_words`` on every row."""
    texts = [g.text for g in generations]
    out: list[dict[str, float]] = [{} for _ in rows]

    def fill(indices: list[int], values: dict[str, list[float]], names: Mapping[str, str]) -> None:
        for name, score_name in names.items():
            for index, value in zip(indices, values[score_name]):
                out[index][name] = value

    referenced = [i for i, row in enumerate(rows) if row.reference is not None]
    wanted = {name: score for name, score in _SCORE_NAMES.items() if name in metrics}
    if referenced and wanted:
        fill(referenced, score_each([texts[i] for i in referenced], [rows[i].reference for i in referenced],
                                    metrics=list(wanted.values())), wanted)
    if referenced and "contains" in metrics:
        fill(referenced, score_each([texts[i] for i in referenced], [rows[i].short_answer() for i in referenced],
                                    metrics=["contains"]), {"contains": "contains"})
    patterned = [i for i, row in enumerate(rows) if row_pattern(row) is not None]
    if patterned and "regex_match" in metrics:
        fill(patterned, score_each([texts[i] for i in patterned], patterns=[row_pattern(rows[i]) for i in patterned],
                                   metrics=["regex"]), {"regex_match": "regex"})
    if texts and "stopped_rate" in metrics:
        fill(list(range(len(texts))), {"stopped": [float(g.stopped) for g in generations]},
             {"stopped_rate": "stopped"})
    if texts and "mean_response_words" in metrics:
        fill(list(range(len(texts))), score_each(texts, metrics=["mean_length"]),
             {"mean_response_words": "mean_length"})
    return [{name: scores[name] for name in ROW_ORDER if name in scores} for scores in out]


def answer_scores(rows: Sequence, generations: Sequence, metrics: set[str], user_metrics, template) -> list[dict]:
    """:func:`row_scores` plus each user metric ``fn(prompt, response, row)``, with the prompt as ``template``
    renders it (``user_metrics``: an ``rewards.functions.RewardFunctions`` or None)."""
    scores = row_scores(rows, generations, metrics)
    if user_metrics is not None and rows:
        prompts = [template.prompt_text(row.prompt) for row in rows]
        users = user_metrics.score_batch(prompts, [g.text for g in generations], [row.fields for row in rows])
        for row_score, user in zip(scores, users):
            row_score.update({name: user.scores[name] for name in user_metrics.functions})
    return scores


def mean_scores(scores: Sequence[dict | None]) -> dict[str, float]:
    """The mean of each metric over the rows that have it (rows in order, metrics in first-seen order)."""
    names = list(dict.fromkeys(name for row in scores if row for name in row if name != JUDGE_SCORE))
    means = {}
    for name in names:
        values = [row[name] for row in scores if row and name in row]
        means[name] = sum(values) / len(values)
    return means


def refusal_scores(kind: str, answers: Sequence[str]) -> list[dict[str, float]]:
    """``refusal_rate_<kind>`` of each answer to the ``--harmful`` or ``--benign`` prompts (1.0: a refusal)."""
    return [{f"refusal_rate_{kind}": value} for value in score_each(answers, metrics=["refusal_rate"])["refusal_rate"]]


def pair_scores(margins: Sequence[float | None]) -> list[dict[str, float] | None]:
    """``preference_accuracy`` (1.0 when the margin is strictly positive: a tie is not ranked right) and
    ``preference_margin`` of each pair; None for a pair left out (its margin None)."""
    return [None if margin is None else {"preference_accuracy": float(margin > 0), "preference_margin": margin}
            for margin in margins]


def win_outcomes(scores_a: Sequence[float], scores_b: Sequence[float], answers_a: Sequence[str],
                 answers_b: Sequence[str], tolerance: float) -> list[float]:
    """Per prompt, 1.0 when A's answer scores higher than B's, 0.0 when lower, 0.5 for a tie: both answers the
    same text, or their scores at most ``tolerance`` apart."""
    if not len(scores_a) == len(scores_b) == len(answers_a) == len(answers_b) or not scores_a:
        raise ValueError(f"{len(scores_a)}, {len(scores_b)} scores and {len(answers_a)}, {len(answers_b)} answers")
    return [0.5 if text_a == text_b or abs(a - b) <= tolerance else float(a > b)
            for a, b, text_a, text_b in zip(scores_a, scores_b, answers_a, answers_b)]


def score_intervals(scores: Mapping[str, Sequence[dict | None]]) -> dict[str, dict]:
    """``{metric: {"n", "ci95", "method"}}`` (``intervals.metric_interval``) from per-row scores keyed by file
    (``data``, ``harmful``, ``benign``, ``pairs``)."""
    values: dict[str, list[float]] = {}
    for rows in scores.values():
        for row in rows:
            for name, value in (row or {}).items():
                if name != JUDGE_SCORE and name not in TOKEN_RATIOS:
                    values.setdefault(name, []).append(value)
    return {name: metric_interval(name, row_values) for name, row_values in values.items()}


# ------------------------------------------------------------------------------------------------ the records
def _text(messages) -> str:
    return "\n".join(message.content for message in messages)


def prediction_records(sets: Mapping[str, Sequence], results: Mapping) -> list[dict]:
    """One record per row of each file, in file order: ``sets`` maps ``data``/``harmful``/``benign`` to their
    ``HeldoutRow`` lists and ``pairs`` to ``PreferenceRow`` ones; ``results`` maps each label to its
    ``evaluate.ModelResult`` (``answers``: the --data answers, ``texts``: the others, ``scores``: per-row scores by
    file). A model that gave no answer or score for a row is absent from that row's ``responses`` / ``scores``;
    a file no model was scored on (``--data`` read for the loss alone) has no records."""
    records = []
    for kind, rows in sets.items():
        if not any(result.scores.get(kind) for result in results.values()):
            continue
        texts = {label: result.answers if kind == "data" else result.texts.get(kind, [])
                 for label, result in results.items()}
        scores = {label: result.scores.get(kind, []) for label, result in results.items()}
        for index, row in enumerate(rows):
            if kind == "pairs":
                record = {"set": kind, "source": row.source, "row": row.row,
                          "prompt": next((m.content for m in reversed(row.prompt) if m.role == "user"), ""),
                          "chosen": _text(row.chosen), "rejected": _text(row.rejected)}
            else:
                record = {"set": kind, "source": row.source, "row": row.number, "prompt": row.question}
                if kind == "data":
                    record["reference"] = row.reference
                    record.update({key: row.fields[key] for key in ("answer", "pattern")
                                   if row.fields.get(key) not in (None, "")})
                record["responses"] = {label: answers[index] for label, answers in texts.items()
                                       if index < len(answers)}
            record["scores"] = {label: values[index] for label, values in scores.items()
                                if index < len(values) and values[index] is not None}
            records.append(record)
    return records


# ------------------------------------------------------------------------------------------------ files
_DEFAULT_EVAL = re.compile(r"eval((?:\.\d+)?)\.json")


def predictions_path(eval_path: str | Path) -> Path:
    """The predictions file of an eval file: eval.json -> predictions.jsonl, eval.N.json -> predictions.N.jsonl,
    any other NAME.json -> NAME.predictions.jsonl, in the same folder."""
    eval_path = Path(eval_path)
    match = _DEFAULT_EVAL.fullmatch(eval_path.name)
    if match:
        return eval_path.with_name(f"predictions{match.group(1)}.jsonl")
    return eval_path.with_name(f"{eval_path.stem}.predictions.jsonl")


def _aside(out: Path) -> Path:
    """eval.N.json for the smallest N where neither it nor its predictions file exists."""
    number = 1
    while True:
        candidate = out.with_name(f"{out.stem}.{number}{out.suffix}")
        if not candidate.exists() and not predictions_path(candidate).exists():
            return candidate
        number += 1


def write_report(report: dict, out: Path, predictions: Sequence[dict] | None = None) -> Path:
    """Write eval.json and, when ``predictions`` has rows, its predictions file, each atomically (a temporary
    name renamed). An existing eval file and its predictions file are first renamed together to eval.N.json and
    predictions.N.jsonl (the smallest N free for both), so an earlier evaluation is never overwritten and never
    paired with the new one's rows."""
    out = Path(out)
    rows_out = predictions_path(out)
    staged = [(out.with_name(f".{out.name}.tmp"), out)]
    staged[0][0].write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if predictions:
        staging = rows_out.with_name(f".{rows_out.name}.tmp")
        staging.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in predictions),
                           encoding="utf-8")
        staged.insert(0, (staging, rows_out))  # the rows first: a reader of the new eval.json finds them there
    if out.exists() or rows_out.exists():
        aside = _aside(out)
        for current, moved in ((out, aside), (rows_out, predictions_path(aside))):
            if current.exists():
                current.rename(moved)
    for staging, final in staged:
        os.replace(staging, final)
    return out


def read_predictions(path: str | Path) -> list[dict] | None:
    """The records of a predictions file, or None when there is none; a line that is not a JSON object is an
    error naming the file and the line."""
    path = Path(path)
    if not path.is_file():
        return None
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"{path}, line {number}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("scores", {}), dict):
                raise UserError(f"{path}, line {number}: expected an object with 'set', 'prompt' and 'scores' "
                                "(model label -> metric -> value)")
            records.append(record)
    return records
