"""What the online RL methods (GRPO, RLOO, PPO) share: prompts in, sampled responses, rewards, several updates.

The loop is SFT's (same engine: accumulation, clipping, checkpoints, resume, early stopping); what changes is
one optimiser *step*, which here is one rollout batch (``train_step``):

1. rollouts, one per micro-batch of ``train.batch_size`` prompts, without gradients: sample responses with the
   policy through a :class:`RolloutEngine` (by default :class:`HFEngine`: HF ``generate`` with the LoRA adapter
   on, left padding, KV cache, stopping at EOS or the template's end-of-turn token; a response's tokens run up
   to and including its first stop token), score the
   decoded responses (stop token removed) with the reward functions ``fn(prompt, response, row)`` and/or a reward
   model, and compute what the method's loss needs (``rollout``, per method);
2. updates: ``ppo_epochs`` passes over the step's rollouts, each split into ``mini_batches`` groups of
   micro-batches; each group is one optimiser update (forward + backward on each of its rollouts, the summed
   loss divided by the group's count on all ranks, clip, step). The learning-rate schedule advances once per
   step. With one pass and one group, pi_old is the policy itself and its log-probs are not computed twice.

The reference is the starting model: with LoRA, the same weights with the adapter disabled (no copy); with full
fine-tuning, a frozen copy made before training. Starting from a LoRA run (the SFT stage), its adapter is
folded into the base first, so "adapter off" is exactly that run's model.

Dropout is off during online RL (every dropout probability is set to 0, as TRL does for PPO): the log-probs of
the rollout and of the first update must be the same numbers, or the ratio pi / pi_old is noise from step one.

Evaluation generates greedily for the validation prompts and reports ``val_reward`` (mean total reward, with
``eval.metric: val_reward`` picking the best checkpoint, higher is better).

Randomness: sampling draws from ``sampling_generator``, a ``torch.Generator`` the run owns (seeded from
``train.seed``, the same on every rank) and checkpoints (``TrainState.method_state``); each sampling call draws one
seed per rank from it and rank r samples with the r-th (:class:`SamplingSettings` ``seed``), so ranks sample
their own streams and a resumed run, on any number of ranks, redraws the responses the uninterrupted run drew.
The prompt order is the data generator's and the mini-batch order a function of the seed and the step (both
exact on resume); dropout is off.

Limits: generation runs on the unwrapped model, so FSDP is refused (DDP works). How to plug in a
faster generation engine: see ``docs/training.md`` ("Generation in online RL").
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist
from transformers import GenerationConfig

from tuneforge.data.dataset import epoch_order, global_groups
from tuneforge.data.formats import Conversation, Message
from tuneforge.data.prompts import PromptExample, read_prompt_data, tokenize_prompt_data
from tuneforge.engine.distributed import no_sync
from tuneforge.engine.metrics import is_log_step
from tuneforge.engine.step import autocast
from tuneforge.errors import ConfigError
from tuneforge.eval.functions import RewardFunctions
from tuneforge.inference import left_pad, response_mask, stop_ids
from tuneforge.losses import sequence_logprobs_from_hidden, token_entropy_from_hidden
from tuneforge.models.adapters import causal_lm, decoder_and_head, is_peft
from tuneforge.models.dropout import disable_dropout
from tuneforge.recipes.sft import SFTRecipe

REWARD_MODEL_KEY = "reward_model"  # the column of a reward model's score among the reward functions'
SAMPLING_STATE_KEY = "sampling_generator"  # TrainState.method_state: the sampling generator's state (a byte list)
# Offsets the sampling generator's seed from train.seed, which seeds the data order: two streams, not one twice.
SAMPLING_SEED_OFFSET = 7919
SEED_BOUND = 2 ** 63 - 1  # the per-call seeds are drawn from [0, SEED_BOUND)


@dataclass
class PromptBatch:
    """One micro-batch: ``train.batch_size`` prompts of this rank."""

    examples: list[PromptExample]

    def __len__(self) -> int:
        return len(self.examples)


@dataclass
class Samples:
    """Sampled and scored responses, ``generations`` per prompt: rows ``i * G .. i * G + G - 1`` belong to prompt
    ``i``. ``P`` is the (left-padded) prompt width, ``T`` the longest response.

    input_ids, attention_mask, position_ids: (N, P+T) prompt + response; ``attention_mask`` is 0 at left padding
        and after each response's first stop token.
    mask: (N, T) 1 at the response's tokens, up to and including its first stop token.
    rewards: (N,) weighted total reward; scores: (N, F) each reward's value (functions, then the reward model).
    stopped: (N,) True where the response ended with a stop token (not cut at ``max_new_tokens``).
    responses: the decoded responses, stop token removed; prompts: each row's prompt (its last message).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    prompt_width: int
    mask: torch.Tensor
    rewards: torch.Tensor
    scores: torch.Tensor
    stopped: torch.Tensor
    responses: list[str]
    prompts: list[str]


@dataclass
class ResponseForward:
    """One forward pass over prompt + response, read at the response tokens; each (N, T) float32, 0 where the
    response mask is 0. ``values`` and ``entropy`` are None unless asked for."""

    logp: torch.Tensor
    values: torch.Tensor | None = None
    entropy: torch.Tensor | None = None


class _TemperatureHead(torch.nn.Module):
    """The output head with its logits divided by the sampling temperature."""

    def __init__(self, head: torch.nn.Module, temperature: float):
        super().__init__()
        self.head, self.temperature = head, temperature

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden) / self.temperature


def response_forward(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     position_ids: torch.Tensor, prompt_width: int, mask: torch.Tensor, chunk_size: int,
                     value_head: torch.nn.Module | None = None, entropy: bool = False,
                     temperature: float = 1.0) -> ResponseForward:
    """log pi(y_t | x, y_<t) of each response token, and optionally the value head's V_t and the entropy of the
    policy at the same positions.

    ``temperature`` divides the logits: the policy whose log-probs the losses use is the one that sampled the
    responses (softmax(z / T)), as in TRL; with T = 1 nothing changes. (top-p truncation is not modelled.)

    The hidden state at column ``prompt_width - 1 + t`` predicts response token ``t`` (and is the state whose
    value V_t is, before y_t is chosen). Only masked positions reach the output head: each is handed to
    ``sequence_logprobs_from_hidden`` as a one-token "sequence", so the chunked log-prob gather of
    ``tuneforge.losses`` is reused rather than re-derived.
    """
    body, head = decoder_and_head(model)
    hidden = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                  use_cache=False).last_hidden_state
    width = mask.shape[1]
    predicting = hidden[:, prompt_width - 1:prompt_width - 1 + width]
    targets = input_ids[:, prompt_width:prompt_width + width]
    real = mask.bool()
    if temperature != 1.0:
        head = _TemperatureHead(head, temperature)
    per_token = sequence_logprobs_from_hidden(predicting[real][:, None], targets[real][:, None], head,
                                              chunk_size).sums
    zeros = torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device)
    out = ResponseForward(zeros.masked_scatter(real, per_token))
    if value_head is not None:
        out.values = torch.where(real, value_head(predicting).squeeze(-1).float(), 0.0)
    if entropy:
        out.entropy = zeros.masked_scatter(real, token_entropy_from_hidden(predicting[real], head, chunk_size))
    return out


def reward_key(spec: str, specs: Sequence[str]) -> str:
    """The metric name of one reward function: ``reward_<function>``, or the whole spec when two share a name."""
    name = spec.rpartition(":")[2]
    if sum(s.rpartition(":")[2] == name for s in specs) > 1:
        name = spec
    return f"reward_{name}"


@dataclass
class SamplingSettings:
    """How one call samples: ``max_new_tokens``, greedy or (temperature, top_p) sampling, and ``seed``: what the
    call's random draws are a function of (an engine seeds its sampler with it; None: torch's global generator)."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    greedy: bool = False
    seed: int | None = None


@contextmanager
def seeded_global_rng(seed: int | None, device: torch.device) -> Iterator[None]:
    """Inside the block torch's global generators (the CPU's and ``device``'s) start from ``seed``; after it they
    are as they were. HF ``generate`` samples only from the global generator: this makes its draws a function of
    ``seed`` alone and leaves the run's global stream (dropout, user code; restored on resume) untouched. With
    ``seed`` None nothing changes."""
    if seed is None:
        yield
        return
    accelerator = device.type != "cpu"
    with torch.random.fork_rng(devices=[device] if accelerator else [],
                               device_type=device.type if accelerator else None):
        torch.manual_seed(seed)
        yield


class RolloutEngine(Protocol):
    """What online RL needs of a generation engine (the seam for a faster one, e.g. vLLM on a GPU).

    ``sample`` returns, for each prompt in order, ``generations`` responses as token ids: each ends at its first
    stop token (kept) or after ``settings.max_new_tokens`` tokens; given the same weights, prompts and
    ``settings.seed`` it should draw the same responses (what makes a resumed run exact). ``sync`` is called
    after each step's updates, so an engine holding its own copy of the weights can take the new ones (the
    default engine generates with the policy itself and has nothing to do).
    """

    def sample(self, prompts: Sequence[Sequence[int]], generations: int,
               settings: SamplingSettings) -> list[list[int]]: ...

    def sync(self, model: torch.nn.Module) -> None: ...


class HFEngine:
    """The default engine: transformers' ``generate`` on the policy being trained (LoRA adapter on), batched
    with left padding and a KV cache, in eval mode (activation checkpointing turns the cache off in training
    mode); sampling draws from torch's global generators seeded with ``settings.seed`` (then put back)."""

    def __init__(self, model: torch.nn.Module, pad_id: int, stop_ids: Sequence[int], device: torch.device,
                 bf16: bool):
        self.model, self.pad_id, self.stop_ids, self.device, self.bf16 = model, pad_id, list(stop_ids), device, bf16

    @torch.no_grad()
    def sample(self, prompts: Sequence[Sequence[int]], generations: int,
               settings: SamplingSettings) -> list[list[int]]:
        input_ids, attention = left_pad(prompts, self.pad_id)
        input_ids = input_ids.repeat_interleave(generations, dim=0).to(self.device)
        attention = attention.repeat_interleave(generations, dim=0).to(self.device)
        sampling = {"do_sample": False} if settings.greedy else \
            {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p, "top_k": 0}
        config = GenerationConfig(max_new_tokens=settings.max_new_tokens, eos_token_id=self.stop_ids,
                                  pad_token_id=self.pad_id, use_cache=True, **sampling)
        # transformers fills what a passed config leaves at its default from the checkpoint's generation_config
        # (a repetition penalty, a top-k): a neutral one stands in while sampling, so the sampler is exactly
        # softmax(z / T) with top-p, the policy whose log-probs the loss uses.
        lm = causal_lm(self.model)
        checkpoint_config, lm.generation_config = lm.generation_config, GenerationConfig()
        was_training = self.model.training
        self.model.eval()
        try:
            with autocast(self.device, self.bf16), seeded_global_rng(settings.seed, self.device):
                sequences = self.model.generate(input_ids=input_ids, attention_mask=attention,
                                                generation_config=config)
        finally:
            self.model.train(was_training)
            lm.generation_config = checkpoint_config
        responses = sequences[:, input_ids.shape[1]:]
        # generate pads finished rows (often with EOS itself): keep each row up to its first stop token.
        mask, _ = response_mask(responses, self.stop_ids)
        return [row[:length] for row, length in zip(responses.tolist(), mask.sum(dim=1).tolist())]

    def sync(self, model: torch.nn.Module) -> None:
        pass


class OnlineRLRecipe(SFTRecipe):
    """The shared part of ``method: grpo | rloo | ppo``; see the module docstring. A method provides
    ``generations`` (responses per prompt), ``rollout`` (one micro-batch's samples and loss inputs),
    ``_loss_sum`` (the loss of one rollout, divided by its ``denominator``) and ``_count`` (what the loss is
    divided by: tokens or responses)."""

    # Read the non-finite flag every update: the next rollout samples from the updated weights (a NaN would end
    # the run in the sampler instead of with a clear error), and a step already syncs to score and decode.
    check_every_step = True

    generations = 1
    reference_is_start = True
    # Per step, summed over this rank's responses; names index ``_rollout_stats``.
    ROLLOUT_STATS = ("reward_sum", "reward_sq_sum", "responses", "length_sum", "stopped")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.method = self.config.method
        self.section = self.config.rollout
        specs = list(self.section.reward_functions)
        self.reward_functions = RewardFunctions.load(specs, self.section.reward_weights) if specs else None
        self.reward_keys = [reward_key(spec, specs) for spec in specs]
        if self.section.reward_model:
            self.reward_keys.append(f"reward_{REWARD_MODEL_KEY}")
        self.reward_scorer = None  # loaded after the data is validated (_before_wrap)
        self.reference: torch.nn.Module | None = None  # full fine-tuning only
        self.last_rollouts: list = []
        self._rollout_stats: torch.Tensor | None = None
        # name -> (2,) float64 tensor [sum of weighted values, sum of weights]; tensors, so the step does not wait
        # for the device to log a statistic.
        self._update_stats: dict[str, torch.Tensor] = {}

    def setup(self) -> None:
        super().setup()
        # The same on every rank, so rank 0's checkpointed state resumes them all; see sampling_seed.
        self.sampling_generator = torch.Generator().manual_seed(self.config.train.seed + SAMPLING_SEED_OFFSET)
        saved = self.state.method_state.get(SAMPLING_STATE_KEY)
        if saved:
            self.sampling_generator.set_state(torch.tensor(saved, dtype=torch.uint8))
        elif self.state.step:
            self.log(f"note: the checkpoint of step {self.state.step} has no sampling generator state (an older "
                     "run): responses from here on are drawn from a fresh stream, not the ones an uninterrupted run "
                     "would have drawn")

    def sampling_seed(self) -> int:
        """The seed of one sampling call on this rank: the run's generator draws one per rank (the same draws on
        every rank) and this rank takes its own, so ranks sample different responses. The generator's new state
        goes into ``state.method_state`` at once, so any checkpoint carries the state that follows its step."""
        seeds = torch.randint(0, SEED_BOUND, (self.dist.world_size,), generator=self.sampling_generator)
        self.state.method_state[SAMPLING_STATE_KEY] = self.sampling_generator.get_state().tolist()
        return int(seeds[self.dist.rank])

    # ------------------------------------------------------------------------------------------- data hooks
    def _read_data(self):
        read = read_prompt_data(self.config)
        if self.section.reward_model:
            from tuneforge.eval.scoring import RewardScorer

            RewardScorer.resolve(self.section.reward_model)  # a wrong reward model fails before any model loads
        return read

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
        return self.config.train.batch_size * self.generations, longest + self.section.max_new_tokens

    def _window_tokens(self, window: list) -> int:
        """Prompt and response tokens of the step's rollouts (this rank's; throughput only)."""
        return int(sum(int(r.samples.attention_mask.sum()) for r in self.last_rollouts))

    # ------------------------------------------------------------------------------------------ model hooks
    def _before_wrap(self) -> None:
        if self.config.lora.enabled and not is_peft(self.model):
            raise ConfigError(f"method {self.method} needs a PEFT (LoRA) model")  # impossible: _build_model adds one
        if not self.config.lora.enabled:
            # Full fine-tuning: the reference is a frozen copy of the starting weights (one more model in memory).
            self.reference = copy.deepcopy(self.model).requires_grad_(False).eval()
        if disable_dropout(self.model):  # see the module docstring
            self.log("note: dropout is off in online RL (the rollout's and the first update's log-probs must agree)")
        if self.section.reward_model:
            from tuneforge.eval.scoring import RewardScorer

            self.reward_scorer = RewardScorer.load(self.section.reward_model, max_length=self.config.data.max_length
                                                   + self.section.max_new_tokens)
            self.log(f"reward model {self.section.reward_model} (weight {self.section.reward_model_weight})")

    def stop_ids(self) -> list[int]:
        """EOS and the template's end-of-turn token(s), as in generation."""
        return stop_ids(self.tokenizer, self.template)

    def reference_forward(self, samples: Samples) -> torch.Tensor:
        """(N, T) reference log-probs of the sampled responses: the adapter-disabled policy, or the frozen copy."""
        with autocast(self.device, self.bf16), torch.no_grad():
            if self.reference is not None:
                return self.response_forward(self.reference, samples).logp
            with self.model.disable_adapter():
                return self.response_forward(self.model, samples).logp

    def response_forward(self, model: torch.nn.Module, samples: Samples, value_head: torch.nn.Module | None = None,
                         entropy: bool = False) -> ResponseForward:
        return response_forward(model, samples.input_ids, samples.attention_mask, samples.position_ids,
                                samples.prompt_width, samples.mask, self.config.train.loss_chunk_size,
                                value_head=value_head, entropy=entropy, temperature=self.section.temperature)

    # ------------------------------------------------------------------------------------------- sampling
    @property
    def engine(self) -> RolloutEngine:
        """The generation engine (:class:`HFEngine` unless one was set)."""
        if getattr(self, "_engine", None) is None:
            self._engine = HFEngine(self.model, self.tokenizer.pad_token_id, self.stop_ids(), self.device, self.bf16)
        return self._engine

    @engine.setter
    def engine(self, engine: RolloutEngine) -> None:
        self._engine = engine

    def generate(self, examples: Sequence[PromptExample], generations: int, greedy: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """``generations`` responses per prompt from the engine, as tensors: (sequences, mask, stopped,
        prompt_width) with sequences (B*G, P+T) the left-padded prompt then the right-padded response, mask
        (B*G, T) 1 at response tokens (up to and including the first stop token), stopped (B*G,) True where the
        response ends with a stop token."""
        section = self.section
        # Greedy decoding draws nothing: evaluation leaves the sampling stream where training has it.
        settings = SamplingSettings(section.max_new_tokens, section.temperature, section.top_p, greedy,
                                    seed=None if greedy else self.sampling_seed())
        responses = self.engine.sample([e.input_ids for e in examples], generations, settings)
        pad, stops = self.tokenizer.pad_token_id, set(self.stop_ids())
        prompts, _ = left_pad([e.input_ids for e in examples], pad)
        width = max(1, max(len(r) for r in responses))
        tokens = torch.full((len(responses), width), pad, dtype=torch.long)
        mask = torch.zeros((len(responses), width), dtype=torch.long)
        for row, response in enumerate(responses):
            tokens[row, :len(response)] = torch.tensor(response, dtype=torch.long)
            mask[row, :len(response)] = 1
        stopped = torch.tensor([bool(r) and r[-1] in stops for r in responses])
        sequences = torch.cat([prompts.repeat_interleave(generations, dim=0), tokens], dim=1)
        return sequences.to(self.device), mask.to(self.device), stopped.to(self.device), prompts.shape[1]

    def _decode(self, tokens: torch.Tensor, mask: torch.Tensor, stopped: torch.Tensor) -> list[str]:
        """Each response's text without its stop token (what the rewards read)."""
        texts = []
        for row, length, stop in zip(tokens.tolist(), mask.sum(dim=1).tolist(), stopped.tolist()):
            ids = row[:length - 1] if stop else row[:length]
            texts.append(self.tokenizer.decode(ids, skip_special_tokens=True).strip())
        return texts

    def _score(self, examples: Sequence[PromptExample], responses: list[str], generations: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(total rewards (N,), per-reward scores (N, F)) of the responses, G per prompt: the weighted reward
        functions, plus the reward model's score times its weight."""
        repeated = [example for example in examples for _ in range(generations)]
        columns, totals = [], torch.zeros(len(responses), dtype=torch.float32)
        if self.reward_functions is not None:
            results = self.reward_functions.score_batch([e.text for e in repeated], responses,
                                                        [e.fields for e in repeated])
            columns.append(torch.tensor([[r.scores[name] for name in self.reward_functions.functions]
                                         for r in results], dtype=torch.float32))
            totals += torch.tensor([r.total for r in results], dtype=torch.float32)
        if self.reward_scorer is not None:
            conversations = [Conversation(list(e.messages) + [Message("assistant", text)])
                             for e, text in zip(repeated, responses)]
            scores = torch.tensor(self.reward_scorer.score(conversations, batch_size=len(conversations)),
                                  dtype=torch.float32)
            columns.append(scores[:, None])
            totals += self.section.reward_model_weight * scores
        return totals, torch.cat(columns, dim=1)

    @torch.no_grad()
    def sample(self, examples: Sequence[PromptExample], generations: int) -> Samples:
        """Sample, decode and score ``generations`` responses per prompt; build the masks of prompt + response."""
        sequences, mask, stopped, width = self.generate(examples, generations)
        texts = self._decode(sequences[:, width:], mask, stopped)
        rewards, scores = self._score(examples, texts, generations)
        # The prompt mask is rebuilt from the prompt lengths (a real prompt token may equal the pad id).
        lengths = torch.tensor([len(e.input_ids) for e in examples], device=self.device)
        lengths = lengths.repeat_interleave(generations)
        columns = torch.arange(width, device=self.device)
        prompt_attention = (columns[None, :] >= width - lengths[:, None]).long()
        attention = torch.cat([prompt_attention, mask], dim=1)
        position_ids = (attention.cumsum(dim=1) - 1).clamp(min=0)
        prompts = [e.messages[-1].content if e.messages else e.text for e in examples for _ in range(generations)]
        return Samples(sequences, attention, position_ids, width, mask, rewards.to(self.device),
                       scores.to(self.device), stopped, texts, prompts)

    @property
    def updates_per_step(self) -> int:
        return self.section.ppo_epochs * self.section.mini_batches

    # ------------------------------------------------------------------------------------------- the step
    def rollout(self, batch: PromptBatch):
        """Samples of one micro-batch and what the method's loss needs of them (no gradients)."""
        raise NotImplementedError

    def _count(self, rollout) -> torch.Tensor:
        """What the method divides a group's summed loss by, for one rollout (a float tensor)."""
        raise NotImplementedError

    def _prepare_step(self, rollouts: list) -> None:
        """Called once the step's rollouts exist, before any update (PPO whitens its advantages here)."""

    def _after_step(self, rollouts: list) -> None:
        """Called after the step's updates: shows one sampled response on logged steps (PPO also adapts its KL
        coefficient here)."""
        step = self.state.step + 1  # the step just trained (counted by the loop after this returns)
        if not is_log_step(step, self.config.train.log_every, self.total_steps) or not rollouts:
            return
        samples = rollouts[0].samples
        self.log(f"step {step} sample (reward {float(samples.rewards[0]):.3g}): {samples.prompts[0][-80:]!r} -> "
                 f"{samples.responses[0][:120]!r}")

    def train_step(self, window: list[PromptBatch]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rollouts for every micro-batch of the step, then ``ppo_epochs`` x ``mini_batches`` optimiser updates;
        returns (mean loss over the updates and ranks, mean grad norm)."""
        rollouts = self.collect_rollouts(window)
        groups = self.section.mini_batches
        size = -(-len(rollouts) // groups)  # a last, shorter window of the epoch gives fewer or smaller groups
        # Each pass groups the rollouts anew (as PPO implementations shuffle their mini-batches), drawn from a
        # generator of the run's seed and step: the same on every rank, and again on resume.
        shuffle = torch.Generator().manual_seed(self.config.train.seed * 1_000_003 + self.state.step)
        losses, norms = [], []
        for _ in range(self.section.ppo_epochs):
            order = torch.randperm(len(rollouts), generator=shuffle).tolist() if groups > 1 \
                else list(range(len(rollouts)))
            for start in range(0, len(rollouts), size):
                group = [rollouts[i] for i in order[start:start + size]]
                loss, grad_norm = self.apply_gradients(self.compute_gradients(group))
                losses.append(loss)
                norms.append(grad_norm.detach().float())
        self.scheduler.step()
        self.engine.sync(self.model)
        self._after_step(rollouts)
        return torch.stack(losses).mean(), torch.stack(norms).mean()

    def collect_rollouts(self, window: list[PromptBatch]) -> list:
        """The step's rollouts, one per micro-batch, recorded for the step's metrics and prepared for updates."""
        rollouts = [self.rollout(batch) for batch in window]
        self.last_rollouts = rollouts
        self._update_stats = {}
        self._record_rollouts(rollouts)
        self._prepare_step(rollouts)
        return rollouts

    def compute_gradients(self, group: list) -> torch.Tensor:
        """Forward + backward on each rollout of one update group, each loss divided by the group's count on all
        ranks (tokens or responses), so the split into micro-batches and processes does not change the update.
        Returns this rank's share of the group's mean loss."""
        count = torch.stack([self._count(r) for r in group]).sum()
        if self.dist.enabled:
            dist.all_reduce(count)
        denominator = float(count.clamp(min=1))
        scale = self.dist.world_size  # DDP averages gradients over ranks; each rank's loss is a share of the mean
        loss_total = torch.zeros((), dtype=torch.float32, device=self.device)
        for index, rollout in enumerate(group):
            rollout.denominator = denominator
            with no_sync(self.wrapped, skip=index < len(group) - 1):
                out = self.wrapped(rollout)
                (out["loss"] * scale).backward()
            loss_total += out["loss"].detach()
            tokens = rollout.samples.mask.sum()
            for name, value in out["stats"].items():
                self._add_stat(name, value * tokens, tokens)
        return loss_total

    def _add_stat(self, name: str, total: torch.Tensor | float, weight: torch.Tensor | float) -> None:
        """Add to a statistic of the step; the metric logged is sum(total) / sum(weight) over updates and ranks."""
        entry = torch.stack([torch.as_tensor(total, device=self.device), torch.as_tensor(weight, device=self.device)])
        if name in self._update_stats:
            self._update_stats[name] += entry.double()
        else:
            self._update_stats[name] = entry.double()

    def _global_stat(self, name: str) -> tuple[float, float]:
        """(total, weight) of a statistic of the step, summed over ranks."""
        values = self._update_stats.get(name, torch.zeros(2, dtype=torch.float64, device=self.device)).clone()
        if self.dist.enabled:
            dist.all_reduce(values)
        return float(values[0]), float(values[1])

    def _record_rollouts(self, rollouts: list) -> None:
        stats = torch.zeros(len(self.ROLLOUT_STATS) + len(self.reward_keys), dtype=torch.float64,
                            device=self.device)
        for rollout in rollouts:
            samples = rollout.samples
            stats += torch.stack([samples.rewards.sum(), (samples.rewards ** 2).sum(),
                                  torch.tensor(float(len(samples.rewards)), device=self.device),
                                  samples.mask.sum().float(), samples.stopped.float().sum(),
                                  *samples.scores.sum(dim=0)]).double()
        self._rollout_stats = stats

    def _step_metrics(self) -> dict:
        """Reward mean and std, each reward's mean, mean response length (tokens, stop token included), the
        fraction of responses that stopped by themselves, and the token means of the loss's statistics over the
        step's updates (clip fraction, KL, ...)."""
        if self._rollout_stats is None:
            return {}
        names = sorted(self._update_stats)
        update = torch.stack([self._update_stats[n] for n in names]) if names else \
            torch.zeros((0, 2), dtype=torch.float64, device=self.device)
        stats = self._rollout_stats.clone()
        if self.dist.enabled:
            dist.all_reduce(stats)
            dist.all_reduce(update)
        named = dict(zip(self.ROLLOUT_STATS, stats.tolist()))
        responses = max(named["responses"], 1)
        mean = named["reward_sum"] / responses
        variance = max(named["reward_sq_sum"] / responses - mean ** 2, 0.0)
        out = {"reward": mean, "reward_std": variance ** 0.5}
        for key, total in zip(self.reward_keys, stats[len(self.ROLLOUT_STATS):].tolist()):
            out[key] = total / responses
        out.update({name: float(total / max(weight, 1.0)) for name, (total, weight) in zip(names, update.tolist())})
        out.update({"response_length": named["length_sum"] / responses,
                    "stopped_fraction": named["stopped"] / responses})
        return out

    # ------------------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict | None:
        """Greedy responses to the validation prompts (sharded over ranks): ``val_reward`` (mean total reward),
        each reward's mean as ``val_reward_<name>``, and ``val_response_length``."""
        if not self.data.validation:
            return None
        examples = self.data.validation[self.dist.rank::self.dist.world_size]
        size = self.config.train.batch_size * self.generations
        totals = torch.zeros(3 + len(self.reward_keys), dtype=torch.float64, device=self.device)
        for start in range(0, len(examples), size):
            chunk = examples[start:start + size]
            sequences, mask, stopped, width = self.generate(chunk, 1, greedy=True)
            rewards, scores = self._score(chunk, self._decode(sequences[:, width:], mask, stopped), 1)
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
