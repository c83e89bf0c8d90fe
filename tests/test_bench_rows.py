"""``tuneforge bench``'s choice of rows (synthetic or alpaca-shaped), its switches, and the shared FLOP count."""

from __future__ import annotations

import json
import statistics

import pytest

from conftest import TINY
from tuneforge.bench import alpaca_rows, attention_flops, model_flops, packed_lengths, run_bench, synthetic_rows
from tuneforge.errors import ConfigError


def test_alpaca_rows_are_deterministic_and_differ_by_seed():
    assert alpaca_rows(16, seed=3) == alpaca_rows(16, seed=3)
    assert alpaca_rows(16, seed=3) != alpaca_rows(16, seed=4)
    assert alpaca_rows(8) == alpaca_rows(64)[:8]  # more rows extend the same sequence
    assert alpaca_rows(8) != synthetic_rows(8)


def test_alpaca_rows_have_alpaca_shape():
    rows = alpaca_rows(64)
    assert len(rows) == 64 and all(set(row) == {"prompt", "completion"} for row in rows)
    instructions = [row["prompt"].split("\n\nInput:")[0] for row in rows]
    with_input = [row for row in rows if "\n\nInput: " in row["prompt"]]
    assert 0.2 * len(rows) <= len(with_input) <= 0.6 * len(rows)  # alpaca has an input part in about 40%
    instruction_words = [len(text.split()) for text in instructions]
    output_words = [len(row["completion"].split()) for row in rows]
    assert all(6 <= n <= 36 for n in instruction_words)
    assert all(55 <= n <= 215 for n in output_words)
    assert statistics.mean(instruction_words) * 3 < statistics.mean(output_words)
    openings = {text.split()[0] for text in instructions}
    assert {"Explain", "Write", "List", "Summarise"} <= openings


def test_the_flop_count_is_the_documented_formula():
    n, n_lora, tokens = 1000, 50, 7
    assert model_flops(n, n_lora, full=True, tokens=tokens) == 6 * n * tokens
    assert model_flops(n, n_lora, full=False, tokens=tokens) == (4 * n + 6 * n_lora) * tokens
    layers, hidden = TINY["num_hidden_layers"], TINY["hidden_size"]
    # 6·layers·hidden·T per token of a row of T tokens: 6·layers·hidden·Σ T² over the rows.
    assert attention_flops(layers, hidden, [3, 4]) == 6 * layers * hidden * (9 + 16)
    assert model_flops(n, n_lora, False, 7, attention_flops(layers, hidden, [3, 4])) == \
        (4 * n + 6 * n_lora) * 7 + 6 * layers * hidden * 25


def test_packed_lengths_split_rows_at_position_restarts():
    import torch

    assert packed_lengths(torch.tensor([[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]])) == [3, 2, 5]
    assert packed_lengths(torch.tensor([0, 1, 0, 1, 2, 3])) == [2, 4]  # TRL's padding-free batch: one row


def test_sft_bench_on_alpaca_rows_reports_its_row_set_and_switches(tiny_model_dir):
    result = run_bench(model=str(tiny_model_dir), batch_size=2, max_length=128, steps=1, lora_r=4, rows=4,
                       rows_shape="alpaca", warmup_steps=0)
    assert json.loads(json.dumps(result)) == result
    assert result["row_set"] == "alpaca" and result["tokens_per_s"] > 0
    assert result["fused_lora"] is True and result["fused_activations"] is True
    plain = run_bench(model=str(tiny_model_dir), batch_size=2, max_length=128, steps=1, lora_r=4, rows=4,
                      warmup_steps=0, fused_lora=False, fused_activations=False)
    assert plain["row_set"] == "synthetic"
    assert plain["fused_lora"] is False and plain["fused_activations"] is False


@pytest.mark.parametrize("method", ["dpo", "grpo", "gkd"])
def test_alpaca_rows_are_refused_for_methods_with_their_own_workload(tiny_model_dir, method):
    with pytest.raises(ConfigError, match=f"--row-set alpaca applies to methods on rows .*method {method} keeps"):
        run_bench(method=method, model=str(tiny_model_dir), rows_shape="alpaca")


def test_an_unknown_row_set_is_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="rows_shape must be one of synthetic, alpaca, not 'dolly'"):
        run_bench(model=str(tiny_model_dir), rows_shape="dolly")


def test_cli_bench_takes_the_row_set_and_switches(monkeypatch, capsys):
    import tuneforge.bench
    from tuneforge.cli import main

    seen = {}
    monkeypatch.setattr(tuneforge.bench, "run_bench", lambda **kwargs: seen.update(kwargs) or {"ok": True})
    assert main(["bench", "--row-set", "alpaca", "--no-fused-lora", "--no-fused-activations"]) in (0, None)
    assert seen["rows_shape"] == "alpaca" and seen["fused_lora"] is False and seen["fused_activations"] is False
    assert json.loads(capsys.readouterr().out) == {"ok": True}
