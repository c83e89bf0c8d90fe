"""``data.group_by_length``: micro-batches of rows of similar length. Every row once per epoch, less padding than
plain shuffled batches, the same batches from the same seed, exact resume, and the config's refusals."""

from __future__ import annotations

import random

import pytest
import torch
from safetensors.torch import load_file

from tuneforge.config import config_from_dict
from tuneforge.data.dataset import MEGA_BATCH_GROUPS, epoch_order, length_grouped, make_batches, sequence_length
from tuneforge.data.tokenize import Example
from tuneforge.engine import checkpoint as ckpt
from tuneforge.engine.metrics import read_metrics
from tuneforge.errors import ConfigError
from tuneforge.losses import IGNORE_INDEX
from tuneforge.engine.trainer import Trainer, run_training

from conftest import write_jsonl

PAD = 0


def rows_of_random_lengths(count: int, seed: int = 0, shortest: int = 4, longest: int = 120) -> list[Example]:
    """``count`` examples whose ``row`` is their index, of random lengths in [shortest, longest]."""
    lengths = random.Random(seed).choices(range(shortest, longest + 1), k=count)
    return [Example(list(range(1, n + 1)), [IGNORE_INDEX] + list(range(2, n + 1)), row=i)
            for i, n in enumerate(lengths)]


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def padding_tokens(batches) -> int:
    """Sum over micro-batches of width × rows − real tokens."""
    return sum(batch.input_ids.numel() - batch.num_tokens for batch in batches)


def rows_per_batch(batches) -> list[list[int]]:
    return [[example.row for example in group] for group in batches.groups]


# ------------------------------------------------------------------------------------------- the grouping
@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("seed", [None, 0, 1])
def test_every_row_appears_exactly_once_per_epoch(seed, world_size):
    examples = rows_of_random_lengths(157)  # not a multiple of the global batch: a short last micro-batch
    batch_size, trained = 3, 0
    for rank in range(world_size):
        batches = make_batches(examples, batch_size, PAD, generator=None if seed is None else generator(seed),
                               rank=rank, world_size=world_size, group_by_length=True)
        assert sorted(row for group in rows_per_batch(batches) for row in group) == list(range(len(examples)))
        # What the ranks train: their slices of each global micro-batch (a placeholder trains nothing).
        trained += sum(batch.num_trained for batch in batches)
    assert trained == sum(e.num_trained for e in examples)
    size = batch_size * world_size
    groups = make_batches(examples, batch_size, PAD, generator=generator(), world_size=world_size,
                          group_by_length=True).groups
    assert [len(group) for group in groups] == [size] * (len(examples) // size) + [len(examples) % size]


def test_grouping_pads_less_than_plain_shuffled_batches():
    examples = rows_of_random_lengths(300)
    plain = make_batches(examples, 4, PAD, generator=generator())
    grouped = make_batches(examples, 4, PAD, generator=generator(), group_by_length=True)
    assert len(grouped) == len(plain)
    assert sum(b.num_tokens for b in grouped) == sum(b.num_tokens for b in plain)
    # Lengths uniform in [4, 120]: plain batches of 4 pad about 40% of their width, grouped ones almost nothing.
    assert padding_tokens(grouped) < padding_tokens(plain) / 5


def test_same_seed_gives_the_same_batches_and_another_seed_another_order():
    examples = rows_of_random_lengths(120)
    first = make_batches(examples, 4, PAD, generator=generator(5), group_by_length=True)
    again = make_batches(examples, 4, PAD, generator=generator(5), group_by_length=True)
    other = make_batches(examples, 4, PAD, generator=generator(6), group_by_length=True)
    assert rows_per_batch(first) == rows_per_batch(again)
    assert rows_per_batch(first) != rows_per_batch(other)
    for got, want in zip(first, again):
        assert torch.equal(got.input_ids, want.input_ids) and torch.equal(got.targets, want.targets)


def test_micro_batches_are_sorted_inside_and_shuffled_between():
    examples = rows_of_random_lengths(200)
    groups = length_grouped(epoch_order(examples, generator(2)), 4, sequence_length, generator(3))
    for group in groups:
        lengths = [sequence_length(e) for e in group]
        assert lengths == sorted(lengths, reverse=True)
    widths = [sequence_length(group[0]) for group in groups]
    # The step order is not the sort order (long to short), which would make the first steps all long.
    assert widths != sorted(widths, reverse=True)


def test_without_a_generator_the_grouping_is_the_sort_of_each_mega_batch():
    examples = rows_of_random_lengths(2 * 4 * MEGA_BATCH_GROUPS + 10)  # two full mega-batches and a bit
    batches = make_batches(examples, 4, PAD, group_by_length=True)
    assert rows_per_batch(batches) == rows_per_batch(make_batches(examples, 4, PAD, group_by_length=True))
    mega = 4 * MEGA_BATCH_GROUPS
    flat = [example for group in batches.groups for example in group]
    for start in range(0, len(examples), mega):
        chunk = flat[start:start + mega]
        assert sorted(e.row for e in chunk) == list(range(start, min(start + mega, len(examples))))
        assert [sequence_length(e) for e in chunk] == sorted((sequence_length(e) for e in chunk), reverse=True)


def test_rows_only_meet_rows_of_their_own_mega_batch():
    # Grouping sorts inside mega-batches of the shuffled order, not the whole epoch: which rows can share a
    # micro-batch still changes from epoch to epoch.
    examples = rows_of_random_lengths(3 * 2 * MEGA_BATCH_GROUPS + 7)
    size, mega = 2, 2 * MEGA_BATCH_GROUPS
    position = {e.row: i for i, e in enumerate(epoch_order(examples, generator(4)))}
    groups = make_batches(examples, size, PAD, generator=generator(4), group_by_length=True).groups
    for group in groups:
        assert len({position[e.row] // mega for e in group}) == 1
    # Flattened and cut again, the grouping gives the same micro-batches (the preference recipe relies on it).
    flat = [e for group in groups for e in group]
    assert [[e.row for e in flat[i:i + size]] for i in range(0, len(flat), size)] == \
        [[e.row for e in group] for group in groups]


def test_grouping_draws_a_fixed_amount_from_the_generator():
    # The planned step count is computed on a copy of the data generator: the epoch's draws must not depend on
    # anything but the generator's state.
    examples = rows_of_random_lengths(90)
    a, b = generator(9), generator(9)
    make_batches(examples, 4, PAD, generator=a, group_by_length=True)
    make_batches(examples, 4, PAD, generator=b, group_by_length=True)
    assert torch.equal(a.get_state(), b.get_state())


# --------------------------------------------------------------------------------------------------- config
def config_values(train_file, **data):
    return {"data": {"train": str(train_file), **data}}


def test_group_by_length_is_off_by_default_and_validated(tmp_path):
    assert config_from_dict(config_values(tmp_path / "rows.jsonl")).data.group_by_length is False
    assert config_from_dict(config_values(tmp_path / "rows.jsonl", group_by_length=True)).data.group_by_length
    with pytest.raises(ConfigError, match="data.group_by_length: expected true or false"):
        config_from_dict(config_values(tmp_path / "rows.jsonl", group_by_length="yes"))


def test_packing_and_group_by_length_are_refused_together(tmp_path):
    with pytest.raises(ConfigError, match="data.group_by_length and data.packing"):
        config_from_dict(config_values(tmp_path / "rows.jsonl", group_by_length=True, packing=True))


def test_group_by_length_is_refused_for_online_rl(tmp_path):
    values = {**config_values(tmp_path / "rows.jsonl", group_by_length=True), "method": "grpo",
              "grpo": {"reward_functions": ["tuneforge.rewards.functions:exact_answer"]}}
    with pytest.raises(ConfigError, match="data.group_by_length: method grpo"):
        config_from_dict(values)


# ------------------------------------------------------------------------------------------- in the recipes
WORDS = "the quick brown fox jumps over the lazy dog while seven small birds sing old songs".split()
VARIED_ROWS = [
    {"messages": [{"role": "user", "content": " ".join(WORDS[: 1 + (7 * i) % 15])},
                  {"role": "assistant", "content": " ".join(WORDS[: 1 + (5 * i + 3) % 16])}]}
    for i in range(12)
]


def quiet(_message):
    pass


def test_sft_recipe_batches_are_grouped_and_planned(make_config, tmp_path):
    rows = write_jsonl(tmp_path / "varied.jsonl", VARIED_ROWS)
    recipe = Trainer(make_config(rows, data={"group_by_length": True}, train={"batch_size": 2, "epochs": 2}),
                       log=quiet, show_progress=False, run_dir=False)
    recipe.setup()
    assert recipe.total_steps == 12
    state = recipe.data_generator.get_state()
    batches = recipe.epoch_batches(shuffle=True)
    plain = make_batches(recipe.data.train, 2, recipe.tokenizer.pad_token_id, generator=generator(0))
    assert sorted(e.row for group in batches.groups for e in group) == sorted(e.row for e in recipe.data.train)
    assert padding_tokens(batches) < padding_tokens(plain)
    recipe.data_generator.set_state(state)
    assert rows_per_batch(recipe.epoch_batches(shuffle=True)) == rows_per_batch(batches)


def train_losses(run_dir) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def test_resume_with_group_by_length_continues_exactly(make_config, tmp_path):
    # 12 rows, batch 2: 6 steps per epoch, 2 epochs. Resume from step 8 (inside epoch 2, whose order is drawn
    # from the generator state saved at the epoch's start) and compare with the uninterrupted run.
    rows = write_jsonl(tmp_path / "varied.jsonl", VARIED_ROWS)
    config = make_config(rows, data={"group_by_length": True},
                         train={"batch_size": 2, "epochs": 2, "lr": 1e-2, "scheduler": "cosine", "warmup_steps": 1},
                         save={"every": 1, "keep_last": 20}, eval={"final": "last"})
    run_dir = tmp_path / "run"
    run_training(config, log=quiet)
    reference = train_losses(run_dir)
    assert [step for step, _ in reference] == list(range(1, 13))
    want = load_file(str(ckpt.checkpoint_dir(run_dir, 12) / "weights.safetensors"))

    messages = []
    run_training(config, log=messages.append, resume=str(ckpt.checkpoint_dir(run_dir, 8)))
    assert any(m.startswith(f"resumed from {ckpt.checkpoint_dir(run_dir, 8)} at step 8") for m in messages)
    resumed = train_losses(run_dir)
    assert [step for step, _ in resumed] == [step for step, _ in reference]
    for (step, got), (_, expected) in zip(resumed, reference):
        assert got == pytest.approx(expected, abs=1e-6), f"step {step}"
    got = load_file(str(ckpt.checkpoint_dir(run_dir, 12) / "weights.safetensors"))
    assert got.keys() == want.keys()
    for name in want:
        assert (got[name] - want[name]).abs().max().item() <= 1e-6, name


def test_preference_batches_are_grouped(tiny_model_dir, tmp_path):
    pairs = [{"prompt": " ".join(WORDS[: 1 + (3 * i) % 11]), "chosen": " ".join(WORDS[: 1 + (5 * i) % 16]),
              "rejected": "No: " + " ".join(WORDS[: 1 + (7 * i + 2) % 16])} for i in range(24)]
    values = {"method": "dpo", "model": {"name_or_path": str(tiny_model_dir)},
              "data": {"train": str(write_jsonl(tmp_path / "pairs.jsonl", pairs)), "max_length": 64},
              "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
              "train": {"output_dir": str(tmp_path / "run"), "epochs": 1, "batch_size": 4, "seed": 0,
                        "mixed_precision": "no"}}

    def batches(group_by_length: bool, shared_prompt: bool):
        values["data"].update(group_by_length=group_by_length, shared_prompt=shared_prompt)
        trainer = Trainer(config_from_dict(values), log=quiet, show_progress=False, run_dir=False)
        trainer.setup()
        return trainer, trainer.epoch_batches(shuffle=True)

    for shared_prompt in (True, False):
        trainer, grouped = batches(True, shared_prompt)
        _, plain = batches(False, shared_prompt)
        assert len(grouped) == len(plain) == trainer.total_steps == 6
        pairs_seen = sorted(p.chosen.row for group in grouped.groups for p in group)
        assert pairs_seen == sorted(p.chosen.row for p in trainer.data.train)
        width = sum(b.sequences.input_ids.numel() - b.sequences.num_tokens for b in grouped)
        assert width < sum(b.sequences.input_ids.numel() - b.sequences.num_tokens for b in plain)
