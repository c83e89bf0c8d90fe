"""``tuneforge eval``: measure one model (and others beside it) on held-out data and write ``eval.json``.

The flow, top to bottom:

1. settings: :class:`EvalSettings`, from ``--config FILE`` (YAML, the same keys) and the command line, checked
   like a run config (unknown key, wrong type, value out of range: one message naming the key);
2. plan: every file is read and validated, every user metric imported, every model argument resolved and the
   output path chosen *before* any model loads, so a bad row or a typo fails in seconds;
3. each model in turn (the evaluated one, then each ``--compare``): loaded with its own template, measured, freed;
4. the judge (``--judge``), a reward model, scores both models' answers to the same prompts: the win rate;
5. ``eval.json`` (schema ``tuneforge.eval/1``, see ``docs/evaluation.md``) and a table on standard output, models
   as columns.

Every metric is defined in ``docs/evaluation.md``; the numerics live in ``eval.metrics`` (text metrics),
``eval.heldout`` (loss, implicit reward), ``rewards.scoring`` (reward models) and ``rewards.functions`` (user metrics).
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import importlib.util
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch
import yaml

from tuneforge.config import DataConfig, _build, read_yaml_mapping
from tuneforge.data.formats import Conversation, Message
from tuneforge.data.dataset import DataReport
from tuneforge.data.memory import recorded
from tuneforge.data.preference import PreferenceRow, load_preference_rows
from tuneforge.errors import ConfigError, DataError, UserError
from tuneforge.rewards.functions import RewardFunctions, load_callable
from tuneforge.eval.heldout import HeldoutData, HeldoutRow, heldout_loss, implicit_reward_margins, read_heldout
from tuneforge.eval.environment import environment
from tuneforge.eval.metrics import compile_pattern
from tuneforge.eval.intervals import format_interval
from tuneforge.eval.predictions import (JUDGE_SCORE, answer_scores, mean_scores, pair_scores, prediction_records,
                                        refusal_scores, row_pattern as _pattern, row_scores, score_intervals,
                                        win_outcomes, write_report)
from tuneforge.engine.step import pick_device
from tuneforge.models.card import refresh_run_card
from tuneforge.models.loading import ModelSource, resolve_model
from tuneforge.paths import EVAL_CONFIG_PATHS, resolve_paths
from tuneforge.recipes.registry import methods

SCHEMA = "tuneforge.eval/1"
# Built-in metric names, as they appear in eval.json; --metrics picks among them (plus user metrics, `spec:fn`).
REFERENCE_METRICS = ("exact_match", "contains", "token_f1", "rouge_l")
METRICS = ("loss", "perplexity", *REFERENCE_METRICS, "regex_match", "stopped_rate", "mean_response_words",
           "refusal_rate_harmful", "refusal_rate_benign", "preference_accuracy", "preference_margin", "win_rate")
# The metrics that need answers to the --data prompts (samples are filled from those answers when there are any).
ANSWER_METRICS = {*REFERENCE_METRICS, "regex_match", "stopped_rate", "mean_response_words", "win_rate"}
_COMPUTED_TOGETHER = ({"loss", "perplexity"}, {"preference_accuracy", "preference_margin"})
DEFAULT_BETA = 0.1
# Two reward-model scores this close are a tie: a response scored in two batches of different padding can differ
# in the last bits of float32.
TIE_TOLERANCE = 1e-6
USER_PREFIX = "user:"


# ---------------------------------------------------------------------------------------------------- settings
@dataclass
class EvalSettings:
    """What to evaluate and how; ``tuneforge eval --config FILE`` reads these keys from YAML, and each command-line
    flag of the same name (``-`` for ``_``) overrides its key.

    Attributes:
        model: the model to evaluate: a run directory, a Hugging Face folder, a ``.gguf`` file, ``default`` or a
            hub id (the positional argument).
        compare: more models, each its own column (``--compare A B``).
        labels: column names, the evaluated model first (default: each run directory's or file's name).
        data: held-out rows: SFT rows (messages, prompt/completion, alpaca, sharegpt: the last assistant message
            is the reference) or prompt-only rows (``prompt``). Optional fields: ``answer`` (short answer for
            ``contains``), ``pattern`` (regular expression for ``regex_match``).
        pairs: preference pairs (prompt/chosen/rejected, or HH-style chosen/rejected) for preference accuracy.
        harmful / benign: prompt-only files for the refusal rates (``examples/data/*_prompts.jsonl`` ship).
        metrics: names from ``METRICS`` and user metrics (``module:function`` or ``path/to/file.py:function``);
            empty: every metric the given files allow.
        judge: a reward model that judges the evaluated model against the first ``compare`` one (win rate).
        beta: the implicit reward's beta; None takes the run's ``dpo.beta`` (``kto.beta``), else 0.1.
        max_new_tokens / temperature / top_p: generation; temperature 0 is greedy (deterministic).
        seed: seeds sampling when temperature > 0 (reset before each model).
        batch_size: rows per forward pass or ``generate`` call.
        max_length: longest sequence for the loss and the implicit reward; longer rows are dropped and counted.
        template: template override (default: a run's own, else the tokenizer's).
        system_prompt: system message added to rows that have none.
        dtype: weight dtype for loading.
        limit: use only the first N rows of each file.
        samples: prompts stored in eval.json with every model's answer, for side-by-side reading.
        lm_eval: lm-evaluation-harness tasks (needs ``tuneforge.eval.lmeval``); lm_eval_limit: examples per task.
        out: where eval.json goes (default: RUN_DIR/eval.json for a run directory, else ./eval.json). An
            existing file is renamed to eval.N.json (the smallest free N), never overwritten.
    """

    model: str = ""
    compare: list = field(default_factory=list)
    labels: list = field(default_factory=list)
    data: Optional[str] = None
    pairs: Optional[str] = None
    harmful: Optional[str] = None
    benign: Optional[str] = None
    metrics: list = field(default_factory=list)
    judge: Optional[str] = None
    beta: Optional[float] = None
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 8
    max_length: int = 1024
    template: Optional[str] = None
    system_prompt: Optional[str] = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    limit: Optional[int] = None
    samples: int = 5
    lm_eval: list = field(default_factory=list)
    lm_eval_limit: Optional[int] = None
    out: Optional[str] = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


_LIST_KEYS = ("compare", "labels", "metrics", "lm_eval")
# (low, high) inclusive bounds; None is open.
_RANGES = {"max_new_tokens": (1, None), "temperature": (0.0, None), "top_p": (1e-6, 1.0), "batch_size": (1, None),
           "max_length": (2, None), "limit": (1, None), "samples": (0, None), "lm_eval_limit": (1, None),
           "beta": (1e-12, None)}


def load_settings(path: str | Path | None = None, overrides: dict | None = None) -> EvalSettings:
    """Settings from a YAML file of :class:`EvalSettings` keys (paths in it are relative to the file, by the rule
    of ``tuneforge.paths``: ``default`` and hub ids stay as written), with
    ``overrides`` (command-line values; None values are ignored) on top. Raises :class:`ConfigError` naming
    the file and the key."""
    values: dict = {}
    where = ""
    if path is not None:
        path, where = Path(path), f"{path}: "
        values = read_yaml_mapping(path, "eval config file",
                                   "an eval config is a mapping of keys (model, data, metrics, ...)")
        values = resolve_paths(values, path.parent, EVAL_CONFIG_PATHS)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    for key in _LIST_KEYS:  # a single string is a one-item list; "a,b" is two items
        if isinstance(values.get(key), str):
            values[key] = [values[key]]
    try:
        settings = _build(EvalSettings, values, "")
        for key in _LIST_KEYS:
            items = getattr(settings, key)
            if not all(isinstance(item, str) and item.strip() for item in items):
                raise ConfigError(f"{key}: expected a list of non-empty strings, got {items!r}")
            setattr(settings, key, [part.strip() for item in items for part in _split(key, item)])
        for key in _RANGES:
            _check_range(key, getattr(settings, key))
    except ConfigError as error:
        raise ConfigError(where + str(error)) from None
    if not settings.model:
        raise ConfigError("no model to evaluate: give MODEL_OR_RUN (or `model:` in --config)")
    return settings


def _split(key: str, item: str) -> list[str]:
    # Commas separate names; a user metric's file path could hold a comma, but model paths never split.
    return item.split(",") if key in ("metrics", "lm_eval") else [item]


def _check_range(key: str, value) -> None:
    low, high = _RANGES[key]
    if value is None:
        return
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = " and ".join(part for part in (f">= {low}" if low is not None else "",
                                                f"<= {high}" if high is not None else "") if part)
        raise ConfigError(f"{key}: {value!r} is out of range (must be {bounds})")


# -------------------------------------------------------------------------------------------------------- plan
@dataclass
class ModelEntry:
    """One column: its label, the argument it came from and what it resolved to."""

    label: str
    spec: str
    source: ModelSource

    @property
    def kind(self) -> str:
        return "run" if self.source.run is not None else "model"



def is_reward_model(source: ModelSource) -> bool:
    """A reward-model run, or a model folder whose config names a sequence-classification architecture."""
    if source.is_reward_model:
        return True
    config = Path(source.base) / "config.json"
    if source.run is not None or not config.is_file():
        return False
    architectures = json.loads(config.read_text()).get("architectures") or []
    return any(name.endswith("ForSequenceClassification") for name in architectures)


@dataclass
class EvalPlan:
    """Everything validated before a model loads."""

    settings: EvalSettings
    models: list[ModelEntry]
    metrics: set[str]
    user_metrics: RewardFunctions | None
    heldout: HeldoutData | None
    pairs: list[PreferenceRow]
    harmful: list[HeldoutRow]
    benign: list[HeldoutRow]
    out: Path
    data_config: DataConfig


def plan_eval(settings: EvalSettings) -> EvalPlan:
    """Read and validate every input (see the module docstring, step 2); raises :class:`UserError`."""
    data_config = DataConfig(train=settings.data or "", max_length=settings.max_length,
                             system_prompt=settings.system_prompt, on_truncation="drop")
    limit = settings.limit
    heldout = read_heldout(settings.data, data_config) if settings.data else None
    if heldout is not None and limit:
        heldout.conversations, heldout.rows = heldout.conversations[:limit], heldout.rows[:limit]
    check_patterns(heldout.rows if heldout else [])
    pairs = load_preference_rows(settings.pairs, data_config, DataReport())[:limit] if settings.pairs else []
    harmful, benign = (_prompts(path, data_config, limit) for path in (settings.harmful, settings.benign))
    if not (heldout or pairs or harmful or benign or settings.lm_eval):
        raise UserError("nothing to evaluate: give --data, --pairs, --harmful, --benign or --lm-eval")
    user_specs = [m for m in settings.metrics if ":" in m]
    metrics = _select_metrics([m for m in settings.metrics if ":" not in m], settings, heldout, pairs, harmful,
                              benign)
    if user_specs and not (heldout and heldout.rows):
        raise UserError(f"user metric {user_specs[0]!r} scores answers to prompts: give --data with prompts")
    user_metrics = RewardFunctions({_user_key(spec, user_specs): load_callable(spec) for spec in user_specs}) \
        if user_specs else None
    if settings.lm_eval and not lm_eval_available():
        raise UserError("--lm-eval needs tuneforge.eval.lmeval (the lm-evaluation-harness bridge), which this "
                        "installation does not have; update tuneforge or drop --lm-eval")
    specs = [settings.model, *settings.compare]
    if len(settings.labels) > len(specs):
        raise UserError(f"{len(settings.labels)} labels for {len(specs)} models; give at most one label per model")
    sources = [resolve_model(spec) for spec in specs]
    labels = _labels(specs, settings.labels)
    models = [ModelEntry(label, spec, source) for label, spec, source in zip(labels, specs, sources)]
    if settings.judge and not is_reward_model(resolve_model(settings.judge)):
        raise UserError(f"--judge {settings.judge} is not a reward model (a method: reward run, or a folder with a "
                        "*ForSequenceClassification model); train one with method: reward")
    out = Path(settings.out) if settings.out else (Path(settings.model) / "eval.json" if models[0].kind == "run"
                                                   else Path("eval.json"))
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name such as {out / 'eval.json'}")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: folder {out.parent} does not exist")
    return EvalPlan(settings, models, metrics, user_metrics, heldout, pairs, harmful, benign, out, data_config)


def lm_eval_available() -> bool:
    """Whether lm-evaluation-harness (extra ``[lmeval]``) and its bridge ``tuneforge.eval.lmeval`` are installed
    (checked without importing them: lm-eval is heavy), so ``--lm-eval`` fails before any model is measured."""
    return all(importlib.util.find_spec(name) is not None for name in ("lm_eval", "tuneforge.eval.lmeval"))


def _prompts(path: str | None, data: DataConfig, limit: int | None) -> list[HeldoutRow]:
    if not path:
        return []
    rows = read_heldout(path, data).rows[:limit]
    if not rows:
        raise UserError(f"{path}: no prompts (rows need a prompt, or a user message before an assistant one)")
    return rows


def _select_metrics(names: list[str], settings: EvalSettings, heldout: HeldoutData | None,
                    pairs: list, harmful: list, benign: list) -> set[str]:
    """The built-in metrics to compute: those named (each must have its input), else all the inputs allow."""
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise UserError(f"unknown metric {unknown[0]!r}; choose from {', '.join(METRICS)}, or a user metric "
                        "'module:function' / 'path/to/file.py:function'")
    rows = heldout.rows if heldout else []
    with_reference = any(r.reference is not None for r in rows)
    needs = {"loss": ("--data with responses", bool(heldout and heldout.conversations)),
             "regex_match": ("--data rows with a 'pattern' field", any(_pattern(r) is not None for r in rows)),
             "stopped_rate": ("--data with prompts", bool(rows)),
             "mean_response_words": ("--data with prompts", bool(rows)),
             "refusal_rate_harmful": ("--harmful", bool(harmful)), "refusal_rate_benign": ("--benign", bool(benign)),
             "preference_accuracy": ("--pairs", bool(pairs)),
             "win_rate": ("--judge, --compare and --data with prompts",
                          bool(settings.judge and settings.compare and rows))}
    needs["perplexity"] = needs["loss"]
    needs["preference_margin"] = needs["preference_accuracy"]
    for name in REFERENCE_METRICS:
        needs[name] = ("--data rows with a reference response", with_reference)
    if settings.judge and not needs["win_rate"][1]:
        raise UserError(f"--judge scores the win rate, which needs {needs['win_rate'][0]}")
    for name in names:
        if not needs[name][1]:
            raise UserError(f"metric {name} needs {needs[name][0]}")
    # Any --metrics (built-in or user) is an explicit selection; none means every metric the inputs allow.
    chosen = set(names) if settings.metrics else {name for name, (_, available) in needs.items() if available}
    if settings.judge:
        chosen.add("win_rate")
    for together in _COMPUTED_TOGETHER:  # one computation gives both: report both
        if chosen & together:
            chosen |= together
    return chosen


def _user_key(spec: str, specs: list[str]) -> str:
    """``user:<function>``, or ``user:<spec>`` when two specs name functions alike."""
    name = spec.rpartition(":")[2]
    same = [s for s in specs if s.rpartition(":")[2] == name]
    if specs.count(spec) > 1:
        raise UserError(f"user metric {spec!r} is listed twice")
    return USER_PREFIX + (name if len(same) == 1 else spec)


def _labels(specs: list[str], given: list[str]) -> list[str]:
    """Given labels first, then each model's folder or file name; made unique with -2, -3 ..."""
    labels: list[str] = []
    for index, spec in enumerate(specs):
        label = given[index] if index < len(given) else (Path(spec).name or spec)
        if label in labels:
            if index < len(given):
                raise UserError(f"label {label!r} is given twice; labels name columns and must be unique")
            label = next(f"{label}-{n}" for n in range(2, len(specs) + 2) if f"{label}-{n}" not in labels)
        labels.append(label)
    return labels


# ---------------------------------------------------------------------------------------------- measurements
@dataclass
class ModelResult:
    """What one model produced: its metrics, its answers to the --data prompts (``texts``: to the --harmful and
    --benign ones), each row's scores by file (``data``, ``harmful``, ``benign``, ``pairs``; None for a row left
    out; see ``eval.predictions``), the loss's row count, and its template's name."""

    metrics: dict[str, float]
    answers: list[str] = field(default_factory=list)
    template: str | None = None
    notes: list[str] = field(default_factory=list)
    lm_eval: dict | None = None
    texts: dict[str, list[str]] = field(default_factory=dict)
    scores: dict[str, list] = field(default_factory=dict)
    sizes: dict[str, dict] = field(default_factory=dict)


def evaluate_model(entry: ModelEntry, plan: EvalPlan, log: Callable[[str], None]) -> ModelResult:
    """Load one model, take every selected measurement, free it."""
    from tuneforge.rewards.scoring import RewardScorer
    from tuneforge.generation import Generator

    settings = plan.settings
    if is_reward_model(entry.source):
        result = ModelResult({}, notes=[f"{entry.label} is a reward model: only preference accuracy applies"])
        if plan.pairs and "preference_accuracy" in plan.metrics:
            scorer = RewardScorer.load(entry.spec, settings.template, settings.dtype, settings.max_length)
            _score_pairs(result, reward_model_margins(scorer, plan.pairs, settings.batch_size))
            result.template = scorer.template.name
        return result
    generator = Generator.load(entry.spec, settings.template, settings.dtype)
    result = ModelResult({}, template=generator.template.name)
    heldout = plan.heldout
    if "loss" in plan.metrics:
        log(f"{entry.label}: loss on {len(heldout.conversations)} held-out responses")
        loss = heldout_loss(generator, heldout.conversations, plan.data_config, settings.batch_size)
        result.metrics.update(loss=loss["loss"], perplexity=loss["perplexity"])
        result.sizes = dict.fromkeys(("loss", "perplexity"), {"n": len(heldout.conversations) - loss["dropped"]})
        if loss["dropped"]:
            result.notes.append(f"{entry.label}: {loss['dropped']} held-out row(s) whose response would be "
                                f"truncated away at max_length {settings.max_length} left out of the loss")
    if heldout is not None and heldout.rows and (plan.metrics & ANSWER_METRICS or plan.user_metrics):
        log(f"{entry.label}: answering {len(heldout.rows)} held-out prompts")
        generations = _generate(generator, heldout.rows, settings)
        result.answers = [g.text for g in generations]
        result.scores["data"] = answer_scores(heldout.rows, generations, plan.metrics, plan.user_metrics,
                                              generator.template)
        result.metrics.update(mean_scores(result.scores["data"]))
    for name, rows in (("harmful", plan.harmful), ("benign", plan.benign)):
        if rows and f"refusal_rate_{name}" in plan.metrics:
            log(f"{entry.label}: answering {len(rows)} {name} prompts")
            result.texts[name] = [g.text for g in _generate(generator, rows, settings)]
            result.scores[name] = refusal_scores(name, result.texts[name])
            result.metrics.update(mean_scores(result.scores[name]))
    if plan.pairs and "preference_accuracy" in plan.metrics:
        _implicit_accuracy(entry, generator, plan, result, log)
    del generator
    _free_memory()
    return result


def _generate(generator, rows: Sequence[HeldoutRow], settings: EvalSettings) -> list:
    # Reset before each call: the same settings give the same answers whatever was evaluated before.
    torch.manual_seed(settings.seed)
    return generator.generate_responses([row.prompt for row in rows], max_new_tokens=settings.max_new_tokens,
                                        temperature=settings.temperature, top_p=settings.top_p,
                                        batch_size=settings.batch_size, progress="answers")


def generation_metrics(rows: Sequence[HeldoutRow], generations: Sequence, metrics: set[str]) -> dict[str, float]:
    """The selected text and behaviour metrics of ``generations`` (``generation.Generation``, one per row).

    Reference metrics are means over the rows with a reference; ``contains`` checks the row's ``answer`` when it
    has one, else the reference; ``regex_match`` is the mean over the rows with a ``pattern``; ``stopped_rate``
    and ``mean_response_words`` are means over every row: the means of ``eval.predictions.row_scores``.
    """
    return mean_scores(row_scores(rows, generations, metrics))


def check_patterns(rows: Sequence[HeldoutRow]) -> None:
    """Every ``pattern`` compiles (a bad one is named with its file and row before any model loads)."""
    for row in rows:
        pattern = _pattern(row)
        if pattern is not None:
            try:
                compile_pattern(pattern)
            except UserError as error:
                raise DataError(row.source, row.number, "pattern", str(error), "bad_pattern") from None


def answer_metrics(rows: Sequence[HeldoutRow], generations: Sequence, metrics: set[str],
                   user_metrics: RewardFunctions | None, template) -> dict[str, float]:
    """The selected built-in metrics of the answers (:func:`generation_metrics`) and the mean of each user metric,
    called with the prompt as ``template`` renders it, the answer and the row (``eval.predictions.answer_scores``
    gives each row's values)."""
    return mean_scores(answer_scores(rows, generations, metrics, user_metrics, template))


def user_metric_means(functions: RewardFunctions, prompts: Sequence[str], responses: Sequence[str],
                      rows: Sequence[dict]) -> dict[str, float]:
    """Mean of each user metric ``fn(prompt, response, row)`` over the rows (the GRPO reward interface; each value
    checked to be a finite number)."""
    scores = functions.score_batch(prompts, responses, rows)
    return {name: sum(s.scores[name] for s in scores) / len(scores) for name in functions.functions}


def _score_pairs(result: ModelResult, margins: Sequence[float | None]) -> None:
    """Preference accuracy (the fraction of pairs with margin > 0: a tie is not ranked right) and mean margin,
    from each pair's margin (None: left out), kept per pair too."""
    if all(margin is None for margin in margins):
        raise UserError("no preference pair left to score (every pair longer than max_length?)")
    result.scores["pairs"] = pair_scores(margins)
    result.metrics.update(mean_scores(result.scores["pairs"]))


def reward_model_margins(scorer, pairs: Sequence[PreferenceRow], batch_size: int) -> list[float]:
    """score(prompt + chosen) - score(prompt + rejected) of each pair under a reward model."""
    conversations = [Conversation(p.prompt + side, p.source, p.row) for p in pairs for side in (p.chosen, p.rejected)]
    scores = scorer.score(conversations, batch_size=batch_size, progress="reward-model scores")
    return [chosen - rejected for chosen, rejected in zip(scores[0::2], scores[1::2])]


def _implicit_accuracy(entry: ModelEntry, generator, plan: EvalPlan, result: ModelResult, log) -> None:
    """Preference accuracy by DPO's implicit reward against the model's reference: a LoRA run's adapter-disabled
    model, a full run's starting model; a plain model has none (left out, with a note)."""
    from tuneforge.generation.generator import load_for_inference
    from tuneforge.models.adapters import is_peft

    run = entry.source.run
    if run is None:
        result.notes.append(f"{entry.label}: preference accuracy needs a reference; {entry.spec} is not a run "
                            "directory (the implicit reward of a model against itself is 0 for every pair)")
        return
    reference = None
    if not is_peft(generator.model):
        log(f"{entry.label}: loading the reference {run['base_model']}")
        reference, _ = load_for_inference(resolve_model(run["base_model"]), plan.settings.dtype)
    beta = plan.settings.beta or run_beta(Path(entry.spec))
    method = run.get("method", "sft")
    section = implicit_reward_section(method)
    source = "--beta" if plan.settings.beta else f"{section}.beta" if section else "the default"
    result.notes.append(f"{entry.label}: implicit reward beta {beta:g} ({source})"
                        + ("" if section else f"; a {method} run was not trained on this reward, "
                           "so its preference accuracy is a measurement against its reference, not its objective"))
    log(f"{entry.label}: implicit reward (beta {beta:g}) on {len(plan.pairs)} pairs")
    margins = implicit_reward_margins(generator, plan.pairs, plan.data_config, beta, reference,
                                      plan.settings.batch_size)
    if None in margins:
        result.notes.append(f"{entry.label}: {margins.count(None)} pair(s) whose response would be truncated "
                            f"away at max_length {plan.settings.max_length} left out of preference accuracy")
    _score_pairs(result, margins)


def implicit_reward_section(method) -> str | None:
    """The config key of ``method``'s section when the method trains the implicit reward beta log(pi / pi_ref)
    (an offline method against a reference: DPO, KTO), else None (also for a method this version does not know)."""
    spec = methods().get(method) if isinstance(method, str) else None
    return spec.section if spec is not None and spec.reference and not spec.online else None


def run_beta(run_dir: Path) -> float:
    """The beta a run trained its implicit reward with (``dpo.beta`` or ``kto.beta`` in its config.yaml), else
    ``DEFAULT_BETA``."""
    path = run_dir / "config.yaml"
    values = yaml.safe_load(path.read_text()) if path.is_file() else None
    section = implicit_reward_section(values.get("method")) if isinstance(values, dict) else None
    if section is None:
        return DEFAULT_BETA
    return float((values.get(section) or {}).get("beta", DEFAULT_BETA))


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------- win rate
def count_wins(scores_a: Sequence[float], scores_b: Sequence[float], answers_a: Sequence[str],
               answers_b: Sequence[str], tolerance: float = TIE_TOLERANCE) -> dict[str, float]:
    """Wins, losses and ties of A over B, prompt by prompt: a tie when both answers are the same text or their
    scores differ by at most ``tolerance``; rate = (wins + ties / 2) / prompts (``predictions.win_outcomes``)."""
    outcomes = win_outcomes(scores_a, scores_b, answers_a, answers_b, tolerance)
    wins, ties = outcomes.count(1.0), outcomes.count(0.5)
    return {"wins": wins, "losses": len(outcomes) - wins - ties, "ties": ties, "rate": sum(outcomes) / len(outcomes)}


def judge_win_rate(plan: EvalPlan, results: dict[str, ModelResult], log) -> dict:
    """The judge scores the evaluated model's and the first ``--compare`` model's answers to the --data prompts."""
    from tuneforge.rewards.scoring import RewardScorer

    settings = plan.settings
    a, b = plan.models[0].label, plan.models[1].label
    for label in (a, b):
        if not results[label].answers:
            raise UserError(f"win rate: {label} gave no answers (a reward model cannot be judged on its answers)")
    log(f"judge {settings.judge}: scoring {len(plan.heldout.rows)} answers of {a} and of {b}")
    scorer = RewardScorer.load(settings.judge, dtype=settings.dtype, max_length=settings.max_length)
    prompts = [row.prompt for row in plan.heldout.rows]
    scores = {label: scorer.score([Conversation(p + [Message("assistant", answer)])
                                   for p, answer in zip(prompts, results[label].answers)], settings.batch_size,
                                  progress=f"judging {label}")
              for label in (a, b)}
    del scorer
    _free_memory()
    outcomes = win_outcomes(scores[a], scores[b], results[a].answers, results[b].answers, TIE_TOLERANCE)
    for label in (a, b):  # per row, for predictions.jsonl and the interval: each judge score, A's outcome
        for index, row in enumerate(results[label].scores["data"]):
            row.update({JUDGE_SCORE: scores[label][index], **({"win_rate": outcomes[index]} if label == a else {})})
    counts = count_wins(scores[a], scores[b], results[a].answers, results[b].answers)
    return {"judge": settings.judge, "a": a, "b": b, **counts}


# ---------------------------------------------------------------------------------------------------- the run
def run_eval(settings: EvalSettings, log: Callable[[str], None] = lambda message: None) -> tuple[dict, Path]:
    """Plan, measure every model, judge, write eval.json and predictions.jsonl. Returns (the eval.json object, its
    path)."""
    plan = plan_eval(settings)
    results: dict[str, ModelResult] = {}
    for entry in plan.models:
        log(f"== {entry.label}: {entry.spec}")
        results[entry.label] = evaluate_model(entry, plan, log)
        if settings.lm_eval:
            from tuneforge.eval.lmeval import run_lm_eval

            log(f"{entry.label}: lm-eval {', '.join(settings.lm_eval)}")
            results[entry.label].lm_eval = run_lm_eval(entry.spec, list(settings.lm_eval),
                                                       limit=settings.lm_eval_limit, batch_size=settings.batch_size,
                                                       device=str(pick_device()))
    win_rate = judge_win_rate(plan, results, log) if "win_rate" in plan.metrics else None
    report = build_report(plan, results, win_rate)
    sets = {"data": plan.heldout.rows if plan.heldout else [], "harmful": plan.harmful, "benign": plan.benign,
            "pairs": plan.pairs}
    out = write_report(report, plan.out, prediction_records(sets, results))
    refresh_run_card(out.parent)  # a run directory's README.md now shows this evaluation (models.card)
    return report, out


def build_report(plan: EvalPlan, results: dict[str, ModelResult], win_rate: dict | None) -> dict:
    """The eval.json object (schema ``tuneforge.eval/1``; optional keys of the contract are absent or null)."""
    settings = plan.settings
    first = results[plan.models[0].label]
    sample_rows = (plan.heldout.rows if plan.heldout else [])[:settings.samples]
    return {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "data": {"generation": recorded(settings.data), "pairs": recorded(settings.pairs),
                 "harmful": recorded(settings.harmful), "benign": recorded(settings.benign)},
        "settings": {"max_new_tokens": settings.max_new_tokens, "greedy": settings.greedy,
                     "template": settings.template or first.template, "batch_size": settings.batch_size,
                     "seed": settings.seed, "temperature": settings.temperature, "top_p": settings.top_p,
                     "max_length": settings.max_length, "limit": settings.limit, "beta": settings.beta},
        "models": [{"label": m.label, "source": m.spec, "kind": m.kind, "template": results[m.label].template}
                   for m in plan.models],
        "metrics": {label: result.metrics for label, result in results.items()},
        "win_rate": win_rate,
        "samples": [{"prompt": row.question, "reference": row.reference,
                     "responses": {label: r.answers[i] for label, r in results.items() if r.answers}}
                    for i, row in enumerate(sample_rows) if any(r.answers for r in results.values())],
        "lm_eval": {label: r.lm_eval for label, r in results.items()} if settings.lm_eval else None,
        "notes": [note for r in results.values() for note in r.notes],
        # Sample size and 95% interval of each metric (eval.intervals), beside the values above.
        "intervals": {label: {**r.sizes, **score_intervals(r.scores)} for label, r in results.items()},
        "environment": environment(),
    }


# ------------------------------------------------------------------------------------------------------- table
_ORDER = tuple(name for name in METRICS if name != "win_rate")  # the win rate has a line of its own


def format_table(report: dict) -> str:
    """Metrics as rows (lm-eval scores last), models as columns, each value with its 95% interval and sample size
    where eval.json has them; then a line for the win rate."""
    labels = [m["label"] for m in report["models"]]
    metrics, intervals = report["metrics"], report.get("intervals") or {}
    names = [n for n in _ORDER if any(n in metrics[label] for label in labels)]
    names += sorted({n for label in labels for n in metrics[label] if n not in _ORDER})
    rows = [(name, [metrics[label].get(name) for label in labels]) for name in names]
    cells = [(name, [_cell(v) + ("" if v is None else format_interval((intervals.get(label) or {}).get(name)))
                     for v, label in zip(values, labels)]) for name, values in rows]
    lm_eval = {label: tasks or {} for label, tasks in (report.get("lm_eval") or {}).items()}
    scored = dict.fromkeys((task, metric) for tasks in lm_eval.values() for task, values in tasks.items()
                           for metric in values)
    cells += [(f"lm_eval {task}/{metric}", [_cell(lm_eval.get(label, {}).get(task, {}).get(metric))
                                            for label in labels]) for task, metric in scored]
    first = max([len("metric"), *(len(name) for name, _ in cells)])
    widths = [2 + max([len(label), *(len(texts[i]) for _, texts in cells)]) for i, label in enumerate(labels)]
    lines = ["metric".ljust(first) + "".join(label.rjust(w) for label, w in zip(labels, widths))]
    for name, texts in cells:
        lines.append(name.ljust(first) + "".join(text.rjust(w) for text, w in zip(texts, widths)))
    win = report.get("win_rate")
    if win:
        interval = format_interval((intervals.get(win["a"]) or {}).get("win_rate"))
        lines.append(f"win rate of {win['a']} over {win['b']} (judge {win['judge']}): {win['wins']} wins, "
                     f"{win['losses']} losses, {win['ties']} ties, rate {win['rate']:.3f}{interval}")
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.4g}" if abs(value) >= 1000 else f"{value:.3f}"
    return str(value)


def settings_from_args(args) -> EvalSettings:
    """:class:`EvalSettings` from ``tuneforge eval``'s parsed arguments (flags named like the keys)."""
    names = [f.name for f in dataclasses.fields(EvalSettings)]
    overrides = {name: getattr(args, name) for name in names if getattr(args, name, None) not in (None, [])}
    return load_settings(args.config, overrides)


def main(args) -> int:
    """``tuneforge eval``: progress on standard error, the table on standard output."""
    settings = settings_from_args(args)
    report, out = run_eval(settings, log=lambda message: print(message, file=sys.stderr, flush=True))
    print(format_table(report))
    for note in report["notes"]:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {out}", file=sys.stderr)
    return 0
