"""Evaluation during training on a small generation set (``eval.generation_data``): the val_gen_* metrics logged at
each evaluation are those of the model at that step, they drive early stopping, user metrics join them, preference
runs log them too, and bad settings fail before the model loads."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from conftest import QA_ROWS, write_jsonl
from tuneforge.config import GENERATION_METRICS, GENERATION_PREFIX, DataConfig, config_from_dict, load_config
from tuneforge.engine.metrics import read_metrics
from tuneforge.errors import ConfigError, DataError
from tuneforge.eval.evaluate import ANSWER_METRICS, generation_metrics
from tuneforge.eval.heldout import read_heldout
from tuneforge.generation import Generation, Generator
from tuneforge.engine.trainer import Trainer, run_training

# Held-out questions like the training rows, with a short answer for ``contains``.
GEN_ROWS = [{**row, "answer": ["red", "blue", "green"][i % 3]} for i, row in enumerate(QA_ROWS[:6])]
MAX_NEW_TOKENS = 12
BATCH = 4


def quiet(_message):
    pass


@pytest.fixture
def gen_file(tmp_path):
    return write_jsonl(tmp_path / "gen.jsonl", GEN_ROWS)


def gen_records(run_dir) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if any(k.startswith(GENERATION_PREFIX) for k in r)]


def expected_metrics(model: str, gen_file, names) -> dict[str, float]:
    """What ``tuneforge eval`` computes: greedy answers of ``model`` loaded from disk, scored by
    ``generation_metrics``, named as the training loop logs them."""
    rows = read_heldout(str(gen_file), DataConfig(train=str(gen_file))).rows
    answers = Generator.load(model).generate_responses([r.prompt for r in rows], MAX_NEW_TOKENS, batch_size=BATCH)
    return {GENERATION_PREFIX + k: v for k, v in generation_metrics(rows, answers, set(names)).items()}


def eval_section(gen_file, **extra) -> dict:
    return {"generation_data": str(gen_file), "max_new_tokens": MAX_NEW_TOKENS, **extra}


# ------------------------------------------------------------------------------------------------ real answers
def test_sft_logs_the_generation_metrics_of_the_model_at_each_evaluation(make_config, qa_file, gen_file, tmp_path,
                                                                          tiny_model_dir):
    names = ["exact_match", "contains", "token_f1", "rouge_l", "stopped_rate", "mean_response_words"]
    # 24 rows, batch 4: 6 steps; evaluations at 0 (at_start), 2, 4 and 6. No validation data of the method's own.
    # A large learning rate, so that the answers change from one evaluation to the next.
    config = make_config(qa_file, train={"lr": 3e-2},
                         eval=eval_section(gen_file, every=2, at_start=True, final="last",
                                           metric="val_gen_token_f1"))
    summary = run_training(config, log=quiet)
    run_dir = tmp_path / "run"
    records = gen_records(run_dir)
    assert [r["step"] for r in records] == [0, 2, 4, 6]
    keys = {GENERATION_PREFIX + n for n in names}
    assert all(set(r) == {"step", *keys} for r in records)  # only the generation metrics: no val_loss
    # The first evaluation is the starting model's (LoRA's B = 0), the last the saved final model's.
    assert records[0] == pytest.approx({"step": 0, **expected_metrics(str(tiny_model_dir), gen_file, names)})
    final = expected_metrics(str(run_dir), gen_file, names)
    assert records[-1] == pytest.approx({"step": 6, **final})
    # Every earlier evaluation differs from the last, so the equality tells the model of each step apart.
    assert all({**r, "step": 6} != records[-1] for r in records[:-1])
    assert records[-1]["val_gen_token_f1"] > 0  # some reference words learnt: not a comparison of zeros
    # The summary carries the last evaluation, and the best checkpoint was chosen by the generation metric.
    on_file = json.loads((run_dir / "summary.json").read_text())
    assert {k: on_file[k] for k in keys} == pytest.approx(final)
    best = max(records[1:], key=lambda r: r["val_gen_token_f1"])  # the first best wins ties
    assert (on_file["best_step"], on_file["best_metric"]) == (best["step"], best["val_gen_token_f1"])
    assert summary["metric"] == "val_gen_token_f1"


def test_generation_does_not_change_training_and_restores_train_mode(make_config, qa_file, gen_file, tmp_path):
    def losses(run_dir):
        return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]

    plain = make_config(qa_file, train={"max_steps": 4, "output_dir": str(tmp_path / "plain")})
    run_training(plain, log=quiet)
    config = make_config(qa_file, train={"max_steps": 4},
                         eval=eval_section(gen_file, every=1, metric="val_gen_rouge_l"))
    recipe = Trainer(config, log=quiet, show_progress=False)
    recipe.setup()
    recipe.train()
    assert len(gen_records(tmp_path / "run")) == 4
    assert recipe.model.training
    assert losses(tmp_path / "run") == losses(tmp_path / "plain")


def test_with_validation_data_the_record_holds_both(make_config, qa_file, gen_file, tmp_path):
    config = make_config(qa_file, data={"val_fraction": 0.25}, train={"max_steps": 2},
                         eval=eval_section(gen_file, generation_metrics=["stopped_rate"]))
    run_training(config, log=quiet)
    (record,) = gen_records(tmp_path / "run")
    assert set(record) == {"step", "val_loss", "val_perplexity", "val_gen_stopped_rate"}
    assert record["val_gen_stopped_rate"] in [i / len(GEN_ROWS) for i in range(len(GEN_ROWS) + 1)]


def test_dpo_run_logs_generation_metrics(tiny_model_dir, tmp_path, gen_file):
    pairs = [{"prompt": f"What colour is item {i}?", "chosen": f"Item {i} is {['red', 'blue', 'green'][i % 3]}.",
              "rejected": f"Well, item {i} might be some colour or other."} for i in range(16)]
    names = ["contains", "token_f1", "stopped_rate"]
    config = config_from_dict({
        "method": "dpo", "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"train": str(write_jsonl(tmp_path / "pairs.jsonl", pairs)), "max_length": 64,
                 "val_fraction": 0.25},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"output_dir": str(tmp_path / "dpo"), "epochs": 1, "batch_size": BATCH, "lr": 1e-2, "seed": 0,
                  "mixed_precision": "no"},
        "eval": eval_section(gen_file, every=1, final="last", generation_metrics=names),
    })
    trainer = Trainer(config, log=quiet, show_progress=False)
    trainer.setup()
    trainer.save(trainer.train())
    records = gen_records(tmp_path / "dpo")
    assert [r["step"] for r in records] == [1, 2, 3]  # 12 training pairs, batch 4
    assert all("val_loss" in r and "val_reward_accuracy" in r for r in records)  # DPO's own metrics beside them
    final = expected_metrics(str(tmp_path / "dpo"), gen_file, names)
    assert {k: records[-1][k] for k in final} == pytest.approx(final)


# -------------------------------------------------------------------------------------------- scripted answers
@pytest.fixture
def scripted_answers(monkeypatch):
    """scripted_answers(texts per evaluation) makes the loop's generation return those texts (all stopped), and
    records whether the model was in training mode during each call."""
    modes: list[bool] = []

    def install(evaluations: list[list[str]]):
        answers = iter(evaluations)

        def generate_responses(self, conversations, max_new_tokens=64, temperature=0.0, top_p=1.0, batch_size=8,
                               progress=None):
            modes.append(self.model.training)
            texts = next(answers)
            assert len(texts) == len(conversations)
            return [Generation(text, True, len(text.split())) for text in texts]

        monkeypatch.setattr(Generator, "generate_responses", generate_responses)
        return modes

    return install


def test_early_stopping_on_exact_match(make_config, qa_file, gen_file, tmp_path, scripted_answers):
    references = [r["messages"][1]["content"] for r in GEN_ROWS]

    def right(count):  # the first `count` answers right, the others wrong
        return references[:count] + ["no idea"] * (len(references) - count)

    # exact match 2/6, 3/6, 3/6, 1/6: no improvement at evaluations 3 and 4, so patience 2 stops at step 4.
    modes = scripted_answers([right(2), right(3), right(3), right(1)])
    config = make_config(qa_file, eval=eval_section(gen_file, every=1, patience=2, metric="val_gen_exact_match",
                                                    mode="max", final="best"))
    messages = []
    summary = run_training(config, log=messages.append)
    assert (summary["stop_reason"], summary["steps"]) == ("early_stopping", 4)
    assert (summary["best_step"], summary["best_metric"]) == (2, 0.5)
    assert [r["val_gen_exact_match"] for r in gen_records(tmp_path / "run")] == [2 / 6, 3 / 6, 3 / 6, 1 / 6]
    assert [r["val_gen_stopped_rate"] for r in gen_records(tmp_path / "run")] == [1.0] * 4
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["final_step"] == 2
    assert modes == [False] * 4  # generation ran in eval mode
    assert any("early stopping at step 4" in m and "val_gen_exact_match" in m for m in messages)


def test_user_metrics_are_logged_by_function_name(make_config, qa_file, gen_file, tmp_path, scripted_answers,
                                                  monkeypatch):
    (tmp_path / "my_metrics.py").write_text(
        "def says_answer(prompt, response, row):\n"
        "    return float(row['answer'] in response and 'What is item' in prompt)\n")
    monkeypatch.chdir(tmp_path)  # a file spec is relative to the working directory (as reward functions)
    # The rows' short answers are red, blue, green, red, blue, green.
    texts = ["It is red.", "Blue!", "5", "red", "blue", "Item 5 is red"]
    scripted_answers([texts])
    config = make_config(qa_file, train={"max_steps": 1}, eval=eval_section(
        gen_file, metric="val_gen_says_answer",
        generation_metrics=["exact_match", "my_metrics.py:says_answer", "tuneforge.rewards.functions:exact_answer"]))
    run_training(config, log=quiet)
    (record,) = gen_records(tmp_path / "run")
    # says_answer (case-sensitive, anywhere in the text): rows 0, 3, 4; exact_answer (the whole text, normalised):
    # rows 1 ("Blue!" is "blue"), 3, 4; exact_match against the full reference sentences: none.
    assert record == {"step": 1, "val_gen_exact_match": 0.0, "val_gen_says_answer": 3 / 6,
                      "val_gen_exact_answer": 3 / 6}


# ----------------------------------------------------------------------------------------------- config errors
def test_generation_metric_names_match_the_eval_verb():
    assert set(GENERATION_METRICS) == ANSWER_METRICS - {"win_rate"}


@pytest.mark.parametrize("eval_values, message", [
    ({"generation_metrics": ["exact_match", "rouge"]}, "eval.generation_metrics: unknown metric 'rouge' "
                                                       "(did you mean 'rouge_l'?)"),
    ({"metric": "val_gen_exact_match"}, "eval.metric: val_gen_exact_match is measured on eval.generation_data"),
    ({"generation_data": "gen.jsonl", "metric": "val_gen_regex_match"}, "add it to eval.generation_metrics"),
    ({"generation_data": "gen.jsonl", "metric": "val_gen_mean_response_words"}, "set eval.mode=min"),
    ({"generation_data": "gen.jsonl"}, "eval.metric: the run has no validation rows, so val_loss is never"),
    ({"generation_data": "gen.jsonl", "metric": "val_gen_f", "generation_metrics": ["a:f", "b.py:f"]},
     "eval.generation_metrics: two entries would both be logged as the same"),
    ({"generation_data": "gen.jsonl", "metric": "val_gen_exact_match", "generation_metrics": []},
     "eval.generation_metrics: empty"),
    ({"generation_data": "gen.jsonl", "generation_rows": 0}, "eval.generation_rows: 0 is out of range"),
])
def test_config_errors(eval_values, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_from_dict({"data": {"train": "train.jsonl"}, "eval": eval_values})


@pytest.mark.parametrize("method, strategy, message", [
    ("reward", "ddp", "method reward trains a scoring model"),
    ("sft", "fsdp", "generation runs on the unsharded model"),
])
def test_config_errors_for_the_run(method, strategy, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"method": method, "data": {"train": "t.jsonl", "val_fraction": 0.1},
                          "distributed": {"strategy": strategy}, "eval": {"generation_data": "gen.jsonl"}})


def test_generation_data_is_relative_to_the_config_file(tmp_path, gen_file, monkeypatch):
    (tmp_path / "configs").mkdir()
    path = tmp_path / "configs" / "run.yaml"
    path.write_text(yaml.safe_dump({"data": {"train": "../train.jsonl"},
                                    "eval": {"generation_data": "../gen.jsonl", "metric": "val_gen_contains"}}))
    monkeypatch.chdir(tmp_path.parent)
    assert load_config(path).eval.generation_data == str(tmp_path / "gen.jsonl")


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the recipe gets as far as looking up the model."""
    from tuneforge.engine import trainer

    def refuse(*args, **kwargs):
        raise AssertionError("the model was looked up before the generation data was checked")

    monkeypatch.setattr(trainer, "resolve_model", refuse)


def test_bad_generation_data_fails_before_the_model_loads(make_config, qa_file, tmp_path, no_model):
    def setup(gen_path, **extra):
        config = make_config(qa_file, eval={"generation_data": str(gen_path), "metric": "val_gen_contains", **extra})
        Trainer(config, log=quiet, show_progress=False, run_dir=False).setup()

    with pytest.raises(ConfigError, match=r"^eval\.generation_data: file .*missing\.jsonl does not exist"):
        setup(tmp_path / "missing.jsonl")
    bad = write_jsonl(tmp_path / "bad.jsonl", [GEN_ROWS[0], {"messages": [{"role": "user", "content": 3}]}])
    with pytest.raises(DataError, match=r"bad\.jsonl, row 2"):
        setup(bad)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "What is item 1?"}])
    with pytest.raises(DataError, match=r"prompts\.jsonl: eval\.generation_metrics: exact_match needs rows with a "
                                        r"reference response"):
        setup(prompts)
    with pytest.raises(DataError, match="regex_match needs rows with a 'pattern' field"):
        setup(write_jsonl(tmp_path / "gen.jsonl", GEN_ROWS), generation_metrics=["contains", "regex_match"])
    with pytest.raises(Exception, match="module 'no_such_module' not found"):
        setup(tmp_path / "gen.jsonl", generation_metrics=["contains", "no_such_module:f"])


def test_two_ranks_log_what_one_process_logs(tiny_model_dir, qa_file, gen_file, tmp_path):
    """Each rank answers its share of the rows (5 rows: 3 and 2) and every rank gets the metrics of all of them."""
    from test_distributed import _train

    config = {"model": {"name_or_path": str(tiny_model_dir)}, "data": {"train": str(qa_file), "max_length": 128},
              "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
              "train": {"epochs": 1, "batch_size": 4, "lr": 3e-2, "seed": 0, "mixed_precision": "no"},
              "eval": eval_section(gen_file, every=2, generation_rows=5, metric="val_gen_token_f1")}
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    single, multi = tmp_path / "single", tmp_path / "multi"
    _train(config_file, single, 1)
    _train(config_file, multi, 2, "train.batch_size=2")
    want = gen_records(single)
    assert [r["step"] for r in want] == [2, 4, 6] and any(r["val_gen_token_f1"] > 0 for r in want)
    got = gen_records(multi)
    assert len(got) == len(want) and all(g == pytest.approx(w) for g, w in zip(got, want))
