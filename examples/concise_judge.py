"""The online DPO demo's judge: reward functions ``fn(prompt, response, row) -> float`` (see
``tuneforge.rewards.functions``), weighted in ``examples/online_dpo.yaml``.

``contains_answer`` is 1.0 when the response contains the row's short ``answer`` (case and surrounding
punctuation ignored), else 0.0; ``brevity`` is minus the response's length in words. With weights 1 and 0.05 a
correct answer always beats a wrong one (up to 20 words apart), and of two correct answers the shorter wins.
"""

from __future__ import annotations


def contains_answer(prompt: str, response: str, row: dict) -> float:
    return 1.0 if str(row["answer"]).strip().lower() in response.lower() else 0.0


def brevity(prompt: str, response: str, row: dict) -> float:
    return -float(len(response.split()))
