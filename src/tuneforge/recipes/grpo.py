"""Critic-free online RL: GRPO (Shao et al. 2024, "DeepSeekMath") and RLOO (Ahmadian et al. 2024).

The loop is SFT's (same engine: accumulation, clipping, checkpoints, resume, early stopping); what changes is in
``compute_gradients``, top to bottom, for one optimiser step:

1. rollouts, for each micro-batch of ``train.batch_size`` prompts, without gradients and in eval mode: sample
   ``grpo.num_generations`` (G) responses per prompt with the LoRA adapter on (HF ``generate``, left padding,
   KV cache, stopping at EOS or the template's end-of-turn token); a response's tokens run up to and including
   its first stop token. Score each decoded response (stop token removed) with the reward functions
   (``fn(prompt, response, row)``); advantages come from the rewards of each group of G
   (``tuneforge.losses.group_advantages``); the reference log-probs are the model's with the adapter off;
2. gradients, for each rollout: the policy's per-token log-probs with gradients and ``grpo_loss``. There is one
   update per rollout, so pi_old is the policy itself (ratio 1, clipping inactive); the summed loss is divided by
   the response tokens (``grpo.normalisation: token``) or responses (``sequence``) of the whole step on all
   ranks, so accumulation does not change the step.

Evaluation generates greedily for the validation prompts and reports ``val_reward`` (mean total reward, with
``eval.metric: val_reward`` picking the best checkpoint, higher is better).

Limits for now: LoRA only (the reference is the model with its adapter off; a frozen full copy for full
fine-tuning is left for later, and ``lora.enabled: false`` is a ``ConfigError``); sampling uses torch's global
generator (seeded from ``train.seed``), so a resumed run does not redraw the same responses; generation runs on
the unwrapped model, so FSDP is not supported (DDP is, untested).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tuneforge.data.dataset import epoch_order, global_groups
from tuneforge.data.prompts import PromptExample, read_prompt_data, tokenize_prompt_data
from tuneforge.engine.distributed import no_sync
from tuneforge.engine.step import autocast
from tuneforge.errors import ConfigError
from tuneforge.eval.functions import RewardFunctions
from tuneforge.inference import stop_ids
from tuneforge.losses import group_advantages, grpo_loss, sequence_logprobs_from_hidden
from tuneforge.models.adapters import decoder_and_head, is_peft
from tuneforge.recipes.sft import SFTRecipe


@dataclass
class PromptBatch:
    """One micro-batch: ``train.batch_size`` prompts of this rank."""

    examples: list[PromptExample]

    def __len__(self) -> int:
        return len(self.examples)


@dataclass
class Rollout:
    """G sampled responses for each prompt of a micro-batch, scored; rows ``i * G .. i * G + G - 1`` belong to
    prompt ``i``. ``P`` is the (left-padded) prompt width, ``T`` the longest response.

    input_ids, attention_mask, position_ids: (B*G, P+T) prompt + response; ``attention_mask`` is 0 at left
        padding and after each response's first stop token.
    mask: (B*G, T) 1 at the response's tokens, up to and including its first stop token.
    rewards: (B*G,) weighted total reward; scores: (B*G, F) each function's value.
    advantages: (B*G,); ref_logp: (B*G, T) reference per-token log-probs (0 where ``mask`` is 0), or None.
    stopped: (B*G,) True where the response ended with a stop token (not cut at ``max_new_tokens``).
    responses: the decoded responses, stop token removed (for tests and logging).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    prompt_width: int
    mask: torch.Tensor
    rewards: torch.Tensor
    scores: torch.Tensor
    advantages: torch.Tensor
    ref_logp: torch.Tensor | None
    stopped: torch.Tensor
    responses: list[str]
    denominator: float = 1.0  # the step's token (or response) count on all ranks, set before the loss


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (batch, longest prompt), padded on the left so generation continues
    every row from the same column."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, ids in enumerate(prompts):
        input_ids[i, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention[i, width - len(ids):] = 1
    return input_ids, attention


def response_mask(responses: torch.Tensor, stop_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, stopped) of generated tokens ``responses`` (batch, T): mask is 1 up to and including the first stop
    token (so the model learns to stop), 0 after it (``generate`` pads finished rows, often with EOS itself);
    stopped is True for rows that contain a stop token."""
    is_stop = torch.isin(responses, torch.tensor(list(stop_ids), device=responses.device))
    stops_before = is_stop.long().cumsum(dim=1) - is_stop.long()
    return (stops_before == 0).long(), is_stop.any(dim=1)


def per_token_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       position_ids: torch.Tensor, prompt_width: int, mask: torch.Tensor,
                       chunk_size: int) -> torch.Tensor:
    """log pi(y_t | x, y_<t) of each response token: (batch, T) float32, 0 where ``mask`` is 0.

    The hidden state at column ``prompt_width - 1 + t`` predicts response token ``t``. Only masked positions reach
    the output head: each is handed to ``sequence_logprobs_from_hidden`` as a one-token "sequence", so the
    chunked log-prob gather of ``tuneforge.losses`` is reused rather than re-derived.
    """
    body, head = decoder_and_head(model)
    hidden = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                  use_cache=False).last_hidden_state
    width = mask.shape[1]
    predicting = hidden[:, prompt_width - 1:prompt_width - 1 + width]
    targets = input_ids[:, prompt_width:prompt_width + width]
    real = mask.bool()
    per_token = sequence_logprobs_from_hidden(predicting[real][:, None], targets[real][:, None], head,
                                              chunk_size).sums
    out = torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device)
    return out.masked_scatter(real, per_token)


def reward_key(spec: str, specs: Sequence[str]) -> str:
    """The metric name of one reward function: ``reward_<function>``, or the whole spec when two share a name."""
    name = spec.rpartition(":")[2]
    if sum(s.rpartition(":")[2] == name for s in specs) > 1:
        name = spec
    return f"reward_{name}"


class GRPORecipe(SFTRecipe):
    """``method: grpo | rloo``. See the module docstring; the loop itself is :class:`SFTRecipe`'s.

    LoRA only for now: the reference is the starting model, i.e. the same weights with the adapter disabled
    (``model.disable_adapter()``); full fine-tuning would need a frozen copy, which is not implemented.
    """

    # Accumulated per step, summed over responses (or tokens) on this rank; names index ``_stats``.
    STATS = ("reward_sum", "reward_sq_sum", "responses", "length_sum", "stopped", "kl_sum", "clip_sum", "tokens")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.method = self.config.method
        section = self.config.grpo
        if not self.config.lora.enabled:
            raise ConfigError(f"lora.enabled: method {self.method} needs LoRA for now (the reference is the model "
                              "with its adapter off); set lora.enabled=true")
        self.reward_functions = RewardFunctions.load(section.reward_functions, section.reward_weights)
        self.reward_keys = [reward_key(spec, section.reward_functions) for spec in section.reward_functions]
        self.last_rollouts: list[Rollout] = []
        self._stats: torch.Tensor | None = None

    # ------------------------------------------------------------------------------------------- data hooks
    def _read_data(self):
        return read_prompt_data(self.config)

    def _tokenize_data(self, read):
        return tokenize_prompt_data(read, self.config, self.tokenizer, self.template)

    def _epoch_batches(self, shuffle: bool, generator: torch.Generator | None = None) -> list[PromptBatch]:
        """This rank's micro-batches of the epoch. With several processes each global batch of
        batch_size x world_size prompts is split by rank, and a last partial one is dropped (every rank must
        run the same number of steps)."""
        generator = (generator or self.data_generator) if shuffle and self.config.data.shuffle else None
        size, world, rank = self.config.train.batch_size, self.dist.world_size, self.dist.rank
        groups = global_groups(epoch_order(self.data.train, generator), size, world)
        if world > 1 and groups and len(groups[-1]) < size * world:
            groups = groups[:-1]
        return [PromptBatch(group[rank * size:(rank + 1) * size]) for group in groups]

    def _sequence_shape(self) -> tuple[int, int]:
        longest = max(len(example.input_ids) for example in self.data.train)
        section = self.config.grpo
        return self.config.train.batch_size * section.num_generations, longest + section.max_new_tokens

    def _window_tokens(self, window: list) -> int:
        """Prompt and response tokens of the step's rollouts (this rank's; throughput only)."""
        return int(sum(int(r.attention_mask.sum()) for r in self.last_rollouts))

    # ------------------------------------------------------------------------------------------ model hooks
    def _build_model(self, source) -> torch.nn.Module:
        if source.adapter is not None:
            # Starting from a LoRA run (typically the SFT stage): fold its adapter into the base, so "adapter off"
            # is exactly the starting model, the reference.
            source = dataclasses.replace(source, merged_adapters=source.merged_adapters + [source.adapter],
                                         adapter=None)
        return super()._build_model(source)

    def _before_wrap(self) -> None:
        if not is_peft(self.model):
            raise ConfigError(f"method {self.method} needs a PEFT (LoRA) model")  # impossible: _build_model adds one

    def stop_ids(self) -> list[int]:
        """EOS and the template's end-of-turn token(s), as in generation."""
        return stop_ids(self.tokenizer, self.template)

    # ------------------------------------------------------------------------------------------- rollouts
    @torch.no_grad()
    def generate(self, examples: Sequence[PromptExample], generations: int, greedy: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Sample ``generations`` responses per prompt with the adapter on. Returns (sequences, responses,
        prompt_width): sequences (B*G, P+T) prompt + response, responses (B*G, T) the generated tokens."""
        section = self.config.grpo
        pad = self.tokenizer.pad_token_id
        input_ids, attention = left_pad([e.input_ids for e in examples], pad)
        input_ids = input_ids.repeat_interleave(generations, dim=0).to(self.device)
        attention = attention.repeat_interleave(generations, dim=0).to(self.device)
        sampling = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None} if greedy else \
            {"do_sample": True, "temperature": section.temperature, "top_p": section.top_p, "top_k": 0}
        was_training = self.model.training
        self.model.eval()  # no adapter dropout while sampling
        try:
            with autocast(self.device, self.bf16):
                sequences = self.model.generate(input_ids=input_ids, attention_mask=attention,
                                                max_new_tokens=section.max_new_tokens, eos_token_id=self.stop_ids(),
                                                pad_token_id=pad, use_cache=True, **sampling)
        finally:
            self.model.train(was_training)
        width = input_ids.shape[1]
        return sequences, sequences[:, width:], width

    def _decode(self, tokens: torch.Tensor, mask: torch.Tensor, stopped: torch.Tensor) -> list[str]:
        """Each response's text without its stop token (what the reward functions read)."""
        texts = []
        for row, length, stop in zip(tokens.tolist(), mask.sum(dim=1).tolist(), stopped.tolist()):
            ids = row[:length - 1] if stop else row[:length]
            texts.append(self.tokenizer.decode(ids, skip_special_tokens=True).strip())
        return texts

    def _score(self, examples: Sequence[PromptExample], responses: list[str], generations: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(total rewards (N,), per-function scores (N, F)) of the responses, G per prompt."""
        repeated = [example for example in examples for _ in range(generations)]
        results = self.reward_functions.score_batch([e.text for e in repeated], responses,
                                                    [e.fields for e in repeated])
        scores = torch.tensor([[r.scores[name] for name in self.reward_functions.functions] for r in results],
                              dtype=torch.float32)
        totals = torch.tensor([r.total for r in results], dtype=torch.float32)
        return totals, scores

    @torch.no_grad()
    def rollout(self, batch: PromptBatch) -> Rollout:
        """Sample, score and compute advantages and reference log-probs for one micro-batch (step 1 of the
        module docstring)."""
        section = self.config.grpo
        group = section.num_generations
        sequences, responses, width = self.generate(batch.examples, group)
        mask, stopped = response_mask(responses, self.stop_ids())
        texts = self._decode(responses, mask, stopped)
        rewards, scores = self._score(batch.examples, texts, group)
        advantages = group_advantages(rewards, group, self.method,
                                      section.scale_by_std if self.method == "grpo" else None).to(self.device)
        # The prompt mask is rebuilt from the prompt lengths (a real prompt token may equal the pad id).
        lengths = torch.tensor([len(e.input_ids) for e in batch.examples], device=self.device)
        lengths = lengths.repeat_interleave(group)
        columns = torch.arange(width, device=self.device)
        prompt_attention = (columns[None, :] >= width - lengths[:, None]).long()
        attention = torch.cat([prompt_attention, mask], dim=1)
        position_ids = (attention.cumsum(dim=1) - 1).clamp(min=0)
        ref_logp = None
        if section.beta > 0:
            with self.model.disable_adapter(), autocast(self.device, self.bf16):
                ref_logp = per_token_logprobs(self.model, sequences, attention, position_ids, width, mask,
                                              self.config.train.loss_chunk_size)
        return Rollout(sequences, attention, position_ids, width, mask, rewards.to(self.device),
                       scores.to(self.device), advantages, ref_logp, stopped, texts)

    # ------------------------------------------------------------------------------------------------ loss
    def _loss_sum(self, model: torch.nn.Module, rollout: Rollout) -> dict:
        """GRPO's loss of one rollout, already divided by the step's count (runs inside the wrapped forward, so
        DDP hooks see it), and its statistics."""
        section = self.config.grpo
        with autocast(self.device, self.bf16):
            logp = per_token_logprobs(model, rollout.input_ids, rollout.attention_mask, rollout.position_ids,
                                      rollout.prompt_width, rollout.mask, self.config.train.loss_chunk_size)
        loss, stats = grpo_loss(logp, None, rollout.ref_logp, rollout.advantages, rollout.mask, section.clip_range,
                                section.beta, section.normalisation, denominator=rollout.denominator)
        return {"loss": loss, "stats": stats}

    def compute_gradients(self, window: list[PromptBatch]) -> torch.Tensor:
        """Rollouts for every micro-batch of the step first (their token count is the denominator), then forward +
        backward on each; returns this rank's share of the step's loss."""
        section = self.config.grpo
        rollouts = [self.rollout(batch) for batch in window]
        self.last_rollouts = rollouts
        if section.normalisation == "token":
            count = sum(r.mask.sum() for r in rollouts).float()
        else:
            count = torch.tensor(float(sum(r.mask.shape[0] for r in rollouts)), device=self.device)
        if self.dist.enabled:
            dist.all_reduce(count)
        denominator = float(count.clamp(min=1))
        # DDP averages gradients over ranks; the loss of each rank is a share of the global mean.
        scale = self.dist.world_size
        loss_total = torch.zeros((), dtype=torch.float32, device=self.device)
        stats = torch.zeros(len(self.STATS) + len(self.reward_keys), dtype=torch.float64, device=self.device)
        for index, rollout in enumerate(rollouts):
            rollout.denominator = denominator
            with no_sync(self.wrapped, skip=index < len(rollouts) - 1):
                out = self.wrapped(rollout)
                (out["loss"] * scale).backward()
            loss_total += out["loss"].detach()
            tokens = rollout.mask.sum()
            stats += torch.stack([rollout.rewards.sum(), (rollout.rewards ** 2).sum(),
                                  torch.tensor(float(len(rollout.rewards)), device=self.device), tokens.float(),
                                  rollout.stopped.float().sum(), out["stats"]["kl"] * tokens,
                                  out["stats"]["clip_fraction"] * tokens, tokens.float(),
                                  *rollout.scores.sum(dim=0)]).double()
        self._stats = stats
        return loss_total

    def _step_metrics(self) -> dict:
        """Reward mean and std, each function's mean, KL and clip fraction (token means), mean response length
        (tokens, stop token included) and the fraction of responses that stopped by themselves."""
        if self._stats is None:
            return {}
        stats = self._stats.clone()
        if self.dist.enabled:
            dist.all_reduce(stats)
        named = dict(zip(self.STATS, stats.tolist()))
        responses, tokens = max(named["responses"], 1), max(named["tokens"], 1)
        mean = named["reward_sum"] / responses
        variance = max(named["reward_sq_sum"] / responses - mean ** 2, 0.0)
        out = {"reward": mean, "reward_std": variance ** 0.5}
        for key, total in zip(self.reward_keys, stats[len(self.STATS):].tolist()):
            out[key] = total / responses
        out.update({"kl": named["kl_sum"] / tokens, "clip_fraction": named["clip_sum"] / tokens,
                    "response_length": named["length_sum"] / responses,
                    "stopped_fraction": named["stopped"] / responses})
        return out

    # ------------------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict | None:
        """Greedy responses to the validation prompts (sharded over ranks): ``val_reward`` (mean total reward),
        each function's mean as ``val_reward_<name>``, and ``val_response_length``."""
        if not self.data.validation:
            return None
        examples = self.data.validation[self.dist.rank::self.dist.world_size]
        size = self.config.train.batch_size * self.config.grpo.num_generations
        totals = torch.zeros(3 + len(self.reward_keys), dtype=torch.float64, device=self.device)
        for start in range(0, len(examples), size):
            chunk = examples[start:start + size]
            _, responses, _ = self.generate(chunk, 1, greedy=True)
            mask, stopped = response_mask(responses, self.stop_ids())
            rewards, scores = self._score(chunk, self._decode(responses, mask, stopped), 1)
            totals += torch.tensor([rewards.sum().item(), float(len(chunk)), float(mask.sum()),
                                    *scores.sum(dim=0).tolist()], dtype=torch.float64, device=self.device)
        if self.dist.enabled:
            dist.all_reduce(totals)
        count = max(float(totals[1]), 1.0)
        out = {"val_reward": float(totals[0]) / count, "val_response_length": float(totals[2]) / count}
        for key, total in zip(self.reward_keys, totals[3:].tolist()):
            out[f"val_{key}"] = total / count
        return out

    def _summary(self, stop_reason, signal_name) -> dict:
        summary = super()._summary(stop_reason, signal_name)
        summary["method"] = self.method
        return summary
