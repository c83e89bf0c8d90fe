"""What the TRL reference benchmarks share: step timing after a warm-up step, and counting the real tokens of
the batches the trainer actually sees. Imported by trl_sft.py and trl_dpo.py (run from this folder's scripts)."""

from __future__ import annotations

import time

import torch


def _sync() -> None:
    # CUDA work is asynchronous: without a sync the clock would stop before the last step's kernels ran.
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def step_timer(timed_steps: int, warmup_steps: int = 1):
    """A ``TrainerCallback`` timing steps warmup_steps + 1 .. warmup_steps + timed_steps (the first
    ``warmup_steps`` are untimed); ``elapsed`` is None until the last timed step ends."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.start = None
            self.elapsed = None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == warmup_steps:
                _sync()
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
                self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warmup_steps + timed_steps:
                _sync()
                self.elapsed = time.perf_counter() - self.start

    return StepTimer()


def count_batch_tokens(trainer) -> list[int]:
    """Wrap ``trainer``'s collator so that each batch's non-padding token count is appended to the returned list
    (in batch order: index 0 is the warm-up step's)."""
    counts: list[int] = []
    original = trainer.data_collator

    def counting_collator(features):
        batch = original(features)
        counts.append(int(batch["attention_mask"].sum()) if "attention_mask" in batch
                      else int(batch["input_ids"].numel()))
        return batch

    trainer.data_collator = counting_collator
    return counts
