"""Reward functions and user metrics: Python callables named in a config as ``"module:function"`` or
``"path/to/file.py:function"``, combined with weights (online RL's reward, ``eval`` and
``eval.generation_metrics``).

The interface (the one GRPO reward functions use) is::

    def reward(prompt: str, response: str, row: dict) -> float

``prompt``: the prompt text as the model saw it; ``response``: the generated text (stop token removed);
``row``: the data row's fields, as read from the file (so a function can read ``row["answer"]`` or any other
column). The return value must be a finite real number (``bool`` counts as 0 or 1; a one-element tensor or numpy
scalar is accepted); higher is better. A function that raises is a bug in that function and keeps its traceback.

Two examples ship here: ``tuneforge.rewards.functions:exact_answer`` and
``tuneforge.rewards.functions:format_regex``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path

from tuneforge.errors import UserError
from tuneforge.eval.metrics import normalize_answer, regex_match

RewardFunction = Callable[[str, str, dict], float]

_SPEC_FORM = "'package.module:function' or 'path/to/file.py:function'"


# ------------------------------------------------------------------------------------------------------- loading
def load_callable(spec: str) -> Callable:
    """The callable named by ``spec``: ``"package.module:function"`` (imported like any module, so it must be on
    ``sys.path``) or ``"path/to/file.py:function"`` (a file, relative to the working directory; its folder is not
    added to ``sys.path``). The name after the colon may be dotted (``"module:Class.method"``).

    Raises ``UserError`` when the spec is malformed, the module or file is not found or fails to import, the
    attribute is missing, or it is not callable.
    """
    source, _, name = spec.rpartition(":")
    if not source or not name or not all(part.isidentifier() for part in name.split(".")):
        raise UserError(f"function {spec!r} must look like {_SPEC_FORM}")
    is_file = source.endswith(".py") or "/" in source or "\\" in source
    module = _import_file(spec, Path(source)) if is_file else _import_module(spec, source)
    target = module
    for part in name.split("."):
        if not hasattr(target, part):
            defined = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
            raise UserError(f"function {spec!r}: {source} has no attribute {name!r}; it defines "
                            f"{', '.join(defined) or 'no public callables'}")
        target = getattr(target, part)
    if not callable(target):
        raise UserError(f"function {spec!r}: {name} in {source} is a {type(target).__name__}, not a function")
    return target


def _import_module(spec: str, source: str):
    try:
        return importlib.import_module(source)
    except ModuleNotFoundError as error:
        if error.name is not None and (source == error.name or source.startswith(error.name + ".")):
            hint = " (for a file, give its path ending in .py)" if "." not in source else ""
            raise UserError(f"function {spec!r}: module {source!r} not found{hint}; check the name and that it is "
                            "installed or on PYTHONPATH") from error
        raise UserError(f"function {spec!r}: importing {source} failed: {error}") from error
    except (ImportError, SyntaxError) as error:
        raise UserError(f"function {spec!r}: importing {source} failed: {error}") from error


def _import_file(spec: str, path: Path):
    if not path.is_file():
        raise UserError(f"function {spec!r}: file {path} not found (relative paths are from {Path.cwd()})")
    resolved = path.resolve()
    # One module per file, under a name derived from its absolute path: loading the same file twice reuses it.
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:12]
    stem = re.sub(r"\W", "_", resolved.stem)
    module_name = f"tuneforge_user_{stem}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    module_spec = importlib.util.spec_from_file_location(module_name, resolved)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except (ImportError, SyntaxError) as error:
        del sys.modules[module_name]
        raise UserError(f"function {spec!r}: importing {path} failed: {error}") from error
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


# ----------------------------------------------------------------------------------------------------- combining
@dataclass
class RewardScore:
    """The score of one response: each function's value by spec, and their weighted sum."""

    scores: dict[str, float]
    total: float


class RewardFunctions:
    """Several reward functions with weights; calling it scores one (prompt, response, row).

    ``total = sum(weight_i * f_i(prompt, response, row))``. Weights default to 1.0 and may be negative (a
    penalty); each must be finite. Each value is checked: a non-number or a non-finite value (nan, inf) is a
    ``UserError`` naming the function.
    """

    def __init__(self, functions: Mapping[str, RewardFunction], weights: Sequence[float] | None = None):
        if not functions:
            raise UserError("no reward functions given")
        self.functions = dict(functions)
        weights = [1.0] * len(self.functions) if weights is None else [float(w) for w in weights]
        if len(weights) != len(self.functions):
            raise UserError(f"{len(weights)} reward weights for {len(self.functions)} reward functions; give one "
                            "weight per function")
        for name, weight in zip(self.functions, weights):
            if not math.isfinite(weight):
                raise UserError(f"reward weight for {name!r} is {weight}; weights must be finite numbers")
        self.weights = dict(zip(self.functions, weights))

    @classmethod
    def load(cls, specs: Sequence[str], weights: Sequence[float] | None = None) -> "RewardFunctions":
        """Load each spec with ``load_callable``; a spec listed twice is an error (weight it instead)."""
        repeated = sorted({s for s in specs if list(specs).count(s) > 1})
        if repeated:
            raise UserError(f"reward function {repeated[0]!r} is listed twice; give it a larger weight instead")
        return cls({spec: load_callable(spec) for spec in specs}, weights)

    def __call__(self, prompt: str, response: str, row: dict) -> RewardScore:
        scores = {name: _checked(name, fn(prompt, response, row), response) for name, fn in self.functions.items()}
        return RewardScore(scores, sum(self.weights[name] * value for name, value in scores.items()))

    def score_batch(self, prompts: Sequence[str], responses: Sequence[str],
                    rows: Sequence[dict]) -> list[RewardScore]:
        """One ``RewardScore`` per (prompt, response, row); the three lists have the same length."""
        if not len(prompts) == len(responses) == len(rows):
            raise ValueError(f"{len(prompts)} prompts, {len(responses)} responses and {len(rows)} rows")
        return [self(p, r, row) for p, r, row in zip(prompts, responses, rows)]


def _checked(name: str, value, response: str) -> float:
    where = f"reward function {name!r} for the response {_excerpt(response)}"
    if isinstance(value, (str, bytes)) or value is None:
        raise UserError(f"{where} returned {value!r}; it must return a float")
    try:
        number = float(value)
    except (TypeError, ValueError) as error:
        raise UserError(f"{where} returned a {type(value).__name__}; it must return a float") from error
    if not math.isfinite(number):
        raise UserError(f"{where} returned {number}; rewards must be finite")
    return number


def _excerpt(text: str, width: int = 60) -> str:
    return repr(text if len(text) <= width else text[:width] + "...")


# ------------------------------------------------------------------------------------------- example functions
# A number as written in an answer: optional minus (not after a word, so "3-4" gives 4), thousands separators,
# decimals. "1,234.50" and "1234.5" compare equal.
_NUMBER = re.compile(r"(?:(?<![\w.])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
# Where a final answer is announced: GSM8K's "#### 42" or "answer: 42"/"answer is 42"; the text after the last one.
_ANSWER_MARKER = re.compile(r"####|\banswer\s*(?:is|:)", re.IGNORECASE)


def _final_part(text: str) -> str:
    markers = list(_ANSWER_MARKER.finditer(text))
    return text[markers[-1].end():] if markers else text


def _as_number(text: str) -> Decimal | None:
    try:
        return Decimal(text.replace(",", ""))
    except InvalidOperation:
        return None


def _field(row: dict, name: str, function: str) -> str:
    if name not in row or row[name] is None:
        raise UserError(f"reward function {function} reads the row's {name!r} field; this row has "
                        f"{', '.join(map(repr, row)) or 'no fields'}")
    return str(row[name])


def exact_answer(prompt: str, response: str, row: dict) -> float:
    """1.0 when the response's final answer equals ``row["answer"]``, else 0.0.

    The reference is ``row["answer"]``, cut after its last "####" when it has one (GSM8K's solutions end in
    "#### 72"). A numeric reference is compared as a number with the *last* number of the response ("... so she
    has 1,234 apples." matches 1234); otherwise the response's text after its last "####" / "answer:" /
    "answer is" (the whole response when it has none) must equal the reference after ``normalize_answer``.
    """
    reference = _final_part(_field(row, "answer", "exact_answer")).strip()
    expected = _as_number(reference) if _NUMBER.fullmatch(reference) else None
    if expected is not None:
        numbers = _NUMBER.findall(response)
        return float(bool(numbers) and _as_number(numbers[-1]) == expected)
    return float(normalize_answer(_final_part(response)) == normalize_answer(reference))


def format_regex(prompt: str, response: str, row: dict) -> float:
    """1.0 when ``row["pattern"]`` (a Python regular expression) matches the response (``re.search``), else 0.0.

    Anchor the pattern (``^...$``, with ``(?s)`` for multi-line responses) to require a whole-response format.
    """
    return float(regex_match(response, _field(row, "pattern", "format_regex")))
