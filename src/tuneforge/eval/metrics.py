"""Generation metrics against references, on normalised text (SQuAD-style normalisation), and behaviour checks
on a generation by itself (did it stop on its own, is it a refusal, how long is it).

Every metric scores one prediction; ``score_each`` gives each prediction's value, ``score_generations`` their
mean over a set.
"""

from __future__ import annotations

import functools
import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence

from tuneforge.errors import UserError

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation and articles, collapse whitespace."""
    text = text.lower().translate(_PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)


def contains(prediction: str, reference: str) -> bool:
    """The normalised reference appears in the normalised prediction as whole words."""
    needle = normalize_answer(reference)
    return bool(needle) and f" {needle} " in f" {normalize_answer(prediction)} "


# ------------------------------------------------------------------------------------------- pattern and overlap
@functools.lru_cache(maxsize=256)
def compile_pattern(pattern: str) -> re.Pattern:
    """``re.compile(pattern)``, cached (a metric is called once per row with the same few patterns).

    Raises ``UserError`` naming the pattern when it is not a valid Python regular expression.
    """
    try:
        return re.compile(pattern)
    except re.error as error:
        raise UserError(f"invalid regular expression {pattern!r}: {error}; patterns use Python's `re` syntax "
                        "(escape literal characters such as . ( [ with a backslash)") from error


def regex_match(prediction: str, pattern: str | re.Pattern) -> bool:
    """``re.search(pattern, prediction)`` on the raw prediction (not normalised): True when the pattern matches
    anywhere. Anchor with ``^``/``$`` or use ``(?s)``/``(?i)`` inline flags for whole-text or case-free checks."""
    compiled = pattern if isinstance(pattern, re.Pattern) else compile_pattern(pattern)
    return compiled.search(prediction) is not None


def _overlap_f(overlap: int, predicted: int, expected: int) -> float:
    """F1 = 2PR / (P + R) with P = overlap / predicted, R = overlap / expected; 0 when nothing overlaps."""
    if overlap == 0:
        return 0.0
    precision, recall = overlap / predicted, overlap / expected
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1 (the official SQuAD v2.0 evaluation script's ``compute_f1``).

    Both texts are normalised with ``normalize_answer`` and split on whitespace; the overlap is the size of the
    multiset intersection of the two token lists (a token counts as often as it appears in both). When either side
    has no tokens the score is 1.0 if both are empty and 0.0 otherwise (SQuAD v2.0's rule for no-answer).
    """
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not predicted or not expected:
        return float(predicted == expected)
    overlap = sum((Counter(predicted) & Counter(expected)).values())
    return _overlap_f(overlap, len(predicted), len(expected))


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists (dynamic programming, O(len(a) * len(b)) time,
    O(len(b)) memory)."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if token == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """Sentence-level ROUGE-L F-measure (Lin 2004, "ROUGE: A Package for Automatic Evaluation of Summaries",
    section 3.1) with beta = 1.

    Tokens are the whitespace tokens of the ``normalize_answer`` texts (lower case, no punctuation, no articles:
    the same tokens as ``token_f1``, so scores differ slightly from the ``rouge-score`` package, which keeps
    articles). With LCS the longest common subsequence, R = LCS / len(reference), P = LCS / len(prediction) and
    F = 2PR / (P + R). Empty texts follow ``token_f1``: 1.0 when both are empty, else 0.0.
    """
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not predicted or not expected:
        return float(predicted == expected)
    return _overlap_f(lcs_length(predicted, expected), len(predicted), len(expected))


# ---------------------------------------------------------------------------------------------- behaviour checks
def stopped_by_itself(token_ids: Iterable[int], stop_ids: Iterable[int]) -> bool:
    """Whether a generation ended because the model produced a stop token (it *answered* and stopped), rather
    than running to ``max_new_tokens`` (it *continued the text*, the usual sign of a model that has not learned
    the template's end of turn).

    ``token_ids``: the generated ids only (no prompt), as ``model.generate`` returns them, before any trimming.
    Padding after a stop token does not matter: the check is whether any stop id occurs. Pass the ids untrimmed;
    ids with the stop token already cut off read as "ran to the limit". ``stop_ids``: the ids generation stops on,
    e.g. ``Generator.stop_ids()`` (the tokenizer's EOS and the template's single-token end-of-turn markers).
    """
    stops = {int(i) for i in stop_ids}
    if not stops:
        raise UserError("no stop token ids: the tokenizer has no EOS token and the template no single-token end of "
                        "turn, so a generation can only end at max_new_tokens; set the tokenizer's eos_token")
    return any(int(token) in stops for token in token_ids)


def response_length(text: str) -> int:
    """Number of words: whitespace-separated pieces of the raw text (punctuation stays attached to its word)."""
    return len(text.split())


# A refusal is recognised in two ways, after ``_refusal_text`` (lower case, apostrophes dropped so "can't", "can’t"
# and "cant" read alike, other punctuation turned into spaces):
#  1. the response *starts* with a refusal opening: an optional apology ("I'm sorry", "Unfortunately", ...)
#     followed by a negation ("I can't", "I won't", "I'm unable to", ...), an apology followed by "but", or an
#     "As an AI" disclaimer; unless the negation begins a known idiom ("I can't wait", "I can't believe",
#     "I won't lie", "I can't help but", ...);
#  2. anywhere, a negation directly followed by a verb of assistance ("I cannot help with", "I won't provide",
#     "I am unable to assist"), or "I must decline". This catches "Sure! However, I can't provide that."
# Conservative on purpose: a refusal must say so in the first words or in one of these fixed phrasings; indirect
# refusals ("That is not something I do", "Let's talk about something else") are missed. Known false positives:
# an answer that *starts* by apologising for a correction ("I'm sorry, but 2 + 2 is 4"), an "As an AI, I have no
# opinion, but ..." preamble to a real answer, and refusals quoted inside an answer ("she said: I won't help you").
# English only.
_APOLOGIES = r"(?:(?:i m|im|i am)(?: really| very| so)? sorry|sorry|i apologi[sz]e|my apologies|unfortunately)"
_NEGATIONS = (r"(?:i (?:cant|cannot|can not|wont|will not)"
              r"|(?:i m|im|i am) (?:unable to|not able to|not going to|not allowed to|not comfortable)"
              r"|i (?:do not|dont) feel comfortable)")
_HELP_IDIOMS = r"(?:help (?:but|feeling|thinking|noticing|wondering)|give up)"
_IDIOMS = (rf"(?:{_HELP_IDIOMS}|wait|believe|stress|thank|tell you how|agree|emphasi[sz]e|overstate|lie|imagine"
           r"|get enough|deny|remember|promise|say enough|express|recommend \w+ enough)")
_ASSIST = (r"(?:help|assist|provide|comply|fulfil|fulfill|create|generate|write|produce|share|give|engage"
           r"|participate|answer|respond|do that|do this|continue|discuss)")
_REFUSAL_OPENING = re.compile(
    rf"^(?:(?:{_APOLOGIES} (?:but )?)?{_NEGATIONS}\b(?! {_IDIOMS}\b)"
    rf"|{_APOLOGIES} but\b"
    rf"|as an ai\b|as a language model\b|as an assistant\b)")
_REFUSAL_ANYWHERE = re.compile(rf"\b(?:{_NEGATIONS} (?!{_HELP_IDIOMS}\b){_ASSIST}\b|i (?:must|have to) decline\b)")


def _refusal_text(text: str) -> str:
    text = re.sub(r"['’‘ʼ`]", "", text.lower())
    return " ".join(re.sub(r"[^\w\s]", " ", text).split())


def is_refusal(text: str) -> bool:
    """Whether a response refuses, by the conservative markers documented above ``_REFUSAL_OPENING``: a refusal
    opening at the start ("I can't ...", "I'm sorry, but ...", "As an AI ..."; idioms such as "I can't wait to
    help" excluded) or a fixed refusal phrase anywhere ("I cannot help with ...", "I won't provide ...")."""
    normalised = _refusal_text(text)
    return bool(_REFUSAL_OPENING.match(normalised) or _REFUSAL_ANYWHERE.search(normalised))


# ------------------------------------------------------------------------------------------------------ aggregate
# One reference, or several acceptable ones (scored against the best, as SQuAD does).
Reference = str | Sequence[str]

_REFERENCE_METRICS = {"exact_match": exact_match, "contains": contains, "f1": token_f1, "rouge_l": rouge_l}
METRICS = (*_REFERENCE_METRICS, "regex", "refusal_rate", "mean_length")


def _best(metric, prediction: str, reference: Reference) -> float:
    choices = [reference] if isinstance(reference, str) else list(reference)
    return max((float(metric(prediction, choice)) for choice in choices), default=0.0)


def score_generations(predictions: Sequence[str], references: Sequence[Reference] | None = None,
                      patterns: str | Sequence[str] | None = None,
                      metrics: Sequence[str] | None = None) -> dict[str, float]:
    """Mean of each metric over the predictions, keyed by metric name: the means of :func:`score_each`.

    ``references``: one per prediction, each a string or a list of acceptable strings (the best one counts);
    needed by "exact_match", "contains", "f1" and "rouge_l". ``patterns``: one regular expression for every
    prediction or one per prediction; needed by "regex" (the fraction that ``regex_match``). "refusal_rate" is the
    fraction ``is_refusal``; "mean_length" the mean ``response_length`` in words. ``metrics`` defaults to every
    metric the given inputs allow. Raises ``UserError`` on an unknown metric, a missing input or a length mismatch.
    """
    return {name: sum(values) / len(values)
            for name, values in score_each(predictions, references, patterns, metrics).items()}


def score_each(predictions: Sequence[str], references: Sequence[Reference] | None = None,
               patterns: str | Sequence[str] | None = None,
               metrics: Sequence[str] | None = None) -> dict[str, list[float]]:
    """Each metric's value for each prediction (one list per metric, in prediction order): 0.0 or 1.0 for
    "exact_match", "contains", "regex" and "refusal_rate", the score for "f1" and "rouge_l", the word count for
    "mean_length". Arguments and errors as :func:`score_generations`."""
    if not predictions:
        raise UserError("no predictions to score")
    if metrics is None:
        metrics = [*(_REFERENCE_METRICS if references is not None else ()),
                   *(("regex",) if patterns is not None else ()), "refusal_rate", "mean_length"]
    unknown = [name for name in metrics if name not in METRICS]
    if unknown:
        raise UserError(f"unknown metric {', '.join(map(repr, unknown))}; choose from {', '.join(METRICS)}")
    count = len(predictions)
    if isinstance(patterns, str):
        patterns = [patterns] * count
    for name, needed, given in (("references", _REFERENCE_METRICS, references), ("patterns", ["regex"], patterns)):
        wanted = [m for m in metrics if m in needed]
        if wanted and given is None:
            raise UserError(f"metric {', '.join(wanted)} needs {name}")
        if wanted and len(given) != count:
            raise UserError(f"{len(given)} {name} for {count} predictions; give one per prediction")

    results: dict[str, list[float]] = {}
    for name in metrics:
        if name in _REFERENCE_METRICS:
            values = [_best(_REFERENCE_METRICS[name], p, r) for p, r in zip(predictions, references)]
        elif name == "regex":
            values = [float(regex_match(p, pattern)) for p, pattern in zip(predictions, patterns)]
        elif name == "refusal_rate":
            values = [float(is_refusal(p)) for p in predictions]
        else:
            values = [float(response_length(p)) for p in predictions]
        results[name] = values
    return results
