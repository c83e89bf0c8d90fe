"""The lm-evaluation-harness bridge: the shipped tasks run offline on tiny models, lm-eval's accuracy equals the
same multiple-choice accuracy computed here with tuneforge's log-prob code, and a LoRA run is evaluated with its
adapter."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys

import pytest
import torch

from tuneforge.config import config_from_dict
from tuneforge.data.collate import next_token_targets
from tuneforge.errors import DataError, UserError
from tuneforge.eval.lmeval import TASKS_DIR, flatten_results, local_dataset, offline_hub, run_lm_eval
from tuneforge.losses import IGNORE_INDEX, sequence_logprobs
from tuneforge.engine.trainer import Trainer

from conftest import write_jsonl

# pytest.importorskip for each test but the one about a missing lm-eval (the bridge imports it lazily).
needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                   reason="lm-eval is not installed (pip install 'tuneforge[lmeval]')")

SHIPPED = {"tuneforge_velmora": "velmora_mc.jsonl", "tuneforge_arithmetic": "arithmetic_mc.jsonl"}
METRICS = {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
# Rows per task in the parity checks: lm-eval's `limit` takes a task's first rows.
LIMIT = 12


def _rows(task: str) -> list[dict]:
    return [json.loads(line) for line in (TASKS_DIR / SHIPPED[task]).read_text().splitlines()]


def _context(row: dict) -> str:
    """The shipped tasks' doc_to_text; lm-eval appends its target delimiter " " and the choice."""
    return f"Question: {row['question']}\nAnswer:"


@torch.no_grad()
def _choice_logprob(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context): the continuation's tokens are those of the whole text after the context's
    (lm-eval's convention for causal models), scored with tuneforge's ``sequence_logprobs``."""
    context_ids = tokenizer(context)["input_ids"]
    whole = tokenizer(context + continuation)["input_ids"]
    assert whole[:len(context_ids)] == context_ids
    labels = [IGNORE_INDEX] * len(context_ids) + whole[len(context_ids):]
    targets = torch.tensor([next_token_targets(labels)])
    logits = model(input_ids=torch.tensor([whole])).logits
    return float(sequence_logprobs(logits, targets)[0])


def _direct_accuracy(model, tokenizer, rows: list[dict]) -> dict[str, float]:
    """acc: argmax of the summed log-prob of " " + choice is the gold choice; acc_norm: the same with each
    log-prob divided by the choice's length in characters (lm-eval's definitions), averaged over ``rows``."""
    acc = acc_norm = 0
    for row in rows:
        scores = [_choice_logprob(model, tokenizer, _context(row), " " + choice) for choice in row["choices"]]
        normed = [score / len(choice) for score, choice in zip(scores, row["choices"])]
        acc += max(range(len(scores)), key=scores.__getitem__) == row["gold"]
        acc_norm += max(range(len(normed)), key=normed.__getitem__) == row["gold"]
    return {"acc": acc / len(rows), "acc_norm": acc_norm / len(rows)}


@needs_lm_eval
def test_shipped_tasks_measure_what_their_files_say(tiny_model_dir, tokenizer):
    """The ``tuneforge`` tag runs both shipped tasks. On their first rows, lm-eval's numbers (batch 8, its own
    padding and sorting) equal those computed here one row at a time with tuneforge's log-prob code."""
    from transformers import AutoModelForCausalLM

    results = run_lm_eval(str(tiny_model_dir), ["tuneforge"], limit=LIMIT, batch_size=8)
    assert set(results) == set(SHIPPED)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    for task, metrics in results.items():
        assert set(metrics) == METRICS
        direct = _direct_accuracy(model, tokenizer, _rows(task)[:LIMIT])
        assert metrics["acc"] == pytest.approx(direct["acc"], abs=1e-9), task
        assert metrics["acc_norm"] == pytest.approx(direct["acc_norm"], abs=1e-9), task
        # The standard error of a mean of LIMIT zeros and ones.
        assert metrics["acc_stderr"] == pytest.approx(math.sqrt(direct["acc"] * (1 - direct["acc"]) / (LIMIT - 1)))
    # Not a degenerate agreement: the random tiny model is right on some rows and wrong on others.
    assert 0 < results["tuneforge_arithmetic"]["acc"] < 1


def _train_lora_on_velmora_answers(tmp_path, tiny_model_dir) -> Trainer:
    """A short LoRA run on the tiny model over the Velmora task's gold answers, in the task's own format. A high
    rate, so the adapter moves far from its zero start in a few steps."""
    rows = [{"text": f"{_context(row)} {row['choices'][row['gold']]}"} for row in _rows("tuneforge_velmora")]
    config = config_from_dict({
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"train": str(write_jsonl(tmp_path / "answers.jsonl", rows)), "max_length": 64},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 6, "batch_size": 8, "lr": 5e-2, "seed": 0,
                  "warmup_steps": 0, "scheduler": "constant", "mixed_precision": "no"},
    })
    recipe = Trainer(config, log=lambda message: None, show_progress=False)
    recipe.setup()
    recipe.train()
    recipe.save()
    recipe.model.eval()
    return recipe


@needs_lm_eval
def test_a_task_of_your_own_runs_from_a_folder_or_a_yaml_path(tiny_model_dir, tokenizer, tmp_path, monkeypatch):
    """docs/lm_eval.md's recipe: a YAML, its rows and a copy of the shipped utils.py in a folder of your own."""
    from transformers import AutoModelForCausalLM

    rows = [{"question": "What colour is the sky?", "choices": ["blue", "green", "red"], "gold": 0},
            {"question": "How many legs has a cat?", "choices": ["two", "four", "six"], "gold": 1},
            {"question": "What is 1 + 1?", "choices": ["3", "1", "2"], "gold": 2}]
    folder = tmp_path / "my_tasks"
    folder.mkdir()
    write_jsonl(folder / "rows.jsonl", rows)
    (folder / "utils.py").write_text((TASKS_DIR / "utils.py").read_text())
    shipped = (TASKS_DIR / "tuneforge_arithmetic.yaml").read_text()
    (folder / "my_quiz.yaml").write_text(shipped.replace("task: tuneforge_arithmetic", "task: my_quiz")
                                         .replace("tag: tuneforge", "tag: mine")
                                         .replace("test: arithmetic_mc.jsonl", "test: rows.jsonl"))
    monkeypatch.chdir(tmp_path)  # the data path is relative to the YAML's folder, not to here

    direct = _direct_accuracy(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), tokenizer, rows)
    by_name = run_lm_eval(str(tiny_model_dir), ["my_quiz"], include_path=str(folder))
    by_path = run_lm_eval(str(tiny_model_dir), [str(folder / "my_quiz.yaml")])
    for results in (by_name, by_path):
        assert results["my_quiz"]["acc"] == pytest.approx(direct["acc"])
        assert results["my_quiz"]["acc_norm"] == pytest.approx(direct["acc_norm"])


ANSWER_LOGLIKELIHOOD_TASK = """
task: velmora_answer_loglikelihood
custom_dataset: !function utils.local_json
dataset_kwargs:
  data_files:
    test: velmora_mc.jsonl
test_split: test
output_type: loglikelihood
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_target: " {{choices[gold]}}"  # loglikelihood tasks get no target delimiter
metric_list:
  - {metric: perplexity, aggregation: perplexity, higher_is_better: false}
"""


@needs_lm_eval
def test_a_lora_run_is_evaluated_with_its_adapter(tmp_path, tiny_model_dir, tokenizer):
    """A continuous check as well as the accuracy: a task of our own scores the true answers' log-likelihood,
    whose perplexity exp(-mean log p(" " + answer | question)) lm-eval reports. For the run directory it is
    that of the trained model in memory (base + adapter), and lower than the base's, the answers being what the
    adapter was trained on."""
    run = _train_lora_on_velmora_answers(tmp_path, tiny_model_dir)
    rows = _rows("tuneforge_velmora")[:LIMIT]
    folder = tmp_path / "tasks"
    folder.mkdir()
    for name in ("utils.py", "velmora_mc.jsonl"):
        (folder / name).write_text((TASKS_DIR / name).read_text())
    (folder / "velmora_answer_loglikelihood.yaml").write_text(ANSWER_LOGLIKELIHOOD_TASK)
    tasks = ["velmora_answer_loglikelihood", "tuneforge_velmora"]

    def direct_perplexity(model) -> float:
        answers = [" " + row["choices"][row["gold"]] for row in rows]
        return math.exp(-sum(_choice_logprob(model, tokenizer, _context(row), answer)
                             for row, answer in zip(rows, answers)) / len(rows))

    tuned = run_lm_eval(str(run.run_dir), tasks, limit=LIMIT, include_path=str(folder))
    base = run_lm_eval(str(tiny_model_dir), tasks, limit=LIMIT, include_path=str(folder))
    ppl = {name: results["velmora_answer_loglikelihood"]["perplexity"]
           for name, results in (("tuned", tuned), ("base", base))}
    direct = _direct_accuracy(run.model, tokenizer, rows)
    assert tuned["tuneforge_velmora"]["acc"] == pytest.approx(direct["acc"], abs=1e-9)
    assert tuned["tuneforge_velmora"]["acc_norm"] == pytest.approx(direct["acc_norm"], abs=1e-9)
    assert ppl["tuned"] == pytest.approx(direct_perplexity(run.model), rel=1e-4)
    with run.model.disable_adapter():
        assert ppl["base"] == pytest.approx(direct_perplexity(run.model), rel=1e-4)
    # Six steps on the answers lower it by ~14%; parity above holds to 0.01%.
    assert ppl["tuned"] < 0.95 * ppl["base"]


def test_flatten_results_names_filters_and_drops_placeholders():
    raw = {"t": {"alias": "t", "acc,none": 0.25, "acc_stderr,none": 0.1, "exact_match,strict-match": 1,
                 "exact_match_stderr,strict-match": "N/A"},
           "group": {"alias": "group", "acc,none": 0.5, " ": " "}}
    assert flatten_results(raw) == {"t": {"acc": 0.25, "acc_stderr": 0.1, "exact_match/strict-match": 1.0},
                                    "group": {"acc": 0.5}}


@needs_lm_eval
def test_local_dataset_reads_relative_to_its_folder_and_names_bad_rows(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "rows.jsonl", [{"question": "q", "choices": ["a", "b"], "gold": 1}])
    monkeypatch.chdir(tmp_path.parent)  # not the task folder: paths resolve against the folder given
    splits = local_dataset(tmp_path, {"test": "rows.jsonl"}, version=1.0)
    assert splits["test"][0] == {"question": "q", "choices": ["a", "b"], "gold": 1}

    write_jsonl(tmp_path / "bad.jsonl", [{"question": "q"}, "{not json"])
    with pytest.raises(DataError, match=r"bad\.jsonl, row 2"):
        local_dataset(tmp_path, "bad.jsonl")
    with pytest.raises(UserError, match="does not exist"):
        local_dataset(tmp_path, {"test": "missing.jsonl"})
    write_jsonl(tmp_path / "mixed.jsonl", [{"gold": 1}, {"gold": "one"}])
    with pytest.raises(DataError, match=r"mixed\.jsonl: rows do not share one schema"):
        local_dataset(tmp_path, "mixed.jsonl")


@needs_lm_eval
def test_unknown_task_no_task_and_reward_model_are_user_errors(tiny_model_dir, tmp_path):
    with pytest.raises(UserError, match="unknown lm-eval task 'no_such_task_xyz'.*tuneforge_velmora"):
        run_lm_eval(str(tiny_model_dir), ["no_such_task_xyz"])
    with pytest.raises(UserError, match="no lm-eval task"):
        run_lm_eval(str(tiny_model_dir), [])
    reward_run = tmp_path / "rm"
    reward_run.mkdir()
    (reward_run / "tuneforge_run.json").write_text(json.dumps({"method": "reward", "kind": "full"}))
    with pytest.raises(UserError, match="reward model"):
        run_lm_eval(str(reward_run), ["tuneforge"])


@needs_lm_eval
def test_a_catalogue_task_is_never_downloaded(tiny_model_dir, tmp_path, monkeypatch):
    """lm-eval's own arc_easy with empty Hugging Face caches: a clear error, not a download."""
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(UserError, match="not available offline.*ai2_arc"):
        run_lm_eval(str(tiny_model_dir), ["arc_easy"], limit=1)


@needs_lm_eval
def test_offline_hub_sets_and_restores_the_offline_switches(monkeypatch):
    import datasets
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    before = (huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE)
    with offline_hub():
        assert huggingface_hub.constants.is_offline_mode() and datasets.config.HF_HUB_OFFLINE
        assert (os.environ["HF_HUB_OFFLINE"], os.environ["HF_DATASETS_OFFLINE"]) == ("1", "1")
    assert "HF_HUB_OFFLINE" not in os.environ and os.environ["HF_DATASETS_OFFLINE"] == "0"
    assert (huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE) == before


def test_without_lm_eval_the_error_says_how_to_install_it(monkeypatch, tiny_model_dir):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    with pytest.raises(UserError, match=r"pip install 'tuneforge\[lmeval\]'"):
        run_lm_eval(str(tiny_model_dir), ["tuneforge"])
