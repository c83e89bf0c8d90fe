"""The reward online RL optimises: weighted reward functions plus, optionally, a reward model's score.

``total = sum_i w_i f_i(prompt, response, row) + w_rm RM(prompt + response)``; each term is also kept as its
own column, logged as ``reward_<name>`` (:func:`reward_key`) and, for the reward model, ``reward_reward_model``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from tuneforge.data.formats import Conversation, Message
from tuneforge.rewards.functions import RewardFunctions

REWARD_MODEL_KEY = "reward_model"  # the column of a reward model's score among the reward functions'


def reward_key(spec: str, specs: Sequence[str]) -> str:
    """The metric name of one reward function: ``reward_<function>``, or the whole spec when two share a name."""
    name = spec.rpartition(":")[2]
    if sum(s.rpartition(":")[2] == name for s in specs) > 1:
        name = spec
    return f"reward_{name}"


class Rewards:
    """Reward functions and a reward model, scored together.

    Args:
        functions: ``"module:function"`` / ``"file.py:function"`` specs (loaded at once, so an import error
            shows before any model loads).
        weights: one per function (default 1.0 each).
        reward_model: a reward-model run directory, or None; checked with :meth:`check_model` and loaded with
            :meth:`load_model` (after the data is validated).
        reward_model_weight: the weight of its score.

    Attributes:
        keys: the metric name of each score column, functions first, then the reward model.
    """

    def __init__(self, functions: Sequence[str], weights: Sequence[float] | None = None,
                 reward_model: str | None = None, reward_model_weight: float = 1.0):
        specs = list(functions)
        self.functions = RewardFunctions.load(specs, weights) if specs else None
        self.reward_model, self.reward_model_weight = reward_model, reward_model_weight
        self.keys = [reward_key(spec, specs) for spec in specs]
        if reward_model:
            self.keys.append(f"reward_{REWARD_MODEL_KEY}")
        self.scorer = None

    @classmethod
    def from_section(cls, section: Any) -> "Rewards":
        """From an online method's section (``reward_functions``, ``reward_weights``, ``reward_model``,
        ``reward_model_weight``: ``recipes._online.RolloutConfig``)."""
        return cls(section.reward_functions, section.reward_weights, section.reward_model,
                   section.reward_model_weight)

    def check_model(self) -> None:
        """Fail now, before any model loads, when the reward model is not one (a wrong path, another method's run)."""
        if self.reward_model:
            from tuneforge.rewards.scoring import RewardScorer

            RewardScorer.resolve(self.reward_model)

    def load_model(self, max_length: int) -> None:
        """Load the reward model (if any); conversations longer than ``max_length`` tokens keep their end."""
        if self.reward_model:
            from tuneforge.rewards.scoring import RewardScorer

            self.scorer = RewardScorer.load(self.reward_model, max_length=max_length)

    def score(self, prompts: Sequence[Any], responses: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(totals (N,), scores (N, F)) float32 of ``responses`` (N), F = ``len(keys)``.

        ``prompts[i]`` is the prompt ``responses[i]`` answers (a ``data.prompts.PromptExample``: its ``text`` and
        ``fields`` go to the reward functions; its ``messages`` with the response appended to the reward model).
        """
        columns, totals = [], torch.zeros(len(responses), dtype=torch.float32)
        if self.functions is not None:
            results = self.functions.score_batch([p.text for p in prompts], responses, [p.fields for p in prompts])
            columns.append(torch.tensor([[r.scores[name] for name in self.functions.functions] for r in results],
                                        dtype=torch.float32))
            totals += torch.tensor([r.total for r in results], dtype=torch.float32)
        if self.scorer is not None:
            conversations = [Conversation(list(p.messages) + [Message("assistant", text)])
                             for p, text in zip(prompts, responses)]
            scores = torch.tensor(self.scorer.score(conversations, batch_size=len(conversations)),
                                  dtype=torch.float32)
            columns.append(scores[:, None])
            totals += self.reward_model_weight * scores
        return totals, torch.cat(columns, dim=1)
