"""Batches: per-sample next-token targets, padding, packing with a block-diagonal causal mask."""

from __future__ import annotations

import torch

from tuneforge.data.collate import collate_packed, collate_padded, next_token_targets, pack_examples
from tuneforge.data.dataset import make_batches
from tuneforge.data.tokenize import Example
from tuneforge.losses import IGNORE_INDEX

I = IGNORE_INDEX
PAD = 0


def example(ids, labels, row=0):
    return Example(list(ids), list(labels), row=row)


def test_next_token_targets():
    assert next_token_targets([I, I, 12, 13]) == [I, 12, 13, I]
    assert next_token_targets([5]) == [I]


def test_collate_padded_shifts_per_sample_and_ignores_padding():
    a = example([10, 11, 12, 13], [I, I, 12, 13])
    b = example([20, 21], [I, 21])
    batch = collate_padded([a, b], pad_id=PAD)
    assert batch.input_ids.tolist() == [[10, 11, 12, 13], [20, 21, PAD, PAD]]
    assert batch.targets.tolist() == [[I, 12, 13, I], [21, I, I, I]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 0, 0]]
    assert (batch.num_tokens, batch.num_trained) == (6, 3)
    assert batch.targets.dtype == batch.input_ids.dtype == torch.long


def test_collate_padded_pad_id_equal_to_a_trained_token_changes_nothing():
    """Padding with the EOS id (SmolLM2 pads with EOS) must not touch a real trained EOS."""
    eos = 2
    a = example([10, 11, eos], [I, 11, eos])
    b = example([20, 21, 22, 23, eos], [I, I, 22, 23, eos])
    batch = collate_padded([a, b], pad_id=eos)
    assert batch.targets.tolist() == [[11, eos, I, I, I], [I, 22, 23, eos, I]]
    assert batch.num_trained == 5


def test_collate_packed_block_diagonal_mask_and_positions():
    a = example([10, 11, 12], [I, 11, 12])
    b = example([20, 21], [I, 21])
    c = example([30, 31, 32, 33, 34, 35], [I, I, 32, 33, 34, 35])  # a longer pack sets the width to 6
    batch = collate_packed([[a, b], [c]], pad_id=PAD)

    assert batch.input_ids.tolist() == [[10, 11, 12, 20, 21, PAD], [30, 31, 32, 33, 34, 35]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]
    # No target at a sample's last position: 12 (end of a) is never trained to predict 20 (start of b).
    assert batch.targets.tolist() == [[11, 12, I, 21, I, I], [I, 32, 33, 34, 35, I]]
    assert batch.attention_mask.shape == (2, 1, 6, 6) and batch.attention_mask.dtype == torch.bool
    T, F = True, False
    assert batch.attention_mask[0, 0].tolist() == [
        [T, F, F, F, F, F],
        [T, T, F, F, F, F],
        [T, T, T, F, F, F],
        [F, F, F, T, F, F],
        [F, F, F, T, T, F],
        [F, F, F, F, F, T],  # padding attends to itself only, so its softmax stays finite
    ]
    assert torch.equal(batch.attention_mask[1, 0], torch.tril(torch.ones(6, 6, dtype=torch.bool)))
    assert (batch.num_tokens, batch.num_trained) == (11, 7)


def test_packed_and_padded_batches_have_the_same_targets_per_sample():
    examples = [example([1, 2, 3], [I, 2, 3]), example([4, 5, 6, 7], [I, I, 6, 7]), example([8, 9], [I, 9])]
    padded = collate_padded(examples, pad_id=PAD)
    packed = collate_packed([examples], pad_id=PAD)
    per_sample = [padded.targets[i, :len(e.input_ids)].tolist() for i, e in enumerate(examples)]
    assert sum(per_sample, []) == packed.targets[0].tolist()
    assert padded.num_trained == packed.num_trained == 5


def test_pack_examples_next_fit_never_exceeds_max_length():
    lengths = [3, 2, 4, 1, 5, 5]
    examples = [example(range(n), [I] * n, row=i) for i, n in enumerate(lengths)]
    packs = pack_examples(examples, max_length=5)
    assert [[e.row for e in pack] for pack in packs] == [[0, 1], [2, 3], [4], [5]]
    assert all(sum(len(e.input_ids) for e in pack) <= 5 for pack in packs)


def test_make_batches_order_is_reproducible_from_the_generator():
    examples = [example([i, i + 1], [I, i + 1], row=i) for i in range(10)]
    first = make_batches(examples, 3, PAD, generator=torch.Generator().manual_seed(1))
    again = make_batches(examples, 3, PAD, generator=torch.Generator().manual_seed(1))
    assert [b.input_ids.tolist() for b in first] == [b.input_ids.tolist() for b in again]
    assert [b.input_ids.shape[0] for b in first] == [3, 3, 3, 1]
    in_order = make_batches(examples, 4, PAD)
    assert in_order[0].input_ids[:, 0].tolist() == [0, 1, 2, 3]
    firsts = sorted(int(t) for b in first for t in b.input_ids[:, 0])
    assert firsts == list(range(10))  # a permutation: every row once


def test_make_batches_packing():
    examples = [example(range(n), [I] + list(range(1, n)), row=n) for n in (3, 2, 4, 4)]
    batches = make_batches(examples, 2, PAD, packing=True, max_length=6)
    # Packs (next-fit, max 6 tokens): [3+2], [4], [4] -> batches of 2 packs and 1 pack.
    assert [b.attention_mask.shape for b in batches] == [(2, 1, 5, 5), (1, 1, 4, 4)]
    assert batches[0].position_ids.tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert sum(b.num_tokens for b in batches) == 13
