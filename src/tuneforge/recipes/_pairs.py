"""What the preference recipes (DPO, SimPO, ORPO, KTO, reward models) compose: their data, their log-prob
forward, the reference pass and their statistics.

Not a method (its name starts with ``_``): recipes import it.

- data (:class:`PairData`): rows are read and validated as pairs (or KTO's unpaired examples), tokenised, and
  batched so that one forward pass serves both sides: by default one row per pair, prompt + chosen + rejected,
  with rejected masked from chosen (the prompt runs once; ``data.shared_prompt``, for methods whose spec allows
  it), else 2B rows, chosen then rejected;
- the forward (:func:`response_logprobs`): the decoder body runs once (``engine.step.decoder_hidden``) and each
  side's response log-probs are gathered from its hidden states;
- the reference (:func:`prepare_reference`): for the methods that compare the policy with where it started
  (``MethodSpec.reference``); with ``precompute_ref`` its log-probs are computed once before training
  (:func:`precompute_reference`), so no reference forward runs while training;
- the statistics (:func:`pair_stats`): implicit rewards of both sides, their margin, the fraction ranked right
  and the log-probs, weighted by the pairs' weights.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from tuneforge.data.collate import Batch
from tuneforge.data.dataset import epoch_order, length_grouped
from tuneforge.data.prepare import PreparedData, ReadData, read_preference_data, tokenize_preference_data
from tuneforge.engine.recipe import stat
from tuneforge.engine.reference import Reference
from tuneforge.engine.step import autocast, decoder_hidden, move
from tuneforge.losses import PreferenceLoss, SequenceLogprobs, sequence_logprobs_from_hidden
from tuneforge.models.adapters import decoder_and_head
from tuneforge.progress import progress

# The statistics of the pairwise methods, logged as the mean over the step's pairs (``val_*`` in validation).
PAIR_STATS = ("rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy", "logps_chosen",
              "logps_rejected")


class PairData:
    """Read, tokenise and batch a preference method's rows.

    Args:
        run: the trainer (its config, spec, tokenizer, template, data and ranks are read when needed).
        unpaired: KTO's rows (prompt, completion, label) instead of pairs; each example then goes through the
            model with its mismatched KL example (2B rows).
    """

    def __init__(self, run, unpaired: bool = False):
        self.run = run
        self.unpaired = unpaired

    @property
    def shared_prompt(self) -> bool:
        """Each pair is one row (prompt once, rejected masked from chosen): the method allows it (its spec) and
        ``data.shared_prompt`` is on. Reward models and KTO score whole separate sequences."""
        return self.run.spec.shared_prompt and self.run.config.data.shared_prompt

    def read(self) -> ReadData:
        return read_preference_data(self.run.config, unpaired=self.unpaired)

    def tokenize(self, read: ReadData) -> PreparedData:
        run = self.run
        return tokenize_preference_data(read, run.config, run.tokenizer, run.template, unpaired=self.unpaired)

    def width(self, example) -> int:
        """The width ``example`` needs in a batch: its prompt + chosen + rejected row (shared prompt), or the
        longer of its two sequences (a pair's sides, or a KTO example and its KL example)."""
        if self.shared_prompt:
            return len(example.chosen.input_ids) + len(example.rejected.input_ids) - example.prompt_length
        sides = (example.example, example.kl_example) if self.unpaired else (example.chosen, example.rejected)
        return max(len(side.input_ids) for side in sides)

    def sequence_shape(self) -> tuple[int, int]:
        """(sequences per micro-batch, longest sequence): B rows in the shared-prompt layout, else 2B (both
        sides, or the example and its KL partner, go through the model together)."""
        batch_size = self.run.config.train.batch_size
        longest = max(map(self.width, self.run.data.train))
        return (batch_size if self.shared_prompt else 2 * batch_size), longest

    def batches(self, examples: list, generator: torch.Generator | None = None, rank: int | None = None,
                world_size: int | None = None) -> Sequence:
        """Micro-batches of ``examples`` for ``rank`` of ``world_size`` (default: this rank of the run), in the
        order ``generator`` draws (None: as given)."""
        from tuneforge.data.preference import make_preference_batches

        run = self.run
        return make_preference_batches(examples, run.config.train.batch_size, run.tokenizer.pad_token_id,
                                       generator=generator,
                                       rank=run.dist.rank if rank is None else rank,
                                       world_size=run.dist.world_size if world_size is None else world_size,
                                       shared_prompt=self.shared_prompt)

    def epoch_batches(self, generator: torch.Generator | None) -> Sequence:
        """This rank's micro-batches of one epoch of the training examples (``data.group_by_length``: of pairs of
        similar widths)."""
        config, examples = self.run.config, self.run.data.train
        if config.data.group_by_length:
            # Grouped in the epoch's order, then handed over in that order (no generator): every group but the last
            # is full, so make_preference_batches cuts the flat list back into the same global micro-batches.
            size = config.train.batch_size * self.run.dist.world_size
            groups = length_grouped(epoch_order(examples, generator), size, self.width, generator)
            examples, generator = [example for group in groups for example in group], None
        return self.batches(examples, generator)

    @staticmethod
    def window_tokens(window: Sequence) -> int:
        """Tokens of a step's micro-batches over all ranks, padding excluded (pair and unpaired batches alike)."""
        return sum(batch.sequences.global_tokens for batch in window)

    def validation_batches(self) -> Sequence:
        """This rank's share of the validation examples, in file order."""
        return self.batches(self.run.data.validation)

    def validation_loss(self) -> dict[str, float] | None:
        """``val_loss`` and ``val_<stat>`` of the validation examples (the trainer's generic validation of the
        method's loss terms), or None without validation rows."""
        if not self.run.data.validation:
            return None
        return self.run.validation_loss(self.validation_batches())


def response_logprobs(run, model: torch.nn.Module, sequences: Batch,
                      rejected_targets: torch.Tensor | None = None) -> SequenceLogprobs:
    """Response log-probs of each row of ``sequences``: the body runs once and the output head sees the
    response positions only.

    Args:
        run: the trainer (device, autocast, ``train.loss_chunk_size``).
        model: the policy, or the module a :class:`Reference` runs.
        sequences: (rows, seq) padded rows; a (rows, 1, seq, seq) mask is the shared-prompt layout's.
        rejected_targets: (rows, seq) the rejected side's targets in the shared-prompt layout: both sides then
            read the same hidden states, each with its own targets.
    Returns:
        (rows,) sums and counts; with ``rejected_targets`` (2 rows,): the chosen sides, then the rejected ones.
    """
    _, head = decoder_and_head(model)
    chunk = run.config.train.loss_chunk_size
    with autocast(run.device, run.bf16):
        hidden = decoder_hidden(model, sequences.input_ids, sequences.attention_mask, sequences.position_ids)
        chosen = sequence_logprobs_from_hidden(hidden, sequences.targets, head, chunk)
        if rejected_targets is None:
            return chosen
        rejected = sequence_logprobs_from_hidden(hidden, rejected_targets, head, chunk)
    return SequenceLogprobs(torch.cat([chosen.sums, rejected.sums]), torch.cat([chosen.counts, rejected.counts]))


def pair_logprobs(run, model: torch.nn.Module, batch) -> SequenceLogprobs:
    """(2B,) response log-probs of a ``PairBatch``: the B chosen sides, then the B rejected ones, in either
    layout."""
    return response_logprobs(run, model, batch.sequences, batch.rejected_targets)


def prepare_reference(run, model: torch.nn.Module, data: PairData, precompute: bool,
                      logprobs: Callable[[torch.nn.Module, object], SequenceLogprobs],
                      store: Callable[[object, float, float], None]) -> Reference:
    """The reference of a run that starts from ``model`` (still whole and unwrapped): the policy with its adapter
    off (LoRA), else a frozen copy; with ``precompute`` its log-probs are computed now
    (:func:`precompute_reference`) and full fine-tuning keeps no copy."""
    ref = Reference(model, lora=run.config.lora.enabled, keep_copy=not precompute)
    if precompute:
        precompute_reference(run, ref, model, data, logprobs, store)
    return ref


@torch.no_grad()
def precompute_reference(run, ref: Reference, model: torch.nn.Module, data: PairData,
                         logprobs: Callable[[torch.nn.Module, object], SequenceLogprobs],
                         store: Callable[[object, float, float], None]) -> None:
    """Reference log-probs of every train and validation example, in one pass before training.

    Each batch's ``logprobs(module, batch)`` gives 2B sums, the first B for the examples' first sequences and the
    last B for their second ones; ``store(example, first, second)`` keeps them on the example, so every later
    batch carries them. With several processes every rank computes every example: simple, and a forward-only
    pass over the data. Recomputed (not read from disk) when a run resumes: it is deterministic, and the model at
    this point is always the starting one (checkpoints are loaded after ``prepare_model``).
    """
    was_training = model.training
    model.eval()
    batch_size = run.config.train.batch_size
    starts = [(examples, start) for examples in (run.data.train, run.data.validation)
              for start in range(0, len(examples), batch_size)]
    with ref.model(model) as module:
        for examples, start in progress(starts, "reference log-probs"):
            chunk = examples[start:start + batch_size]
            batch = data.batches(chunk, rank=0, world_size=1)[0]
            sums = logprobs(module, move(batch, run.device)).sums.cpu()
            count = len(chunk)
            for example, first, second in zip(chunk, sums[:count].tolist(), sums[count:2 * count].tolist()):
                store(example, first, second)
    model.train(was_training)
    kind = "examples" if data.unpaired else "pairs"
    run.log(f"reference log-probs precomputed for {len(run.data.train)} train and {len(run.data.validation)} "
            f"validation {kind}")


def weighted_stats(values: dict[str, torch.Tensor], weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """Named ``stat`` entries: each (B,) value summed with the (B,) weights, over the summed weights."""
    total = weights.sum()
    return {name: stat((value.detach().float() * weights).sum(), total) for name, value in values.items()}


def pair_stats(result: PreferenceLoss, chosen: torch.Tensor, rejected: torch.Tensor,
               weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """``PAIR_STATS`` of a micro-batch: the implicit rewards of each side, their margin, whether the pair is
    ranked right (margin > 0), and the policy's log-probs ``chosen`` / ``rejected`` (B,), weighted by the pairs'
    ``weights`` (placeholders count 0)."""
    margins = result.margins
    values = (result.chosen_rewards, result.rejected_rewards, margins, (margins > 0).float(), chosen, rejected)
    return weighted_stats(dict(zip(PAIR_STATS, values)), weights)
