"""On-policy distillation, GKD (Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning from
Self-Generated Mistakes"): the student learns a teacher's next-token distributions at every response token,
minimising their generalised Jensen-Shannon divergence (``tuneforge.losses.distill``: ``gkd.beta`` 0 is the
forward KL, 1 the reverse KL), on a mixture of the dataset's responses and its own samples.

Data: prompts (``{"prompt": ...}`` rows, as online RL reads them) and/or conversations with responses (any SFT row
format; the prompt of a conversation is everything before its last assistant message). Each micro-batch is
on-policy with probability ``gkd.lmbda``: the student samples a response to each of its prompts (at
``gkd.temperature``, through the same :class:`tuneforge.generation.HFEngine` as online RL) and learns the
teacher's distributions along it; otherwise it learns them along the dataset's responses (every trained token
of the row, as SFT trains them). ``lmbda: 1`` (every batch on-policy) trains on prompts alone, so the student never
sees a reference answer; ``lmbda < 1`` needs a response in every training row and refuses a row without one.

The loss of a micro-batch is the divergence summed over its response tokens; the trainer divides it by the
response tokens of the whole step on all ranks (on-policy counts are summed over ranks once per step), so neither
the batch geometry nor the number of processes changes the update. Logged besides the loss: ``forward_kl`` and
``reverse_kl`` (token means, the KL to the teacher either way), ``on_policy`` (the share of micro-batches that
sampled) and ``response_length`` (tokens of the sampled responses).

Validation: ``val_loss`` is the divergence per response token on the validation rows: along the dataset's
responses, or, for prompt rows, along the student's greedy responses (what it would answer; no draw from the
run's stream); with ``val_forward_kl`` and ``val_reverse_kl``.

Randomness: one ``torch.Generator`` the run owns (seeded from ``train.seed``, the same on every rank) draws, per
micro-batch, whether it is on-policy and a sampling seed (rank r offsets it by r, so ranks sample their own
responses); the same two draws whatever the choice and the number of ranks. Its state is checkpointed
(``TrainState.method_state``) after every draw, so a resumed run makes the uninterrupted run's choices and
samples. Dropout is off in the student (as TRL's ``disable_dropout``), so the distribution it
samples from is the one it is trained on; the teacher is in eval mode.

The teacher (``gkd.teacher``) is any model tuneforge loads (``tuneforge.engine.teacher``): it must share the
student tokenizer's vocabulary, refused before any model loads otherwise. Generation runs on the unsharded model,
so FSDP is refused (DDP works).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal, Optional

import torch
import torch.distributed as dist

from tuneforge.config import DataConfig, RunConfig
from tuneforge.data.collate import Batch, collate_padded
from tuneforge.data.dataset import (DataReport, RankBatches, encode_example, epoch_order, global_groups,
                                    validate_row)
from tuneforge.data.formats import Conversation, Message, _Checker
from tuneforge.data.mixture import is_source_value, load_sources, source_name, tokenize_sources
from tuneforge.data.prepare import PreparedData, read_data
from tuneforge.data.preference import _add_system, _explicit_prompt
from tuneforge.data.prompts import leaves_room
from tuneforge.data.readers import BadRow, read_rows
from tuneforge.data.tokenize import Example, encode_prompt
from tuneforge.data.templates import load_template
from tuneforge.engine.recipe import LossTerms, stat
from tuneforge.engine.step import autocast, decoder_hidden
from tuneforge.engine.teacher import Teacher
from tuneforge.errors import ConfigError, DataError, UserError
from tuneforge.generation import HFEngine, RolloutEngine, SamplingSettings, stop_ids
from tuneforge.losses import IGNORE_INDEX, generalized_jsd_from_hidden
from tuneforge.models.adapters import decoder_and_head
from tuneforge.models.dropout import disable_dropout
from tuneforge.recipes._online import SAMPLING_SEED_OFFSET, SAMPLING_STATE_KEY, SEED_BOUND
from tuneforge.recipes.registry import MethodSpec, register

RANK_SEED_STRIDE = 1_000_003  # rank r samples with the micro-batch's seed + r * this (mod SEED_BOUND)


@dataclass
class GKDConfig:
    """``method: gkd``: on-policy distillation from a teacher (Agarwal et al. 2024), as TRL's ``GKDTrainer``.

    Attributes:
        teacher: the model to distil from (required): anything ``model.name_or_path`` accepts (a hub id, a folder,
            a ``.gguf`` file, a run directory of a LoRA or full run); it must share the student's tokenizer.
        teacher_dtype: the dtype the teacher's weights are loaded in (``float32``, ``bfloat16``, ``float16``);
            default None: ``model.dtype``.
        beta: interpolation of the generalised JSD in [0, 1]: 0 forward KL(teacher || student), 1 reverse
            KL(student || teacher); default 0.5 (TRL's).
        lmbda: the share of micro-batches that are on-policy (the student's own samples), in [0, 1]; the rest use
            the dataset's responses; 1 needs prompts only; default 0.5 (TRL's).
        temperature: T > 0: on-policy responses are sampled from softmax(z / T) and both distributions compared
            at T; default 1.0 (TRL's is 0.9).
        top_p: nucleus sampling mass in (0, 1] of the on-policy samples (the divergence is over the whole
            distribution); default 1.0 (off).
        max_new_tokens: longest sampled response, in tokens; default 64.
    """

    # key: (smallest allowed, largest allowed); None leaves that side open (checked with the shared ones)
    RANGES: ClassVar[dict] = {"beta": (0.0, 1.0), "lmbda": (0.0, 1.0), "temperature": (1e-6, None),
                              "top_p": (1e-6, 1.0), "max_new_tokens": (1, None)}

    teacher: Optional[str] = None
    teacher_dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None
    beta: float = 0.5
    lmbda: float = 0.5
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64

    @property
    def samples_per_prompt(self) -> int:
        """One sampled response per prompt (for ``tuneforge data preview``)."""
        return 1

    def check(self, config) -> None:
        """A teacher is required (whether it loads and shares the vocabulary is checked with the data)."""
        if not self.teacher:
            raise ConfigError("gkd.teacher: method gkd needs a teacher to distil from: a model with the student's "
                              "tokenizer, e.g. gkd: {teacher: runs/velmora-sft} (a run directory, a folder, a .gguf "
                              "file or a hub id)")


register(MethodSpec(
    name="gkd", recipe="tuneforge.recipes.gkd:GKDRecipe", section="gkd", section_class=GKDConfig,
    data="prompts", summary="GKD: on-policy distillation of a teacher's token distributions (generalised JSD) "
    "on the student's own samples and/or dataset responses", online=True, fsdp=False))


# ---------------------------------------------------------------------------------------------------- data
@dataclass
class DistillRow:
    """A validated row: ``prompt`` (the turns the student answers) and, when the row has responses, the whole
    ``conversation`` (its trained assistant turns are the dataset's responses)."""

    prompt: list[Message]
    conversation: Conversation | None
    source: str
    number: int


def _is_prompt_row(fields: dict, config: DataConfig) -> bool:
    """A ``prompt`` without a ``completion``: a prompt to answer, not a prompt/completion conversation."""
    return (config.format in ("auto", "prompt_completion") and fields.get("prompt") is not None
            and fields.get("completion") is None)


def _prompt_row(fields: dict, name: str, number: int, config: DataConfig) -> DistillRow:
    check = _Checker(name, number)
    return DistillRow(_add_system(_explicit_prompt(fields, check), fields, check, config.system_prompt), None, name,
                      number)


def _conversation_row(conversation: Conversation, name: str, number: int) -> DistillRow:
    if conversation.is_plain_text:
        raise DataError(name, number, "text", "a plain-text row has no prompt to answer; give prompt rows or "
                        "conversations (messages, prompt/completion ...)", "no_prompt")
    last = max(i for i, message in enumerate(conversation.messages) if message.role == "assistant")
    return DistillRow(conversation.messages[:last], conversation, name, number)


def load_rows(path, config: DataConfig, report: DataReport) -> list[DistillRow]:
    """Read and validate every row of ``path``: prompt rows (``tuneforge.data.prompts``' layout) and SFT
    conversations alike. A bad row raises its :class:`DataError` (``data.on_error: raise``) or is counted in
    ``report.dropped`` (``skip``)."""
    if is_source_value(path):
        return load_sources(path, config, report, load_rows)
    report.path = name = source_name(path)
    rows = []
    for row in read_rows(path):
        try:
            if not isinstance(row, BadRow) and _is_prompt_row(row.fields, config):
                report.rows += 1
                rows.append(_prompt_row(row.fields, name, row.number, config))
                continue
            conversation = validate_row(row, name, config, report)  # counts the row, raises or counts a bad one
            if conversation is not None:
                rows.append(_conversation_row(conversation, name, row.number))
        except DataError as error:
            if config.on_error == "raise":
                raise
            report.dropped[error.reason] += 1
    if not rows:
        raise UserError(f"{name}: no usable rows ({report.rows} read"
                        + (f", dropped: {dict(report.dropped)})" if report.dropped else ")"))
    return rows


@dataclass
class DistillExample:
    """A tokenised row: ``prompt_ids`` end with the assistant header (what sampling continues); ``response`` is the
    whole row with the dataset's responses as trained tokens (SFT's tokenisation), or None for a prompt row."""

    prompt_ids: list[int]
    response: Example | None


def tokenize_rows(rows: list[DistillRow], template, tokenizer, config: RunConfig, report: DataReport,
                  samples: bool) -> list[DistillExample]:
    """Tokenise ``rows``; with ``samples`` (the student will answer them), a prompt that leaves no room for
    ``gkd.max_new_tokens`` within ``data.max_length`` is dropped (``data.on_truncation: drop``) or raises. A
    prompt row is always answered by the student."""
    examples = []
    for row in rows:
        prompt_ids, _ = encode_prompt(Conversation(list(row.prompt)), template, tokenizer)
        if (samples or row.conversation is None) and not leaves_room(row, len(prompt_ids), config, report):
            continue
        response = None
        if row.conversation is not None:
            response = encode_example(row.conversation, template, tokenizer, config.data, report)
            if response is None:  # dropped (counted) by the truncation policy
                continue
        else:
            report.tokens += len(prompt_ids)
        examples.append(DistillExample(prompt_ids, response))
    report.kept = len(examples)
    if rows and not examples:
        raise UserError(f"{report.path}: no rows left after tokenisation (dropped: {dict(report.dropped)})")
    return examples


@dataclass
class DistillBatch:
    """One micro-batch of this rank: each row's ``prompts`` (token ids, for sampling) and the rows' dataset
    ``responses`` as an SFT batch (global counts over all ranks), or None when the rows have none."""

    prompts: list[list[int]]
    responses: Batch | None

    def __len__(self) -> int:
        return len(self.prompts)


class DistillBatches(RankBatches):
    """The epoch's micro-batches of one rank, collated when read (groups are whole: see ``epoch_batches``)."""

    def collate(self, mine: list[DistillExample], group: list[DistillExample]) -> DistillBatch:
        responses = None
        if all(e.response is not None for e in group):
            responses = collate_padded([e.response for e in mine], self.pad_id)
            responses.global_tokens = sum(len(e.response.input_ids) for e in group)
            responses.global_trained = sum(e.response.num_trained for e in group)
        return DistillBatch([e.prompt_ids for e in mine], responses)


def response_batch(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int) -> Batch:
    """Prompt + sampled response per row, right-padded, with the response tokens as targets (local counts)."""
    return collate_padded([Example(list(p) + list(r), [IGNORE_INDEX] * len(p) + list(r))
                           for p, r in zip(prompts, responses)], pad_id)


# -------------------------------------------------------------------------------------------------- recipe
class GKDRecipe:
    """``method: gkd``. See the module docstring."""

    def __init__(self, run):
        self.run = run
        self.inputs = self  # prompts (and responses), tokenised, batched; samples drawn in train_step
        self.section: GKDConfig = run.config.method_section
        model = run.config.model
        self.teacher = Teacher(self.section.teacher, "gkd.teacher", self.section.teacher_dtype or model.dtype,
                               model.attn_implementation)
        self.last_batches: list[Batch] = []  # what the last step trained on (on- and off-policy), for the bench
        self.last_on_policy: list[bool] = []
        self._engine: RolloutEngine | None = None
        self._generator: tuple[dict, torch.Generator] | None = None  # (the method_state it belongs to, generator)
        self._step_tokens = 0
        self._last_sample: tuple[Sequence[int], Sequence[int]] | None = None  # (prompt, response) ids

    # ----------------------------------------------------------------------------------------------- data
    def read(self):
        read = read_data(self.run.config, load_rows)
        if self.section.lmbda < 1:
            missing = next((row for row in read.train if row.conversation is None), None)
            if missing is not None:
                raise DataError(missing.source, missing.number, "prompt",
                                f"a prompt without a response, but gkd.lmbda={self.section.lmbda:g} trains "
                                f"{1 - self.section.lmbda:.0%} of the batches on the dataset's responses; give "
                                "every training row a response, or set gkd.lmbda: 1 (every batch on the "
                                "student's own samples)", "no_response")
        self.teacher.resolve()  # a wrong teacher fails before any model loads
        return read

    def tokenize(self, read) -> PreparedData:
        run = self.run
        self.teacher.check_vocabulary(run.tokenizer)  # before any model loads

        def tokenize_with(template, samples: bool):
            return lambda rows, report: tokenize_rows(rows, template, run.tokenizer, run.config, report, samples)

        def for_source(samples: bool):
            return lambda source: tokenize_with(load_template(source.template, run.tokenizer), samples)

        samples = self.section.lmbda > 0
        train = tokenize_sources(read.train, read.reports[0], tokenize_with(run.template, samples),
                                 for_source(samples))
        validation = tokenize_sources(read.validation, read.reports[1], tokenize_with(run.template, False),
                                      for_source(False)) if read.validation else []
        return PreparedData(train, validation, read.reports)

    def sequence_shape(self) -> tuple[int, int]:
        new_tokens = self.section.max_new_tokens
        longest = max(max(len(e.prompt_ids) + new_tokens, len(e.response.input_ids) if e.response else 0)
                      for e in self.run.data.train)
        return self.run.config.train.batch_size, longest

    def epoch_batches(self, generator: torch.Generator | None) -> DistillBatches:
        """This rank's micro-batches of the epoch. With several processes each global batch of
        batch_size x world_size rows is split by rank, and a last partial one is dropped (every rank samples)."""
        run = self.run
        size, world = run.config.train.batch_size, run.dist.world_size
        groups = global_groups(epoch_order(run.data.train, generator), size, world)
        if world > 1 and groups and len(groups[-1]) < size * world:
            groups = groups[:-1]
        return DistillBatches(groups, run.tokenizer.pad_token_id, size, run.dist.rank)

    def window_tokens(self, window: Sequence[DistillBatch]) -> int:
        """Tokens of the batches the last step trained on, on all ranks."""
        return self._step_tokens

    # ---------------------------------------------------------------------------------------------- model
    def prepare_model(self, model: torch.nn.Module) -> None:
        """Dropout off in the student (see the module docstring); the teacher, frozen, on the run's device."""
        run = self.run
        if disable_dropout(model):
            run.log("note: dropout is off in distillation (the student is trained on the distribution it samples)")
        _, head = decoder_and_head(model)
        self.teacher.load(run.device, head.weight.shape[0], len(run.tokenizer), run.log)
        run.log(f"teacher {self.section.teacher} ({self.teacher.dtype}); beta {self.section.beta:g}, lmbda "
                f"{self.section.lmbda:g}, temperature {self.section.temperature:g}")

    @property
    def engine(self) -> RolloutEngine:
        """The generation engine the student samples with (``HFEngine`` on the student unless one was set)."""
        if self._engine is None:
            run = self.run
            self._engine = HFEngine(run.model, run.tokenizer.pad_token_id, stop_ids(run.tokenizer, run.template),
                                    run.device, run.bf16)
        return self._engine

    @engine.setter
    def engine(self, engine: RolloutEngine) -> None:
        self._engine = engine

    # ------------------------------------------------------------------------------------------- randomness
    @property
    def generator(self) -> torch.Generator:
        """The run's generator: seeded from ``train.seed``, or where the state being trained (a resumed
        checkpoint's) left it; made anew when the trainer's state is another (a checkpoint was loaded)."""
        state = self.run.state
        if self._generator is None or self._generator[0] is not state.method_state:
            generator = torch.Generator().manual_seed(self.run.config.train.seed + SAMPLING_SEED_OFFSET)
            saved = state.method_state.get(SAMPLING_STATE_KEY)
            if saved:
                generator.set_state(torch.tensor(saved, dtype=torch.uint8))
            self._generator = (state.method_state, generator)
        return self._generator[1]

    def draw(self) -> tuple[bool, int]:
        """(whether the next micro-batch is on-policy, this rank's sampling seed for it): two draws from the run's
        generator whatever the answer and the number of processes, so every rank, and a run on any number of
        ranks, makes the same choices. Rank r samples with seed + r * RANK_SEED_STRIDE. The generator's new state
        goes into ``state.method_state`` at once, so any checkpoint carries the state that follows its step."""
        generator = self.generator
        on_policy = bool(torch.rand((), generator=generator) < self.section.lmbda)
        seed = int(torch.randint(0, SEED_BOUND, (), generator=generator))
        self.run.state.method_state[SAMPLING_STATE_KEY] = generator.get_state().tolist()
        return on_policy, (seed + RANK_SEED_STRIDE * self.run.dist.rank) % SEED_BOUND

    # ------------------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def responses(self, prompts: Sequence[Sequence[int]], seed: int | None = None) -> list[list[int]]:
        """The student's response to each of ``prompts``, up to and including its first stop token: sampled with
        ``seed``, or greedy when it is None."""
        section = self.section
        settings = SamplingSettings(section.max_new_tokens, section.temperature, section.top_p, greedy=seed is None,
                                    seed=seed)
        return self.engine.sample(prompts, 1, settings)

    def sample(self, prompts: Sequence[Sequence[int]], seed: int) -> Batch:
        """An on-policy batch: prompt + sampled response per row, the response tokens as targets (local counts)."""
        responses = self.responses(prompts, seed)
        self._last_sample = (prompts[0], responses[0])
        return response_batch(prompts, responses, self.run.tokenizer.pad_token_id)

    def _count_over_ranks(self, batches: Sequence[Batch]) -> None:
        """Set each batch's global token counts (one all-reduce; every rank holds the same number of batches)."""
        run = self.run
        if not batches or not run.dist.enabled:
            return
        counts = torch.tensor([[b.num_tokens, b.num_trained] for b in batches], dtype=torch.float64,
                              device=run.device)
        dist.all_reduce(counts)
        for batch, (tokens, trained) in zip(batches, counts.tolist()):
            batch.global_tokens, batch.global_trained = int(tokens), int(trained)

    # ------------------------------------------------------------------------------------------- the step
    def train_step(self, window: Sequence[DistillBatch], update) -> tuple[torch.Tensor, torch.Tensor]:
        """Each micro-batch on-policy (the student's samples) with probability ``lmbda``, else the dataset's
        responses; then one optimiser update over them."""
        run = self.run
        draws = [self.draw() for _ in window]
        flags = [on_policy for on_policy, _ in draws]
        batches = [self.sample(item.prompts, seed) if on_policy else item.responses
                   for item, (on_policy, seed) in zip(window, draws)]
        sampled = [batch for batch, on_policy in zip(batches, flags) if on_policy]
        self._count_over_ranks(sampled)
        for batch, on_policy in zip(batches, flags):
            run.stats.add("on_policy", stat(float(on_policy), 1.0))
            if on_policy:
                rows = batch.input_ids.shape[0]
                run.stats.add("response_length", stat(float(batch.num_trained), float(rows)))
        self.last_batches, self.last_on_policy = batches, flags
        self._step_tokens = sum(batch.global_tokens for batch in batches)
        result = update(batches)
        if sampled:
            self.engine.sync(run.model)
            self._show_sample()
        return result

    def _show_sample(self) -> None:
        """The first sampled response of the step, on logged steps."""
        run = self.run
        step = run.state.step + 1  # the step just trained (counted by the loop after train_step returns)
        if run.is_log_step(step) and self._last_sample is not None:
            prompt, response = (run.tokenizer.decode(ids, skip_special_tokens=True) for ids in self._last_sample)
            run.log(f"step {step} sample: {prompt[-80:]!r} -> {response.strip()[:120]!r}")

    def normaliser(self, batch: Batch) -> int:
        """The micro-batch's response tokens on all ranks."""
        return batch.global_trained

    def loss_terms(self, model: torch.nn.Module, batch: Batch) -> LossTerms:
        """The generalised JSD summed over the batch's response tokens (the hidden state at position t predicts
        target t), and the forward and reverse KL to the teacher as token means."""
        run, section = self.run, self.section
        selected = batch.targets != IGNORE_INDEX
        _, head = decoder_and_head(model)
        with autocast(run.device, run.bf16):
            hidden = decoder_hidden(model, batch.input_ids, batch.attention_mask, batch.position_ids)
            teacher = self.teacher.hidden(batch.input_ids, batch.attention_mask, batch.position_ids)
            out = generalized_jsd_from_hidden(hidden[selected], head, teacher[selected], self.teacher.head,
                                              section.beta, section.temperature, run.config.train.loss_chunk_size,
                                              vocab_size=self.teacher.vocab_size)
        tokens = selected.sum()
        return LossTerms(out.loss_sum, {"forward_kl": stat(out.forward_kl.sum(), tokens),
                                        "reverse_kl": stat(out.reverse_kl.sum(), tokens)})

    def step_metrics(self, means: dict[str, float]) -> dict[str, float]:
        return means

    # ------------------------------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict | None:
        """``val_loss`` (the divergence per response token), ``val_forward_kl`` and ``val_reverse_kl`` on the
        validation rows (sharded over ranks): along their responses, or the student's greedy ones to prompt rows."""
        run = self.run
        if not run.data.validation:
            return None
        return run.validation_loss(self.validation_batches())

    def validation_batches(self) -> list[Batch]:
        """This rank's validation micro-batches; prompt rows are answered greedily by the current student."""
        run = self.run
        size, world, rank = run.config.train.batch_size, run.dist.world_size, run.dist.rank
        batches = []
        for group in global_groups(run.data.validation, size, world):
            mine = group[rank * size:(rank + 1) * size]
            if not mine:  # this rank has no row of the last group: one that scores nothing joins the collectives
                ids = group[0].prompt_ids
                batches.append(collate_padded([Example(ids, [IGNORE_INDEX] * len(ids))], run.tokenizer.pad_token_id))
                continue
            examples = [e.response for e in mine]
            unanswered = [i for i, e in enumerate(examples) if e is None]
            if unanswered:
                prompts = [mine[i].prompt_ids for i in unanswered]
                answered = self.responses(prompts)
                for i, prompt, response in zip(unanswered, prompts, answered):
                    examples[i] = Example(prompt + response, [IGNORE_INDEX] * len(prompt) + response)
            batches.append(collate_padded(examples, run.tokenizer.pad_token_id))
        self._count_over_ranks(batches)
        return batches

    def save_model(self, save: Callable[[], None]) -> None:
        save()
