"""What online methods optimise, and what ``eval`` scores answers with.

- ``functions``: reward functions / user metrics named ``"module:function"`` or ``"file.py:function"``
  (``load_callable``, ``RewardFunctions``), and the built-ins ``exact_answer`` and ``format_regex``;
- ``scoring``: ``RewardScorer``, a trained reward model scoring conversations;
- ``combined``: ``Rewards``, the weighted functions plus reward model that online RL scores its samples with.

Importing this package is light: each module loads what it needs (configs name ``tuneforge.rewards.functions``).
"""
