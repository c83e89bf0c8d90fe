"""``eval.generation_data``: held-out prompts the model answers greedily at each evaluation of a training run,
scored with the metrics of ``tuneforge eval`` and logged as ``val_gen_<name>``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from tuneforge.config import GENERATION_METRICS, GENERATION_PREFIX, DataConfig, EvalConfig
from tuneforge.data.memory import InMemoryRows
from tuneforge.engine.distributed import DistInfo
from tuneforge.engine.step import autocast
from tuneforge.errors import ConfigError, DataError
from tuneforge.eval.evaluate import answer_metrics, check_patterns, generation_metrics
from tuneforge.eval.heldout import HeldoutRow, read_heldout
from tuneforge.generation import Generation, Generator
from tuneforge.rewards.functions import RewardFunctions, load_callable


@dataclass
class GenerationEvaluation:
    """The prompts of ``eval.generation_data`` (its first ``eval.generation_rows``) and the user metrics."""

    settings: EvalConfig
    rows: list[HeldoutRow]
    functions: RewardFunctions | None

    @classmethod
    def read(cls, settings: EvalConfig, system_prompt: str | None,
             log: Callable[[str], None]) -> GenerationEvaluation | None:
        """Read the rows and import the user metrics, so a bad file, row or metric fails before the model loads;
        None when ``eval.generation_data`` is not set."""
        path = settings.generation_data
        if not path:
            return None
        if not isinstance(path, InMemoryRows) and not Path(path).exists():
            raise ConfigError(f"eval.generation_data: file {path} does not exist")
        rows = read_heldout(path, DataConfig(train=path, system_prompt=system_prompt)).rows
        rows = rows[:settings.generation_rows]
        if not rows:
            raise DataError(path, None, None, "no prompt to answer (rows need a prompt, or a user message before "
                            "an assistant one)", "no_prompts")
        check_patterns(rows)
        # The metrics these rows can give (a reference metric needs a row with a reference, regex_match a row with
        # a pattern): generation_metrics' own rule, applied to empty answers.
        available = generation_metrics(rows, [Generation("", False, 0)] * len(rows), set(GENERATION_METRICS))
        for name in settings.generation_metrics:
            if name in GENERATION_METRICS and name not in available:
                need = "a 'pattern' field" if name == "regex_match" else "a reference response"
                raise DataError(path, None, None, f"eval.generation_metrics: {name} needs rows with {need}, and none "
                                f"of the first {len(rows)} rows has one; drop {name} or use other rows", "no_reference")
        users = {key[len(GENERATION_PREFIX):]: load_callable(spec)
                 for key, spec in settings.generation_keys().items() if ":" in spec}
        log(f"generation evaluation: {len(rows)} prompts of {path}, up to {settings.max_new_tokens} new tokens, "
            f"greedy; {', '.join(settings.generation_keys())}")
        return cls(settings, rows, RewardFunctions(users) if users else None)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, tokenizer, template, dist_info: DistInfo, bf16: bool,
                 batch_size: int) -> dict[str, float]:
        """Greedy answers of ``model`` (adapter on, eval mode) to the rows, each rank answering its share, and
        their metrics as ``val_gen_<name>``; every rank computes them on all the answers, so all agree (early
        stopping must stop every rank at the same step)."""
        world = dist_info.world_size
        prompts = [row.prompt for row in self.rows[dist_info.rank::world]]
        generator = Generator(model, tokenizer, template, dist_info.device)
        was_training = model.training
        model.eval()
        try:
            with autocast(dist_info.device, bf16):
                answers = generator.generate_responses(prompts, self.settings.max_new_tokens, batch_size=batch_size,
                                                       progress="answers")
        finally:
            model.train(was_training)
        if dist_info.enabled:
            shares: list = [None] * world
            dist.all_gather_object(shares, answers)
            answers = [None] * len(self.rows)
            for rank, share in enumerate(shares):
                answers[rank::world] = share
        result = answer_metrics(self.rows, answers, set(self.settings.generation_metrics), self.functions, template)
        return {GENERATION_PREFIX + name: value for name, value in result.items()}
