"""Preference alignment: DPO and its loss variants (IPO, cDPO, rDPO, hinge), SimPO and ORPO from pairs, KTO from
unpaired rows.

The loop is SFT's (same engine: accumulation, clipping, checkpoints, resume, early stopping, DDP/FSDP); what
changes is below, top to bottom:

- data: one forward pass serves both sides of a pair: by default one row per pair, prompt + chosen + rejected,
  with rejected masked from chosen (the prompt runs once; ``data.shared_prompt``), else 2B rows, chosen then
  rejected;
- the reference: DPO and KTO compare the policy with the model they started from. With LoRA that is the same
  weights with the adapter switched off (no second copy); with full fine-tuning a frozen copy; with
  ``precompute_ref`` the reference log-probs are computed once before training and no reference is kept;
- the loss: the per-pair losses of ``tuneforge.losses``, summed with each pair's weight and divided by the pairs
  of the whole optimiser step on all ranks (ORPO's SFT term by the chosen tokens of the step), so the step's
  gradient does not depend on how the step is split into micro-batches or processes;
- the metrics: loss, implicit rewards of chosen and rejected, their margin, the fraction ranked right
  (accuracy), and the log-probs of both sides, for training steps and for validation.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence

import torch
import torch.distributed as dist

from tuneforge.data.prepare import read_preference_data, tokenize_preference_data
from tuneforge.engine.distributed import no_sync, reshard
from tuneforge.engine.step import autocast, kernel_mask, move
from tuneforge.errors import UserError
from tuneforge.losses import (PreferenceLoss, SequenceLogprobs, dpo_loss, kto_loss, orpo_odds_ratio_loss,
                              sequence_logprobs_from_hidden, simpo_loss)
from tuneforge.models.adapters import decoder_and_head, is_peft
from tuneforge.progress import progress
from tuneforge.recipes.sft import SFTRecipe

# Per-step statistics, summed over real pairs (or KTO examples) and divided by their count when logged.
PAIR_STATS = ("rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy", "logps_chosen",
              "logps_rejected")
KTO_STATS = ("rewards_desirable", "rewards_undesirable", "desirable", "logps", "kl")


def rows(sequences, start: int, stop: int):
    """Rows [start, stop) of a padded ``Batch`` (its counts are not needed downstream)."""
    return dataclasses.replace(sequences, input_ids=sequences.input_ids[start:stop],
                               targets=sequences.targets[start:stop],
                               attention_mask=sequences.attention_mask[start:stop],
                               position_ids=sequences.position_ids[start:stop])


class PreferenceRecipe(SFTRecipe):
    """``method: dpo | simpo | orpo | kto``. See the module docstring; the loop itself is :class:`SFTRecipe`'s."""

    reference_is_start = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.method = self.config.method
        self.unpaired = self.method == "kto"
        self.reference_model: torch.nn.Module | None = None
        self._last_stats: torch.Tensor | None = None
        self._last_count = 0

    @property
    def uses_reference(self) -> bool:
        return self.method in ("dpo", "kto")

    @property
    def shared_prompt(self) -> bool:
        """Pairs in one row each (prompt once); the reward model and KTO score whole separate sequences."""
        return self.config.data.shared_prompt and self.method in ("dpo", "simpo", "orpo")

    @property
    def precompute_ref(self) -> bool:
        section = self.config.kto if self.unpaired else self.config.dpo
        return self.uses_reference and section.precompute_ref

    # ------------------------------------------------------------------------------------------- data hooks
    def _read_data(self):
        return read_preference_data(self.config, unpaired=self.unpaired)

    def _tokenize_data(self, read):
        return tokenize_preference_data(read, self.config, self.tokenizer, self.template, unpaired=self.unpaired)

    def _epoch_batches(self, shuffle: bool, generator: torch.Generator | None = None) -> Sequence:
        from tuneforge.data.dataset import epoch_order, length_grouped
        from tuneforge.data.preference import make_preference_batches

        generator = (generator or self.data_generator) if shuffle and self.config.data.shuffle else None
        examples = self.data.train
        if self.config.data.group_by_length:
            def width(example) -> int:
                """The width ``example`` needs in a batch: its prompt + chosen + rejected row (shared prompt), or
                the longer of its two sequences."""
                if self.shared_prompt:
                    return len(example.chosen.input_ids) + len(example.rejected.input_ids) - example.prompt_length
                return max(len(side.input_ids) for side in self._sides(example))

            # Grouped in the epoch's order, then handed over in that order (no generator): every group but the last
            # is full, so make_preference_batches cuts the flat list back into the same global micro-batches.
            size = self.config.train.batch_size * self.dist.world_size
            groups = length_grouped(epoch_order(examples, generator), size, width, generator)
            examples, generator = [example for group in groups for example in group], None
        return make_preference_batches(examples, self.config.train.batch_size, self.tokenizer.pad_token_id,
                                       generator=generator, rank=self.dist.rank, world_size=self.dist.world_size,
                                       shared_prompt=self.shared_prompt)

    def _sequence_shape(self) -> tuple[int, int]:
        batch_size = self.config.train.batch_size
        if self.shared_prompt:  # one row per pair: prompt + chosen + rejected
            return batch_size, max(len(p.chosen.input_ids) + len(p.rejected.input_ids) - p.prompt_length
                                   for p in self.data.train)
        # Both sides (or the example and its KL partner) go through the model together: 2B sequences.
        longest = max(max(len(a.input_ids), len(b.input_ids)) for a, b in map(self._sides, self.data.train))
        return 2 * batch_size, longest

    @staticmethod
    def _sides(example):
        if hasattr(example, "chosen"):
            return example.chosen, example.rejected
        return example.example, example.kl_example

    def _window_tokens(self, window: list) -> int:
        return sum(batch.sequences.global_tokens for batch in window)

    # ------------------------------------------------------------------------------------------ model hooks
    def _before_wrap(self) -> None:
        """Set up the reference while the model is still the starting one (no checkpoint loaded) and whole (not yet
        sharded by FSDP). With several processes every rank precomputes every example: simple, and a forward-only
        pass over the data."""
        if not self.uses_reference:
            return
        if self.config.lora.enabled and not is_peft(self.model):
            raise UserError("LoRA preference training needs a PEFT model")  # impossible: _build_model adds one
        if self.precompute_ref:
            self._precompute_reference()
        elif not self.config.lora.enabled:
            # Full fine-tuning: a frozen copy of the starting weights.
            self.reference_model = copy.deepcopy(self.model).requires_grad_(False).eval()

    @torch.no_grad()
    def _precompute_reference(self) -> None:
        """Reference log-probs of every train and validation example, in one pass before training.

        Recomputed (not read from disk) when a run resumes: it is deterministic and the model at this point is
        always the starting one, for LoRA (adapter off) and full fine-tuning (checkpoint not loaded yet).
        """
        from tuneforge.data.preference import make_preference_batches

        was_training = self.model.training
        self.model.eval()
        pad = self.tokenizer.pad_token_id
        batch_size = self.config.train.batch_size
        starts = [(examples, start) for examples in (self.data.train, self.data.validation)
                  for start in range(0, len(examples), batch_size)]
        for examples, start in progress(starts, "reference log-probs"):
            chunk = examples[start:start + batch_size]
            batch = make_preference_batches(chunk, batch_size, pad, shared_prompt=self.shared_prompt)[0]
            logps = self._reference_logprobs(self.model, move(batch, self.device)).sums.cpu()
            first, second = logps[:len(chunk)].tolist(), logps[len(chunk):2 * len(chunk)].tolist()
            for example, a, b in zip(chunk, first, second):
                if self.unpaired:
                    example.ref_logp, example.ref_kl_logp = a, b
                else:
                    example.ref_chosen, example.ref_rejected = a, b
        self.model.train(was_training)
        self.log(f"reference log-probs precomputed for {len(self.data.train)} train and "
                 f"{len(self.data.validation)} validation {'examples' if self.unpaired else 'pairs'}")

    def _logprobs(self, model: torch.nn.Module, batch) -> SequenceLogprobs:
        """Response log-probs of each side of a ``PairBatch`` (2B values: chosen then rejected), or of each row of
        a padded ``Batch``. The output head sees response positions only."""
        sequences = getattr(batch, "sequences", batch)
        rejected_targets = getattr(batch, "rejected_targets", None)
        body, head = decoder_and_head(model)
        chunk = self.config.train.loss_chunk_size
        with autocast(self.device, self.bf16):
            inputs = sequences.model_inputs()
            inputs["attention_mask"] = kernel_mask(body, inputs["attention_mask"])
            hidden = body(**inputs, use_cache=False).last_hidden_state
            chosen = sequence_logprobs_from_hidden(hidden, sequences.targets, head, chunk)
            if rejected_targets is None:
                return chosen
            # Shared-prompt layout: both sides read the same hidden states, each with its own targets.
            rejected = sequence_logprobs_from_hidden(hidden, rejected_targets, head, chunk)
        return SequenceLogprobs(torch.cat([chosen.sums, rejected.sums]), torch.cat([chosen.counts, rejected.counts]))

    @torch.no_grad()
    def _reference_logprobs(self, model: torch.nn.Module, batch) -> SequenceLogprobs:
        if self.reference_model is not None:
            return self._logprobs(self.reference_model, batch)
        if self.config.lora.enabled:
            with model.disable_adapter():
                return self._logprobs(model, batch)
        return self._logprobs(model, batch)  # precomputing with full fine-tuning: the model is the start

    # ------------------------------------------------------------------------------------------------ loss
    def _loss_sum(self, model: torch.nn.Module, batch) -> dict:
        """The summed loss terms of one micro-batch and its summed statistics (runs inside the wrapped forward,
        so DDP and FSDP hooks see it). Keys: ``pair_loss`` (sum of weighted per-pair losses), ``nll`` (ORPO's
        summed chosen-token NLL, else absent), ``stats`` (summed ``PAIR_STATS`` / ``KTO_STATS``)."""
        if self.unpaired:
            return self._kto_terms(model, batch)
        config = self.config
        pairs = batch.num_pairs
        policy = self._logprobs(model, batch)
        chosen, rejected = policy.sums[:pairs], policy.sums[pairs:2 * pairs]
        out: dict = {}
        if self.method == "dpo":
            if batch.ref_chosen is not None:
                ref_chosen, ref_rejected = batch.ref_chosen, batch.ref_rejected
            else:
                ref = self._reference_logprobs(model, batch)
                ref_chosen, ref_rejected = ref.sums[:pairs], ref.sums[pairs:2 * pairs]
            sides = chosen, rejected, ref_chosen, ref_rejected
            if config.dpo.loss == "ipo":
                # IPO's target margin 1/(2 beta) is meant per token, so it compares per-token means (as TRL does).
                lengths = policy.counts.clamp(min=1)
                sides = tuple(side / lengths[:pairs] if i % 2 == 0 else side / lengths[pairs:2 * pairs]
                              for i, side in enumerate(sides))
            result = dpo_loss(*sides, config.dpo.beta, config.dpo.loss, config.dpo.label_smoothing)
        elif self.method == "simpo":
            result = simpo_loss(policy.means[:pairs], policy.means[pairs:2 * pairs], config.simpo.beta,
                                config.simpo.gamma)
        elif self.method == "orpo":
            means = policy.means[:pairs], policy.means[pairs:2 * pairs]
            losses = orpo_odds_ratio_loss(means[0], means[1], config.orpo.lam)
            # ORPO's implicit reward: lambda times the per-token mean log-prob (as TRL logs it).
            result = PreferenceLoss(losses, config.orpo.lam * means[0].detach(), config.orpo.lam * means[1].detach())
            out["nll"] = -(chosen * batch.weights).sum()
        else:
            raise UserError(f"method {self.method!r} is not a preference method")
        weights = batch.weights
        out["pair_loss"] = (result.losses * weights).sum()
        stats = torch.stack([result.chosen_rewards, result.rejected_rewards, result.margins,
                             (result.margins > 0).float(), chosen.detach(), rejected.detach()])
        out["stats"] = (stats * weights).sum(dim=1)
        return out

    def _kto_terms(self, model: torch.nn.Module, batch) -> dict:
        config = self.config.kto
        count = batch.num_examples
        examples = rows(batch.sequences, 0, count)
        policy = self._logprobs(model, examples).sums
        with torch.no_grad():
            # KTO's reference point z0 estimates KL(policy || reference) from mismatched (prompt, completion)
            # pairs; it is detached, so the policy's log-probs of those pairs need no graph.
            mismatched = rows(batch.sequences, count, 2 * count)
            policy_kl = self._logprobs(model, mismatched).sums
            if batch.ref_logps is not None:
                ref, ref_kl = batch.ref_logps, batch.ref_kl_logps
            else:
                ref = self._reference_logprobs(model, examples).sums
                ref_kl = self._reference_logprobs(model, mismatched).sums
            kl_sum = ((policy_kl - ref_kl) * batch.weights).sum()
            real = batch.weights.sum()
            if self.dist.enabled:
                # The paper averages the estimate over the whole batch, across processes.
                totals = torch.stack([kl_sum, real])
                dist.all_reduce(totals)
                kl_sum, real = totals[0], totals[1]
            z0 = kl_sum / real.clamp(min=1)
        result = kto_loss(policy, ref, batch.desirable, z0, config.beta, config.desirable_weight,
                          config.undesirable_weight)
        weights = batch.weights
        desirable = batch.desirable.float()
        stats = torch.stack([result.rewards * desirable, result.rewards * (1 - desirable), desirable,
                             policy.detach(), z0.expand_as(policy)])
        return {"pair_loss": (result.losses * weights).sum(), "stats": (stats * weights).sum(dim=1)}

    def compute_gradients(self, window: list) -> torch.Tensor:
        """Forward + backward over ``window``; each micro-batch's summed loss is divided by the real pairs (or
        examples) of the whole window on all ranks, times the world size (DDP / FSDP average over ranks)."""
        count = sum(self._global_count(batch) for batch in window)
        chosen_tokens = sum(getattr(batch, "global_chosen_tokens", 0) or 0 for batch in window)
        scale = self.dist.world_size / count
        loss_total = torch.zeros((), dtype=torch.float32, device=self.device)
        stats_total = None
        for index, batch in enumerate(window):
            with no_sync(self.wrapped, skip=index < len(window) - 1):
                out = self.wrapped(move(batch, self.device))
                loss = out["pair_loss"] * scale
                if "nll" in out:
                    loss = loss + out["nll"] * (self.dist.world_size / max(chosen_tokens, 1))
                loss.backward()
            loss_total += loss.detach() / self.dist.world_size
            stats_total = out["stats"] if stats_total is None else stats_total + out["stats"]
        self._last_stats, self._last_count = stats_total, count
        return loss_total

    @staticmethod
    def _global_count(batch) -> int:
        return batch.global_examples if hasattr(batch, "global_examples") else batch.global_pairs

    def _step_metrics(self) -> dict:
        if self._last_stats is None:
            return {}
        stats = self._last_stats.detach().clone()
        if self.dist.enabled:
            dist.all_reduce(stats)
        return self._named_stats(stats, self._last_count)

    def _named_stats(self, stats: torch.Tensor, count: int, prefix: str = "") -> dict:
        values = (stats / max(count, 1)).tolist()
        if not self.unpaired:
            return {prefix + name: value for name, value in zip(PAIR_STATS, values)}
        desirable_fraction = values[2]
        named = {prefix + "desirable_fraction": desirable_fraction, prefix + "logps": values[3],
                 prefix + "kl": values[4]}
        # Mean implicit reward within each class (the sums were over the class, the count over all examples).
        if desirable_fraction > 0:
            named[prefix + "rewards_desirable"] = values[0] / desirable_fraction
        if desirable_fraction < 1:
            named[prefix + "rewards_undesirable"] = values[1] / (1 - desirable_fraction)
        return named

    # ------------------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict | None:
        """Mean loss over the validation pairs (sharded over ranks) and the mean statistics, as ``val_*``."""
        if not self.data.validation:
            return None
        from tuneforge.data.preference import make_preference_batches

        batches = make_preference_batches(self.data.validation, self.config.train.batch_size,
                                          self.tokenizer.pad_token_id, rank=self.dist.rank,
                                          world_size=self.dist.world_size, shared_prompt=self.shared_prompt)
        was_training = self.model.training
        self.model.eval()
        totals = None
        count = 0
        chosen_tokens = 0
        for batch in progress(batches, "validation"):
            out = self.wrapped(move(batch, self.device))
            parts = [out["pair_loss"], out.get("nll", torch.zeros((), device=self.device)), *out["stats"]]
            row = torch.stack([p.float().reshape(()) for p in parts]).double()
            totals = row if totals is None else totals + row
            count += self._global_count(batch)
            chosen_tokens += getattr(batch, "global_chosen_tokens", 0) or 0
        self.model.train(was_training)
        reshard(self.wrapped)
        if self.dist.enabled:
            dist.all_reduce(totals)
        loss = float(totals[0]) / max(count, 1)
        if self.method == "orpo":
            loss += float(totals[1]) / max(chosen_tokens, 1)
        return {"val_loss": loss, **self._named_stats(totals[2:].float(), count, prefix="val_")}

    def _summary(self, stop_reason, signal_name) -> dict:
        summary = super()._summary(stop_reason, signal_name)
        summary["method"] = self.method
        return summary

