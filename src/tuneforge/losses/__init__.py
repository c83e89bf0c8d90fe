"""The numerics every method shares, one module per family; import them from here.

- ``tokens``: masked next-token loss with a chunked output head, token and sequence log-probs from hidden
  states, the last real token of each row;
- ``preference``: DPO and its variants (IPO's per-token means), SimPO, ORPO (its SFT term), KTO (its reference
  point z0), Bradley-Terry (reward models);
- ``rl``: PPO, GRPO and RLOO (advantages, clipped objectives, KL estimators);
- ``distill``: the generalised Jensen-Shannon divergence of on-policy distillation (GKD), with chunked heads.
"""

from tuneforge.losses.distill import ChunkDivergence, Distillation, chunk_divergence, generalized_jsd_from_hidden
from tuneforge.losses.preference import (DPO_LOSS_TYPES, KTOLoss, PreferenceLoss, bradley_terry_loss, dpo_loss,
                                         ipo_token_means, kto_loss, kto_reference_point, log_odds, orpo_loss,
                                         orpo_odds_ratio_loss, orpo_sft_loss_sum, response_lengths,
                                         sequence_logprobs, simpo_loss)
from tuneforge.losses.rl import (GROUP_BASELINES, GROUP_STD_EPS, GRPO_NORMALISATIONS, KL_ESTIMATORS,
                                 WHITEN_EPS, RLStats, gae_advantages, group_advantages, grpo_loss, masked_mean,
                                 masked_whiten, per_token_kl, ppo_policy_loss, ppo_rewards, ppo_value_loss)
from tuneforge.losses.tokens import (IGNORE_INDEX, SequenceLogprobs, count_trained, gather_last, last_token_index,
                                     linear_cross_entropy_sum, linear_token_logprobs, masked_lm_loss_sum,
                                     reference_lm_loss_sum, sequence_logprobs_from_hidden, token_entropy_from_hidden,
                                     token_logprobs)

__all__ = [
    "ChunkDivergence", "Distillation", "chunk_divergence", "generalized_jsd_from_hidden",
    "DPO_LOSS_TYPES", "KTOLoss", "PreferenceLoss", "bradley_terry_loss", "dpo_loss", "ipo_token_means", "kto_loss",
    "kto_reference_point", "log_odds", "orpo_loss", "orpo_odds_ratio_loss", "orpo_sft_loss_sum", "response_lengths",
    "sequence_logprobs", "simpo_loss",
    "GROUP_BASELINES", "GROUP_STD_EPS", "GRPO_NORMALISATIONS", "KL_ESTIMATORS", "WHITEN_EPS", "RLStats",
    "gae_advantages", "group_advantages", "grpo_loss", "masked_mean", "masked_whiten", "per_token_kl",
    "ppo_policy_loss", "ppo_rewards", "ppo_value_loss",
    "IGNORE_INDEX", "SequenceLogprobs", "count_trained", "gather_last", "last_token_index",
    "linear_cross_entropy_sum", "linear_token_logprobs", "masked_lm_loss_sum", "reference_lm_loss_sum",
    "sequence_logprobs_from_hidden", "token_entropy_from_hidden", "token_logprobs",
]
