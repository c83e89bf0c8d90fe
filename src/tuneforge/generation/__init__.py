"""One way to sample from a model, for chat, evaluation and online RL alike.

- ``engine``: the token-level core (:class:`HFEngine`: pad, ``generate``, trim at the first stop token), the
  :class:`RolloutEngine` protocol online RL samples through, :class:`SamplingSettings`;
- ``generator``: :class:`Generator`, a model with its tokenizer and template answering conversations, and
  loading a model source for inference;
- ``streaming``: text as it is generated, and stopping an answer on request (``tuneforge chat``).
"""

from tuneforge.generation.engine import (HFEngine, RolloutEngine, SamplingSettings, generation_config, left_pad,
                                         response_mask, seeded_global_rng, stop_ids)
from tuneforge.generation.generator import Generation, Generator, load_for_inference, tokenizer_and_template

__all__ = ["HFEngine", "RolloutEngine", "SamplingSettings", "generation_config", "left_pad", "response_mask",
           "seeded_global_rng", "stop_ids", "Generation", "Generator", "load_for_inference", "tokenizer_and_template"]
