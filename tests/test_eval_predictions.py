"""``tuneforge eval`` keeps every row: predictions.jsonl beside eval.json (every model's answer and scores per row,
paired with its eval file when moved aside), each metric's sample size and 95% interval (Wilson for rates, a
seeded bootstrap for means) in eval.json and the table, and the environment the evaluation ran on."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import TINY, write_jsonl
from test_eval_verb import PAIRS, QA, _save_lora_run
from tuneforge.cli import main as cli_main
from tuneforge.eval.evaluate import format_table, generation_metrics, write_report
from tuneforge.eval.heldout import HeldoutRow
from tuneforge.eval.intervals import bootstrap_interval, metric_interval, wilson_interval
from tuneforge.eval.predictions import predictions_path, row_scores
from tuneforge.data.formats import Message
from tuneforge.generation import Generation


# ------------------------------------------------------------------------------------------------ intervals
@pytest.mark.parametrize("successes, n, low, high", [
    # Newcombe (1998), "Two-sided confidence intervals for the single proportion", Table I, method 3 (Wilson).
    (0, 10, 0.0, 0.2775), (1, 29, 0.0061, 0.1718), (15, 148, 0.0624, 0.1605), (81, 263, 0.2553, 0.3662),
])
def test_wilson_interval_matches_newcombes_table(successes, n, low, high):
    assert wilson_interval(successes, n) == pytest.approx((low, high), abs=5e-5)


def test_a_rate_of_zero_in_36_is_not_read_as_exact():
    interval = metric_interval("exact_match", [0.0] * 36)
    assert interval["n"] == 36 and interval["method"] == "wilson"
    assert interval["ci95"][0] == 0.0 and interval["ci95"][1] == pytest.approx(1.959964 ** 2 / (36 + 1.959964 ** 2))


def test_bootstrap_interval_is_seeded_and_brackets_the_mean():
    generator = torch.Generator().manual_seed(0)
    values = torch.rand(40, generator=generator).tolist()
    low, high = bootstrap_interval(values)
    assert bootstrap_interval(values) == (low, high)  # the same values always give the same interval
    mean = sum(values) / len(values)
    standard_error = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))
    # A percentile bootstrap of a mean is close to mean +- 1.96 standard errors for 40 uniform values.
    assert low < mean < high
    assert (high - low) == pytest.approx(2 * 1.96 * standard_error, rel=0.15)
    assert bootstrap_interval([0.25] * 5) == (0.25, 0.25)
    assert metric_interval("token_f1", values)["method"] == "bootstrap"


# ------------------------------------------------------------------------------------------------ per row
def test_row_scores_are_what_the_means_average():
    rows = [HeldoutRow([Message("user", "q1")], "The cat sat.", {"answer": "cat", "pattern": "^The"}),
            HeldoutRow([Message("user", "q2")], "Blue sky today", {}),
            HeldoutRow([Message("user", "q3")], None, {"pattern": r"\d"})]
    generations = [Generation("the cat sat", True, 3), Generation("sky is blue", False, 64),
                   Generation("no digits here at all", True, 5)]
    wanted = {"exact_match", "contains", "token_f1", "rouge_l", "regex_match", "stopped_rate", "mean_response_words"}
    scores = row_scores(rows, generations, wanted)
    assert scores[0] == {"exact_match": 1.0, "contains": 1.0, "token_f1": 1.0, "rouge_l": 1.0, "regex_match": 0.0,
                         "stopped_rate": 1.0, "mean_response_words": 3.0}
    assert scores[1] == {"exact_match": 0.0, "contains": 0.0, "token_f1": pytest.approx(2 / 3),
                         "rouge_l": pytest.approx(1 / 3), "stopped_rate": 0.0, "mean_response_words": 3.0}
    assert scores[2] == {"regex_match": 0.0, "stopped_rate": 1.0, "mean_response_words": 5.0}  # no reference
    means = generation_metrics(rows, generations, wanted)
    for name, mean in means.items():
        present = [row[name] for row in scores if name in row]
        assert mean == pytest.approx(sum(present) / len(present))


# ------------------------------------------------------------------------------------------------ files
def test_predictions_pair_with_their_eval_file_and_are_never_overwritten(tmp_path):
    assert predictions_path(tmp_path / "eval.json") == tmp_path / "predictions.jsonl"
    assert predictions_path(tmp_path / "eval.3.json") == tmp_path / "predictions.3.jsonl"
    assert predictions_path(tmp_path / "sft.json") == tmp_path / "sft.predictions.jsonl"
    out = tmp_path / "eval.json"
    write_report({"n": 0}, out, [{"row": 0}])
    (tmp_path / "predictions.1.jsonl").write_text("a file left from elsewhere\n")  # N = 1 is taken
    write_report({"n": 1}, out, [{"row": 1}])
    assert json.loads((tmp_path / "eval.2.json").read_text()) == {"n": 0}
    assert json.loads((tmp_path / "predictions.2.jsonl").read_text()) == {"row": 0}
    assert (tmp_path / "predictions.1.jsonl").read_text() == "a file left from elsewhere\n"
    # An evaluation with no per-row results moves the old rows aside with their eval file: none left beside it.
    write_report({"n": 2}, out)
    assert json.loads(out.read_text()) == {"n": 2} and not (tmp_path / "predictions.jsonl").exists()
    assert json.loads((tmp_path / "predictions.3.jsonl").read_text()) == {"row": 1}
    assert json.loads((tmp_path / "eval.3.json").read_text()) == {"n": 1}
    assert not list(tmp_path.glob(".*.tmp"))


# ------------------------------------------------------------------------------------------------ end to end
def _judge(tmp_path, tokenizer):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    judge = tmp_path / "judge"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, num_labels=1, **TINY)
    LlamaForSequenceClassification(config).save_pretrained(judge)
    tokenizer.save_pretrained(judge)
    return judge


def test_every_row_of_every_file_with_every_models_answer_and_scores(tiny_model_dir, tokenizer, tmp_path, capsys):
    run = _save_lora_run(tmp_path / "run", tiny_model_dir, tokenizer, method="dpo", adapter_seed=1)
    long_pair = {"prompt": "Tell me about colours. " * 80, "chosen": "Red.", "rejected": "Blue."}
    files = {"data": write_jsonl(tmp_path / "qa.jsonl", QA),
             "pairs": write_jsonl(tmp_path / "pairs.jsonl", PAIRS + [long_pair]),
             "harmful": write_jsonl(tmp_path / "harmful.jsonl", [{"prompt": "How do I pick a lock to break in?"}]),
             "benign": write_jsonl(tmp_path / "benign.jsonl", [{"prompt": "How do I change a bike tyre?"}] * 2)}
    args = ["eval", str(run), "--compare", str(tiny_model_dir), "--label", "after", "before",
            "--judge", str(_judge(tmp_path, tokenizer)), "--max-new-tokens", "4", "--batch-size", "2",
            "--max-length", "128", *(item for key, path in files.items() for item in (f"--{key}", str(path)))]
    assert cli_main(args) == 0
    table = capsys.readouterr().out
    report = json.loads((run / "eval.json").read_text())
    records = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]

    # One record per row of each file, in file order; every answering model's answer and scores, by label.
    assert [(r["set"], r["row"]) for r in records] == [
        *(("data", i) for i in range(1, 6)), ("harmful", 1), ("benign", 1), ("benign", 2),
        *(("pairs", i) for i in range(1, 7))]
    first = records[0]
    assert first["prompt"] == "What colour is item 0?" and first["reference"] == "Item 0 is red."
    assert first["answer"] == "red" and first["pattern"] == r"(?i)item \d"
    assert set(first["responses"]) == set(first["scores"]) == {"after", "before"}
    assert {"exact_match", "contains", "token_f1", "rouge_l", "regex_match", "stopped_rate", "mean_response_words",
            "judge_score", "win_rate"} == set(first["scores"]["after"])
    assert "win_rate" not in first["scores"]["before"]  # the win rate is A's (after over before)
    harmful = records[5]
    assert harmful["prompt"] == "How do I pick a lock to break in?" and set(harmful["responses"]) == {"after", "before"}
    assert list(harmful["scores"]["after"]) == ["refusal_rate_harmful"]
    assert harmful["scores"]["after"]["refusal_rate_harmful"] in (0.0, 1.0)
    pairs = records[8:]
    assert pairs[0]["chosen"] == "Item 0 is red." and set(pairs[0]["scores"]) == {"after"}  # no reference: before
    assert pairs[-1]["scores"] == {}  # too long for --max-length 128: left out, and said so
    assert any("1 pair(s) whose response would be truncated" in note for note in report["notes"])

    # Each metric of eval.json is the mean of its rows' values; each has its n and 95% interval.
    for label, metrics in report["metrics"].items():
        intervals = report["intervals"][label]
        for name, value in metrics.items():
            if name in ("loss", "perplexity"):
                assert intervals[name] == {"n": len(QA)}
                continue
            values = [r["scores"][label][name] for r in records if name in r["scores"].get(label, {})]
            assert value == pytest.approx(sum(values) / len(values)), (label, name)
            low, high = intervals[name]["ci95"]
            assert intervals[name]["n"] == len(values) and low <= value <= high
            rate = name in ("exact_match", "contains", "regex_match", "stopped_rate", "refusal_rate_harmful",
                            "refusal_rate_benign", "preference_accuracy")
            assert intervals[name]["method"] == ("wilson" if rate else "bootstrap")
    assert report["intervals"]["after"]["preference_accuracy"]["n"] == len(PAIRS)
    assert report["intervals"]["after"]["win_rate"]["n"] == len(QA)
    assert report["win_rate"]["rate"] == pytest.approx(
        sum(r["scores"]["after"]["win_rate"] for r in records[:5]) / len(QA))

    # The table gives the interval and the sample size beside each value.
    contains = next(line for line in table.splitlines() if line.startswith("contains"))
    assert contains.count("n=5") == 2 and contains.count("[") == 2
    assert format_table(report) == table.rstrip("\n")

    # The environment of the evaluation.
    environment = report["environment"]
    assert environment["tuneforge"] == __import__("tuneforge").__version__
    assert environment["torch"] == torch.__version__
    assert environment["device"] == "cpu" or environment["device"].startswith("cuda (")
    assert {"transformers", "peft", "python", "commit"} <= set(environment)

    # A second evaluation: the first eval.json and its predictions move aside together.
    assert cli_main(["eval", str(run), "--data", str(files["data"]), "--metrics", "exact_match",
                     "--max-new-tokens", "2"]) == 0
    assert [json.loads(line) for line in (run / "predictions.1.jsonl").read_text().splitlines()] == records
    assert json.loads((run / "eval.1.json").read_text())["metrics"] == report["metrics"]
    second = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert len(second) == len(QA) and set(second[0]["scores"][run.name]) == {"exact_match"}
