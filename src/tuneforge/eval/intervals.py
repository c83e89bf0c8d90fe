"""How sure a metric is: its sample size and a 95% interval, from the per-row values it is the mean of.

- A **rate** (a fraction of rows that pass: exact match, contains, regex match, stopped, refusals, preference
  accuracy, win rate) gets the Wilson score interval (Wilson 1927, "Probable inference, the law of succession,
  and statistical inference"; Agresti & Coull 1998 recommend it over the normal approximation, which gives
  [0, 0] for 0 of 36). With p the observed rate, n the rows and z = 1.96:

      centre = (p + z²/2n) / (1 + z²/n),   half width = z / (1 + z²/n) · sqrt(p(1 - p)/n + z²/4n²)

  A tie in the win rate counts half a win, so p may fall between two counts; the formula takes it as it is.
- A **mean** of a score (token F1, ROUGE-L, response length, preference margin, user metrics) gets a percentile
  bootstrap interval: ``BOOTSTRAP_RESAMPLES`` resamples of the rows with replacement, drawn by a generator seeded
  with ``BOOTSTRAP_SEED`` (so the same values always give the same interval), and the 2.5th and 97.5th
  percentiles of their means (Efron & Tibshirani 1993, ch. 13).

Neither is computed for the loss and perplexity, a ratio over tokens rather than a mean over rows; they get n
(the rows scored) only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Z_95 = 1.959963984540054  # the 97.5th percentile of the standard normal distribution
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
# The metrics that are fractions of rows passing a test (each row's value is 0 or 1; a win-rate tie is 0.5).
RATES = frozenset({"exact_match", "contains", "regex_match", "stopped_rate", "refusal_rate_harmful",
                   "refusal_rate_benign", "preference_accuracy", "win_rate"})
# The metrics with no per-row value (a sum over tokens divided by their count).
TOKEN_RATIOS = frozenset({"loss", "perplexity"})


def wilson_interval(successes: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a rate ``successes / n`` (formula in the module docstring); ``n`` must be > 0."""
    if n <= 0:
        raise ValueError("a rate needs at least one row")
    p = successes / n
    scale = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / scale
    half = z / scale * math.sqrt(max(p * (1 - p), 0.0) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_interval(values: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (one per row); the same values and seed give the
    same interval. A single value gives a zero-width interval at it."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        raise ValueError("a mean needs at least one row")
    generator = np.random.default_rng(seed)
    means = data[generator.integers(0, data.size, size=(resamples, data.size))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def metric_interval(name: str, values: Sequence[float]) -> dict:
    """``{"n": rows, "ci95": [low, high], "method": "wilson" | "bootstrap"}`` for metric ``name`` from its
    per-row ``values`` (a rate by Wilson, anything else by the bootstrap; see the module docstring)."""
    n = len(values)
    if name in RATES:
        low, high = wilson_interval(float(sum(values)), n)
        method = "wilson"
    else:
        low, high = bootstrap_interval(values)
        method = "bootstrap"
    return {"n": n, "ci95": [low, high], "method": method}


def format_interval(interval: dict | None, percent: bool = False) -> str:
    """`` [low, high] n=N`` for a table cell (percentages when ``percent``), or "" without an interval."""
    if not isinstance(interval, dict):
        return ""
    n = interval.get("n")
    bounds = interval.get("ci95")
    text = f" n={n}" if isinstance(n, int) else ""
    if isinstance(bounds, (list, tuple)) and len(bounds) == 2 and all(isinstance(b, (int, float)) for b in bounds):
        low, high = bounds
        shown = f"{100 * low:.1f}–{100 * high:.1f}%" if percent else f"{low:.3g}–{high:.3g}"
        text = f" [{shown}]" + text
    return text
