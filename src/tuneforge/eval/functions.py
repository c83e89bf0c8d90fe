"""Kept so configs written before still load: ``tuneforge.eval.functions:exact_answer`` and the rest now live in
:mod:`tuneforge.rewards.functions`."""

from tuneforge.rewards.functions import (RewardFunctions, RewardScore, exact_answer, format_regex,  # noqa: F401
                                         load_callable)
