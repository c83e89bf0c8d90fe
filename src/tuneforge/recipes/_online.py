"""What the online recipes (GRPO, RLOO, PPO, online DPO) compose: the section they share (:class:`RolloutConfig`) and
:class:`OnlineRL`, the part of their recipe that is the same for all of them. Not a method (its name starts with
``_``): recipes import it.

The loop is the trainer's (accumulation, clipping, checkpoints, resume, early stopping); what changes is one
optimiser *step*, which here is one rollout batch (the recipe's ``train_step``):

1. rollouts, one per micro-batch of ``train.batch_size`` prompts, without gradients: sample responses with the
   policy through a :class:`tuneforge.generation.RolloutEngine` (by default ``HFEngine``: HF ``generate`` with
   the LoRA adapter on, left padding, KV cache, stopping at EOS or the template's end-of-turn token; a response's
   tokens run up to and including its first stop token), score the decoded responses (stop token removed) with
   :class:`tuneforge.rewards.combined.Rewards` (reward functions ``fn(prompt, response, row)`` and/or a reward
   model), and compute what the method's loss needs (the recipe's ``rollout``);
2. updates: ``ppo_epochs`` passes over the step's rollouts, each split into ``mini_batches`` groups of
   micro-batches; each group is one optimiser update (the trainer's ``update``: forward + backward on each of
   its rollouts, the summed loss divided by the group's count on all ranks, clip, step). The learning-rate
   schedule advances once per step. With one pass and one group, pi_old is the policy itself and its log-probs
   are not computed twice.

The reference is the starting model (``engine.reference.Reference``): with LoRA, the same weights with the adapter
disabled (no copy); with full fine-tuning, a frozen copy made before training. Starting from a LoRA run (the SFT
stage), its adapter is folded into the base first, so "adapter off" is exactly that run's model.

Dropout is off during online RL (every dropout probability is set to 0, as TRL does for PPO): the log-probs of
the rollout and of the first update must be the same numbers, or the ratio pi / pi_old is noise from step one.

Evaluation generates greedily for the validation prompts and reports ``val_reward`` (mean total reward, with
``eval.metric: val_reward`` picking the best checkpoint, higher is better).

Randomness: sampling draws from ``sampling_generator``, a ``torch.Generator`` the run owns (seeded from
``train.seed``, the same on every rank) and checkpoints (``TrainState.method_state``); each sampling call draws one
seed per rank from it and rank r samples with the r-th (``SamplingSettings.seed``), so ranks sample their own
streams and a resumed run, on any number of ranks, redraws the responses the uninterrupted run drew. The prompt
order is the data generator's and the mini-batch order a function of the seed and the step (both exact on
resume); dropout is off.

Limits: generation runs on the unwrapped model, so FSDP is refused (DDP works). How to plug in a faster
generation engine: see ``docs/training.md`` ("Generation in online RL").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch
import torch.distributed as dist

from tuneforge.data.dataset import epoch_order, global_groups
from tuneforge.data.prompts import PromptExample, read_prompt_data, tokenize_prompt_data
from tuneforge.engine.recipe import stat
from tuneforge.engine.reference import Reference
from tuneforge.engine.step import autocast, decoder_hidden
from tuneforge.errors import ConfigError
from tuneforge.generation import Generator, HFEngine, RolloutEngine, SamplingSettings, left_pad
from tuneforge.losses import sequence_logprobs_from_hidden, token_entropy_from_hidden
from tuneforge.models.adapters import decoder_and_head
from tuneforge.models.dropout import disable_dropout
from tuneforge.recipes.registry import get
from tuneforge.rewards.combined import Rewards

SAMPLING_STATE_KEY = "sampling_generator"  # TrainState.method_state: the sampling generator's state (a byte list)
# Offsets the sampling generator's seed from train.seed, which seeds the data order: two streams, not one twice.
SAMPLING_SEED_OFFSET = 7919
SEED_BOUND = 2 ** 63 - 1  # the per-call seeds are drawn from [0, SEED_BOUND)
# The mini-batch order of a step is drawn from a generator seeded with seed * this + step (the same on every rank).
SHUFFLE_SEED_STRIDE = 1_000_003


def section_name(config) -> str:
    """The config key the run's online method reads (``grpo`` for grpo and rloo)."""
    return get(config.method).section


@dataclass
class RolloutConfig:
    """What the online RL methods share (read from the ``grpo`` section for ``grpo | rloo``, from ``ppo`` for
    ``ppo``): how responses are sampled, how they are scored, and how often each rollout batch is reused.

    Attributes:
        max_new_tokens: longest response sampled, in tokens; default 64.
        temperature: sampling temperature (> 0); default 1.0.
        top_p: nucleus sampling mass in (0, 1]; default 1.0 (off).
        reward_functions: ``"module:function"`` or ``"path/to/file.py:function"`` specs of
            ``fn(prompt, response, row) -> float`` (see ``tuneforge.rewards.functions``).
        reward_weights: one weight per reward function (default 1.0 each); the reward is the weighted sum.
        reward_model: a reward-model run directory (``method: reward``) whose score of (prompt, response) is
            added to the reward, times ``reward_model_weight``. At least one of functions and model is needed.
        reward_model_weight: its weight; default 1.0.
        clip_range: PPO clipping eps of the probability ratio pi / pi_old; default 0.2.
        ppo_epochs: passes of updates over each rollout batch (TRL's ``num_ppo_epochs``, GRPO's
            ``num_iterations``); with 1 pass and 1 mini-batch pi_old is the policy itself (ratio 1).
        mini_batches: optimiser updates per pass: the step's ``train.grad_accum`` micro-batches are split into
            this many groups, each one update (must divide ``train.grad_accum``); default 1.
    """

    # key: (smallest allowed, largest allowed); None leaves that side open (checked with the shared ones)
    RANGES: ClassVar[dict] = {"max_new_tokens": (1, None), "temperature": (1e-6, None), "top_p": (1e-6, 1.0),
                             "clip_range": (1e-6, None), "ppo_epochs": (1, None), "mini_batches": (1, None)}

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    reward_functions: list = field(default_factory=list)
    reward_weights: Optional[list] = None
    reward_model: Optional[str] = None
    reward_model_weight: float = 1.0
    clip_range: float = 0.2
    ppo_epochs: int = 1
    mini_batches: int = 1

    @property
    def samples_per_prompt(self) -> int:
        """Responses sampled for each prompt of a rollout batch: one here (PPO); a group for GRPO / RLOO."""
        return 1

    def check(self, config) -> None:
        """The reward, its weights, the update schedule and the options online RL cannot take."""
        name = section_name(config)
        functions = self.reward_functions
        if not functions and not self.reward_model:
            raise ConfigError(f"{name}.reward_functions: method {config.method} needs a reward: at least one reward "
                              "function, e.g. ['tuneforge.rewards.functions:exact_answer'] or "
                              f"['rewards.py:my_reward'], or {name}.reward_model (a method: reward run directory)")
        if not all(isinstance(spec, str) and ":" in spec for spec in functions):
            raise ConfigError(f"{name}.reward_functions: expected 'module:function' or 'file.py:function' strings, "
                              f"got {functions!r}")
        weights = self.reward_weights
        if weights is not None:
            if len(weights) != len(functions) or not all(
                    isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights):
                raise ConfigError(f"{name}.reward_weights: expected {len(functions)} finite number(s), one per reward "
                                  f"function, got {weights!r}")
        if config.train.grad_accum % self.mini_batches:
            raise ConfigError(f"{name}.mini_batches: {self.mini_batches} must divide train.grad_accum="
                              f"{config.train.grad_accum} (each mini-batch is a group of the step's micro-batches)")


# ---------------------------------------------------------------------------------------------- batches
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


# ----------------------------------------------------------------------------------- the log-prob forward
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
    policy at the same positions: the one per-token log-prob forward of online RL (policy, pi_old, reference).

    ``input_ids``, ``attention_mask``, ``position_ids``: (N, P+T); ``mask``: (N, T) the response tokens.
    ``temperature`` divides the logits: the policy whose log-probs the losses use is the one that sampled the
    responses (softmax(z / T)), as in TRL; with T = 1 nothing changes. (top-p truncation is not modelled.)

    The hidden state at column ``prompt_width - 1 + t`` predicts response token ``t`` (and is the state whose
    value V_t is, before y_t is chosen). Only masked positions reach the output head: each is handed to
    ``sequence_logprobs_from_hidden`` as a one-token "sequence", so the chunked log-prob gather of
    ``tuneforge.losses`` is reused rather than re-derived.
    """
    _, head = decoder_and_head(model)
    hidden = decoder_hidden(model, input_ids, attention_mask, position_ids)
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


# ------------------------------------------------------------------------------------------ the component
class OnlineRL:
    """What GRPO, RLOO, PPO and online DPO share, composed by their recipes (``self.online``): the prompt data,
    sampling and scoring, the log-prob forwards of policy and reference, the rollout statistics, the update
    schedule and greedy validation by reward. See the module docstring.

    A recipe gives :meth:`collect_rollouts` its ``rollout(batch)`` (one micro-batch's samples and loss inputs: an
    object with ``samples`` and a ``count`` field) and ``count(rollout)`` (what its loss sum is divided by, on
    this rank: tokens or responses), and returns ``rollout.count`` as its ``normaliser``.
    """

    def __init__(self, run: Any):
        self.run = run
        self.section = run.config.method_section
        self.generations = self.section.samples_per_prompt
        self.rewards = Rewards.from_section(self.section)
        self.reference: Reference | None = None  # made in prepare_model
        self.last_rollouts: list = []
        self._engine: RolloutEngine | None = None
        self._generator: Generator | None = None
        self._stop_ids: list[int] | None = None
        self._sampling: tuple[dict, torch.Generator] | None = None  # (the method_state it belongs to, generator)
        self._step_tokens = 0

    # ----------------------------------------------------------------------------------------------- data
    def read(self):
        read = read_prompt_data(self.run.config)
        self.rewards.check_model()  # a wrong reward model fails before any model loads
        return read

    def tokenize(self, read):
        return tokenize_prompt_data(read, self.run.config, self.run.tokenizer, self.run.template)

    def sequence_shape(self) -> tuple[int, int]:
        longest = max(len(example.input_ids) for example in self.run.data.train)
        return self.run.config.train.batch_size * self.generations, longest + self.section.max_new_tokens

    def epoch_batches(self, generator: torch.Generator | None) -> list[PromptBatch]:
        """This rank's micro-batches of the epoch. With several processes each global batch of
        batch_size x world_size prompts is split by rank, and a last partial one is dropped (every rank must
        run the same number of steps)."""
        size, world, rank = self.run.config.train.batch_size, self.run.dist.world_size, self.run.dist.rank
        groups = global_groups(epoch_order(self.run.data.train, generator), size, world)
        if world > 1 and groups and len(groups[-1]) < size * world:
            groups = groups[:-1]
        return [PromptBatch(group[rank * size:(rank + 1) * size]) for group in groups]

    def window_tokens(self, window: Sequence[PromptBatch]) -> int:
        """Prompt and response tokens of the step's rollouts on all ranks (throughput only; counted when they
        were sampled)."""
        return self._step_tokens

    # ---------------------------------------------------------------------------------------------- model
    def prepare_model(self, model: torch.nn.Module) -> None:
        """The reference (before anything is added to the model), dropout off, the reward model."""
        run = self.run
        self.reference = Reference(model, lora=run.config.lora.enabled)
        if disable_dropout(model):  # see the module docstring
            run.log("note: dropout is off in online RL (the rollout's and the first update's log-probs must agree)")
        self.rewards.load_model(max_length=run.config.data.max_length + self.section.max_new_tokens)
        if self.rewards.scorer is not None:
            run.log(f"reward model {self.section.reward_model} (weight {self.section.reward_model_weight})")

    def response_forward(self, model: torch.nn.Module, samples: Samples, value_head: torch.nn.Module | None = None,
                         entropy: bool = False) -> ResponseForward:
        """:func:`response_forward` of ``samples`` on ``model`` at the sampling temperature, under autocast."""
        with autocast(self.run.device, self.run.bf16):
            return response_forward(model, samples.input_ids, samples.attention_mask, samples.position_ids,
                                    samples.prompt_width, samples.mask, self.run.config.train.loss_chunk_size,
                                    value_head=value_head, entropy=entropy, temperature=self.section.temperature)

    def reference_forward(self, samples: Samples) -> torch.Tensor:
        """(N, T) reference log-probs of the sampled responses (no gradients)."""
        with self.reference.model(self.run.model) as model:
            return self.response_forward(model, samples).logp

    # ------------------------------------------------------------------------------------------- sampling
    @property
    def engine(self) -> RolloutEngine:
        """The generation engine (``HFEngine`` on the policy unless one was set)."""
        if self._engine is None:
            run = self.run
            self._engine = HFEngine(run.model, run.tokenizer.pad_token_id, self.stop_ids(), run.device, run.bf16)
        return self._engine

    @engine.setter
    def engine(self, engine: RolloutEngine) -> None:
        self._engine = engine

    def stop_ids(self) -> list[int]:
        """EOS and the template's end-of-turn token(s), as in generation."""
        if self._stop_ids is None:
            self._stop_ids = self.generator.stop_ids()
        return self._stop_ids

    @property
    def generator(self) -> Generator:
        """The policy with its tokenizer and template: how responses are decoded (as ``tuneforge generate`` does)."""
        if self._generator is None:
            run = self.run
            self._generator = Generator(run.model, run.tokenizer, run.template, run.device)
        return self._generator

    @property
    def sampling_generator(self) -> torch.Generator:
        """The run's sampling generator: seeded from ``train.seed``, or where the state being trained (a resumed
        checkpoint's) left it. Made anew when the trainer's state is another (a checkpoint was loaded)."""
        state = self.run.state
        if self._sampling is None or self._sampling[0] is not state.method_state:
            generator = torch.Generator().manual_seed(self.run.config.train.seed + SAMPLING_SEED_OFFSET)
            saved = state.method_state.get(SAMPLING_STATE_KEY)
            if saved:
                generator.set_state(torch.tensor(saved, dtype=torch.uint8))
            elif state.step:
                self.run.log(f"note: the checkpoint of step {state.step} has no sampling generator state (an older "
                             "run): responses from here on are drawn from a fresh stream, not the ones an "
                             "uninterrupted run would have drawn")
            self._sampling = (state.method_state, generator)
        return self._sampling[1]

    def sampling_seed(self) -> int:
        """The seed of one sampling call on this rank: the run's generator draws one per rank (the same draws on
        every rank) and this rank takes its own, so ranks sample different responses. The generator's new state
        goes into ``state.method_state`` at once, so any checkpoint carries the state that follows its step."""
        generator = self.sampling_generator
        seeds = torch.randint(0, SEED_BOUND, (self.run.dist.world_size,), generator=generator)
        self.run.state.method_state[SAMPLING_STATE_KEY] = generator.get_state().tolist()
        return int(seeds[self.run.dist.rank])

    @torch.no_grad()
    def sample(self, examples: Sequence[PromptExample], generations: int, greedy: bool = False) -> Samples:
        """Sample (greedy: decode greedily, drawing nothing from the sampling stream), decode and score
        ``generations`` responses per prompt; build the masks of prompt + response."""
        run, section = self.run, self.section
        settings = SamplingSettings(section.max_new_tokens, section.temperature, section.top_p, greedy,
                                    seed=None if greedy else self.sampling_seed())
        responses = self.engine.sample([e.input_ids for e in examples], generations, settings)
        stops = self.stop_ids()
        decoded = [self.generator.decode(ids, stops) for ids in responses]
        repeated = [example for example in examples for _ in range(generations)]
        texts = [generation.text for generation in decoded]
        rewards, scores = self.rewards.score(repeated, texts)

        pad = run.tokenizer.pad_token_id
        prompts, _ = left_pad([e.input_ids for e in examples], pad)
        width = prompts.shape[1]
        longest = max(1, max(len(r) for r in responses))
        tokens = torch.full((len(responses), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(responses), longest), dtype=torch.long)
        for row, response in enumerate(responses):
            tokens[row, :len(response)] = torch.tensor(response, dtype=torch.long)
            mask[row, :len(response)] = 1
        sequences = torch.cat([prompts.repeat_interleave(generations, dim=0), tokens], dim=1).to(run.device)
        mask = mask.to(run.device)
        # The prompt mask is rebuilt from the prompt lengths (a real prompt token may equal the pad id).
        lengths = torch.tensor([len(e.input_ids) for e in repeated], device=run.device)
        columns = torch.arange(width, device=run.device)
        prompt_attention = (columns[None, :] >= width - lengths[:, None]).long()
        attention = torch.cat([prompt_attention, mask], dim=1)
        position_ids = (attention.cumsum(dim=1) - 1).clamp(min=0)
        stopped = torch.tensor([generation.stopped for generation in decoded], device=run.device)
        shown = [e.messages[-1].content if e.messages else e.text for e in repeated]
        return Samples(sequences, attention, position_ids, width, mask, rewards.to(run.device),
                       scores.to(run.device), stopped, texts, shown)

    # ------------------------------------------------------------------------------------------- the step
    def collect_rollouts(self, window: Sequence[PromptBatch], rollout: Callable[[PromptBatch], Any],
                         count: Callable[[Any], torch.Tensor]) -> list:
        """The step's rollouts, one per micro-batch: each given its ``count`` summed over ranks (one all-reduce for
        the step, so every update group's normaliser is the sum of its rollouts' counts), recorded for the step's
        metrics and kept as ``last_rollouts``."""
        run = self.run
        rollouts = [rollout(batch) for batch in window]
        tokens = sum(r.samples.attention_mask.sum() for r in rollouts)
        counts = torch.stack([count(r).float() for r in rollouts] + [tokens.float()]).double()
        if run.dist.enabled:
            dist.all_reduce(counts)
        *per_rollout, tokens = counts.tolist()
        self._step_tokens = int(tokens)
        for item, total in zip(rollouts, per_rollout):
            item.count = total
        self.record(rollouts)
        self.last_rollouts = rollouts
        return rollouts

    def record(self, rollouts: Sequence[Any]) -> None:
        """The rollout statistics of the step, each per response: reward (and reward_sq, for its std), each
        reward's value, response length (tokens, stop token included) and whether it stopped by itself."""
        add = self.run.stats.add
        for item in rollouts:
            samples = item.samples
            responses = float(len(samples.rewards))
            add("reward", stat(samples.rewards.sum(), responses))
            add("reward_sq", stat((samples.rewards ** 2).sum(), responses))
            for key, column in zip(self.rewards.keys, samples.scores.unbind(dim=1)):
                add(key, stat(column.sum(), responses))
            add("response_length", stat(samples.mask.sum().float(), responses))
            add("stopped_fraction", stat(samples.stopped.float().sum(), responses))

    @staticmethod
    def token_stats(stats: dict[str, torch.Tensor], mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Token means of one rollout (a loss's statistics) as named statistics weighted by its tokens."""
        tokens = mask.sum()
        return {name: stat(value * tokens, tokens) for name, value in stats.items()}

    def optimise(self, rollouts: list, update: Callable) -> tuple[torch.Tensor, torch.Tensor]:
        """``ppo_epochs`` x ``mini_batches`` optimiser updates over the step's rollouts; returns (mean loss over the
        updates and ranks, mean grad norm). A group whose rollouts count nothing to train on, on all ranks (online
        DPO's tied pairs), is no update (there is no mean over zero units); a step without any returns (0, 0)."""
        section = self.section
        groups = section.mini_batches
        size = -(-len(rollouts) // groups)  # a last, shorter window of the epoch gives fewer or smaller groups
        # Each pass groups the rollouts anew (as PPO implementations shuffle their mini-batches), drawn from a
        # generator of the run's seed and step: the same on every rank, and again on resume.
        shuffle = torch.Generator().manual_seed(self.run.config.train.seed * SHUFFLE_SEED_STRIDE + self.run.state.step)
        losses, norms = [], []
        for _ in range(section.ppo_epochs):
            order = torch.randperm(len(rollouts), generator=shuffle).tolist() if groups > 1 \
                else list(range(len(rollouts)))
            for start in range(0, len(rollouts), size):
                group = [rollouts[i] for i in order[start:start + size]]
                if not sum(item.count for item in group):  # counts are over all ranks: every rank skips it
                    continue
                loss, grad_norm = update(group)
                losses.append(loss)
                norms.append(grad_norm.detach().float())
        self.engine.sync(self.run.model)
        self.show_sample(rollouts)
        if not losses:
            nothing = torch.zeros((), dtype=torch.float32, device=self.run.device)
            return nothing, nothing.clone()
        return torch.stack(losses).mean(), torch.stack(norms).mean()

    def show_sample(self, rollouts: Sequence[Any]) -> None:
        """One sampled response of the step, on logged steps."""
        step = self.run.state.step + 1  # the step just trained (counted by the loop after train_step returns)
        if not rollouts or not self.run.is_log_step(step):
            return
        samples = rollouts[0].samples
        self.run.log(f"step {step} sample (reward {float(samples.rewards[0]):.3g}): {samples.prompts[0][-80:]!r} -> "
                     f"{samples.responses[0][:120]!r}")

    def step_metrics(self, means: dict[str, float]) -> dict[str, float]:
        """The step's statistics, with ``reward_std`` (over the step's responses on all ranks) for ``reward_sq``."""
        out = dict(means)
        reward_sq = out.pop("reward_sq", None)
        if reward_sq is not None:
            out["reward_std"] = max(reward_sq - out["reward"] ** 2, 0.0) ** 0.5
        return out

    # ------------------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict | None:
        """Greedy responses to the validation prompts (sharded over ranks): ``val_reward`` (mean total reward),
        each reward's mean as ``val_reward_<name>``, and ``val_response_length``."""
        run = self.run
        if not run.data.validation:
            return None
        examples = run.data.validation[run.dist.rank::run.dist.world_size]
        size = run.config.train.batch_size * self.generations
        totals = torch.zeros(3 + len(self.rewards.keys), dtype=torch.float64, device=run.device)
        for start in range(0, len(examples), size):
            chunk = examples[start:start + size]
            samples = self.sample(chunk, 1, greedy=True)
            totals += torch.tensor([samples.rewards.sum().item(), float(len(chunk)), float(samples.mask.sum()),
                                    *samples.scores.sum(dim=0).tolist()], dtype=torch.float64, device=run.device)
        if run.dist.enabled:
            dist.all_reduce(totals)
        count = max(float(totals[1]), 1.0)
        out = {"val_reward": float(totals[0]) / count, "val_response_length": float(totals[2]) / count}
        for key, total in zip(self.rewards.keys, totals[3:].tolist()):
            out[f"val_{key}"] = total / count
        return out
