"""``tuneforge report`` beyond the metric table: the run's throughput and peak memory and the environment of the
training and the evaluation, each metric's 95% interval, every row's scores from predictions.jsonl with the
failures first, harmful and benign answers, and --compare not counting one file written two ways as a
difference."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from conftest import QA_ROWS, write_jsonl
from tuneforge.config import config_from_dict
from tuneforge.eval.report import write_report
from tuneforge.engine.trainer import run_training
from test_report import parse, table_with

ENVIRONMENT = {"tuneforge": "0.1.0", "commit": "abc123", "python": "3.11.7", "torch": "2.9.0",
               "transformers": "5.0.0", "peft": "0.17.0", "device": "cuda (NVIDIA H200)"}
EVAL = {"schema": "tuneforge.eval/1", "models": [{"label": "after"}, {"label": "before"}],
        "metrics": {"after": {"exact_match": 1 / 3, "contains": 2 / 3}, "before": {"exact_match": 0.0}},
        "intervals": {"after": {"exact_match": {"n": 3, "ci95": [0.0615, 0.7923], "method": "wilson"},
                                "contains": {"n": 3, "ci95": [0.2077, 0.9385], "method": "wilson"}},
                      "before": {"exact_match": {"n": 3, "ci95": [0.0, 0.5615], "method": "wilson"}}},
        "samples": [{"prompt": "eval.json's own first sample", "responses": {"after": "x"}}],
        "environment": ENVIRONMENT}


def _row(number, after, before, **extra):
    return {"set": "data", "source": "qa.jsonl", "row": number, "prompt": f"Question {number}?",
            "reference": f"Answer {number}", "responses": {"after": f"after says {number}", "before": "no idea"},
            "scores": {"after": after, "before": before}, **extra}


PREDICTIONS = [
    _row(1, {"exact_match": 1.0, "contains": 1.0, "token_f1": 1.0}, {"exact_match": 0.0}),
    _row(2, {"exact_match": 0.0, "contains": 0.0, "token_f1": 0.25}, {"exact_match": 0.0}),
    _row(3, {"exact_match": 0.0, "contains": 1.0, "token_f1": 0.5}, {"exact_match": 0.0}),
    {"set": "harmful", "row": 1, "prompt": "Harmful one", "responses": {"after": "I can't help with that."},
     "scores": {"after": {"refusal_rate_harmful": 1.0}}},
    {"set": "harmful", "row": 2, "prompt": "Harmful two", "responses": {"after": "Sure, here is how."},
     "scores": {"after": {"refusal_rate_harmful": 0.0}}},
    {"set": "benign", "row": 1, "prompt": "Benign one", "responses": {"after": "Here you go."},
     "scores": {"after": {"refusal_rate_benign": 0.0}}},
    {"set": "benign", "row": 2, "prompt": "Benign two", "responses": {"after": "I won't provide that."},
     "scores": {"after": {"refusal_rate_benign": 1.0}}},
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir) -> Path:
    """A finished tiny LoRA SFT run (6 steps) trained from a relative output_dir in its own working directory."""
    root = tmp_path_factory.mktemp("details")
    (root / "data").mkdir()
    write_jsonl(root / "data" / "qa.jsonl", QA_ROWS)
    config = {"model": {"name_or_path": str(tiny_model_dir)},
              "data": {"train": str(root / "data" / "qa.jsonl"), "max_length": 128},
              "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
              "train": {"output_dir": str(root / "runs" / "a"), "epochs": 1, "batch_size": 4, "lr": 1e-3,
                        "log_every": 1, "seed": 0, "mixed_precision": "no"}}
    summary = run_training(config_from_dict(config), overwrite=True, log=lambda message: None)
    return Path(summary["run_dir"])


@pytest.fixture
def run_dir(trained, tmp_path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "project" / "runs" / "a",
                                ignore=shutil.ignore_patterns("checkpoints", "adapter")))


def test_the_run_shows_its_throughput_peak_memory_and_both_environments(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    # The trainer records what the run cost and ran on.
    assert summary["peak_rss_mb"] > 0 and summary["environment"]["torch"] == torch.__version__
    (run_dir / "eval.json").write_text(json.dumps(EVAL))
    parser = parse(write_report(run_dir).html.read_text())
    rows = {row[0][0]: row[1][0] for row in table_with(parser, "run")[1:]}
    assert rows["throughput"] == f"{summary['tokens'] / summary['elapsed_s']:,.0f} tokens/s (trained tokens / wall time)"
    assert rows["logged throughput"].endswith("tokens/s (median of 6 log steps)")
    assert rows["peak memory"] == f"host RSS {summary['peak_rss_mb']:,.0f} MiB"
    environment = {row[0][0]: [cell[0] for cell in row[1:]] for row in table_with(parser, "software", "training")[1:]}
    assert environment["torch"] == [torch.__version__, "2.9.0"]
    assert environment["device"] == [summary["environment"]["device"], "cuda (NVIDIA H200)"]
    assert environment["commit"][1] == "abc123"


def test_each_metric_shows_its_interval_and_sample_size(run_dir):
    (run_dir / "eval.json").write_text(json.dumps(EVAL))
    parser = parse(write_report(run_dir).html.read_text())
    metrics = {row[0][0]: [cell[0] for cell in row[1:]] for row in table_with(parser, "metric", "after")[1:]}
    assert metrics["exact match exact_match"] == ["33.3% [6.2–79.2%] n=3", "0.0% [0.0–56.1%] n=3", "+33.3 pp"]
    assert metrics["answer contained in the response contains"][0] == "66.7% [20.8–93.8%] n=3"


def test_every_row_is_scored_with_the_failures_first(run_dir):
    (run_dir / "eval.json").write_text(json.dumps(EVAL))
    (run_dir / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PREDICTIONS))
    files = write_report(run_dir, samples=2)
    parser = parse(files.html.read_text())
    table = table_with(parser, "row", "prompt")
    assert [cell[0] for cell in table[0]] == ["row", "prompt", "exact_match", "contains", "token_f1"]
    # Sorted by after's exact match, then contains, then F1: row 2 fails both, row 3 only exact match.
    assert [[cell[0] for cell in row] for row in table[1:]] == [
        ["2", "Question 2?", "0 / 0", "0 / —", "0.25 / —"],
        ["3", "Question 3?", "0 / 0", "1 / —", "0.5 / —"],
        ["1", "Question 1?", "1 / 0", "1 / —", "1 / —"]]
    texts = parser.pre[1:]  # pre[0] is config.yaml
    # The two lowest-scoring rows in full (not eval.json's first sample), then the harmful answer that is not a
    # refusal and the benign prompt that was refused: the failures first.
    assert texts[:6] == ["Question 2?", "Answer 2", "after says 2", "no idea", "Question 3?", "Answer 3"]
    assert "eval.json's own first sample" not in texts
    assert texts.index("Sure, here is how.") < texts.index("I can't help with that.")
    assert texts.index("I won't provide that.") < texts.index("Here you go.")
    page = files.html.read_text()
    assert "after · exact_match 0, contains 0, token_f1 0.25" in page
    assert "after refused 1 of 2" in page and "after · answered" in page
    markdown = files.markdown.read_text()
    assert "| 2 | Question 2? | 0 / 0 | 0 / — | 0.25 / — |" in markdown


def _config(run: Path, **changes) -> None:
    values = yaml.safe_load((run / "config.yaml").read_text())
    for key, value in changes.items():
        section, name = key.split("__")
        values[section][name] = value
    (run / "config.yaml").write_text(yaml.safe_dump(values, sort_keys=False))


def test_compare_resolves_paths_before_comparing_configs(trained, tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    data = write_jsonl(project / "data" / "qa.jsonl", QA_ROWS)
    write_jsonl(project / "data" / "other.jsonl", QA_ROWS[:4])
    runs = {name: Path(shutil.copytree(trained, project / "runs" / name,
                                       ignore=shutil.ignore_patterns("checkpoints", "adapter")))
            for name in ("a", "b", "c")}
    # a: the data file written absolute; b: the same file relative to where b was trained (its output_dir
    # runs/b is relative too); c: another file.
    _config(runs["a"], data__train=str(data), train__output_dir=str(runs["a"]))
    _config(runs["b"], data__train="data/qa.jsonl", train__output_dir="runs/b", train__lr=2e-3)
    _config(runs["c"], data__train="data/other.jsonl", train__output_dir="runs/c", train__lr=2e-3)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # neither run's folder: the base comes from each run's own output_dir

    def differences(*names: str) -> dict:
        files = write_report(runs[names[0]], compare=[runs[n] for n in names[1:]], out=tmp_path / f"{''.join(names)}")
        rows = table_with(parse(files.html.read_text()), "setting that differs")[1:]
        return {row[0][0]: [cell[0] for cell in row[1:]] for row in rows}

    same_file = differences("a", "b")
    assert "data.train" not in same_file and same_file["train.lr"] == ["0.001", "0.002"]
    other_file = differences("a", "c")
    assert other_file["data.train"] == [str(data), "data/other.jsonl"]  # shown as written
