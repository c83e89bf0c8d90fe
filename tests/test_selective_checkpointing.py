"""train.checkpoint_fraction: activation checkpointing on a share of the decoder layers only."""

from __future__ import annotations

import pytest

from conftest import build_tiny_model
from test_training import (assert_same_grads, gradients, make_recipe, only_window, randomise_lora_b,  # noqa: F401
                           varied_file)


def checkpointed_flags(recipe) -> list[bool]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m.gradient_checkpointing for m in recipe.model.modules() if isinstance(m, GradientCheckpointingLayer)]


@pytest.fixture(scope="module")
def four_layer_model_dir(tmp_path_factory, tokenizer):
    out = tmp_path_factory.mktemp("tiny-4-layers")
    build_tiny_model(tokenizer, num_hidden_layers=4).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.parametrize("fraction, expected", [(1.0, [True, True, True, True]), (0.5, [False, True, False, True]),
                                                (0.75, [False, True, True, True]), (0.25, [False, False, False, True])])
def test_the_fraction_picks_evenly_spread_layers(make_config, varied_file, four_layer_model_dir, fraction, expected):
    config = make_config(varied_file, model={"name_or_path": str(four_layer_model_dir)},
                         train={"gradient_checkpointing": True, "checkpoint_fraction": fraction})
    assert checkpointed_flags(make_recipe(config)) == expected


def test_partial_checkpointing_gives_the_same_gradients(make_config, varied_file):
    results = []
    for train in ({}, {"gradient_checkpointing": True, "checkpoint_fraction": 0.5}):
        recipe = make_recipe(make_config(varied_file, lora={"dropout": 0.1}, train={"batch_size": 8, **train}))
        randomise_lora_b(recipe.model)
        results.append((checkpointed_flags(recipe), gradients(recipe, only_window(recipe))))
    (flags, (loss, grads)), (flags_gc, (loss_gc, grads_gc)) = results
    assert flags == [False, False] and flags_gc == [False, True]  # one of the two layers recomputes
    assert loss_gc == pytest.approx(loss, rel=1e-6)
    assert_same_grads(grads_gc, grads)
