"""``tuneforge eval``: each metric that is new code on hand-made inputs with known answers, the settings and their
errors, then end to end on the tiny model (eval.json keys, loss and implicit reward against direct
recomputations, stopped rate, a judge's ties, a second column)."""

from __future__ import annotations

import json
import sys
import types
from importlib.machinery import ModuleSpec

import pytest
import torch
import yaml

from conftest import TINY, build_tiny_model, write_jsonl
from tuneforge.cli import main as cli_main
from tuneforge.config import DataConfig, config_from_dict
from tuneforge.data.dataset import DataReport
from tuneforge.data.formats import Conversation, Message
from tuneforge.data.preference import load_preference_rows
from tuneforge.errors import ConfigError, UserError
from tuneforge.eval import evaluate
from tuneforge.eval.evaluate import (EvalSettings, count_wins, format_table, generation_metrics, load_settings,
                                     plan_eval, user_metric_means, write_report)
from tuneforge.rewards.functions import RewardFunctions, load_callable
from tuneforge.eval.heldout import HeldoutRow, read_heldout
from tuneforge.eval.metrics import stopped_by_itself
from tuneforge.rewards.scoring import RewardScorer
from tuneforge.generation import Generation, Generator

EOS = 2  # SmolLM2's <|im_end|>: the tokenizer's EOS and the chatml end of turn
CONTRACT_KEYS = {"schema", "created", "data", "settings", "models", "metrics", "win_rate", "samples", "lm_eval"}
QA = [{"messages": [{"role": "user", "content": f"What colour is item {i}?"},
                    {"role": "assistant", "content": f"Item {i} is {['red', 'blue', 'green'][i % 3]}."}],
       "answer": ["red", "blue", "green"][i % 3], "pattern": r"(?i)item \d"} for i in range(5)]
PAIRS = [{"prompt": f"What colour is item {i}?", "chosen": f"Item {i} is red.",
          "rejected": f"Well, item {i} could be some colour, I suppose, who knows."} for i in range(5)]


def user(text: str) -> list[Message]:
    return [Message("user", text)]


# --------------------------------------------------------------------------------------------- metrics by hand
def test_generation_metrics_worked_by_hand():
    rows = [HeldoutRow(user("q1"), "The cat sat.", {"answer": "cat", "pattern": "^The"}),
            HeldoutRow(user("q2"), "Blue sky today", {}),
            HeldoutRow(user("q3"), None, {"pattern": r"\d"})]
    generations = [Generation("the cat sat", True, 3), Generation("sky is blue", False, 64),
                   Generation("no digits here at all", True, 5)]
    wanted = {"exact_match", "contains", "token_f1", "rouge_l", "regex_match", "stopped_rate", "mean_response_words"}
    out = generation_metrics(rows, generations, wanted)
    # Row 1: exact after normalisation; row 2: tokens {sky, is, blue} vs {blue, sky, today}: overlap 2, P = R = 2/3,
    # F1 2/3; LCS of (sky is blue) and (blue sky today) is 1 ("sky" or "blue"): P = R = 1/3. Row 3 has no reference.
    assert out["exact_match"] == pytest.approx(1 / 2)
    assert out["token_f1"] == pytest.approx((1 + 2 / 3) / 2)
    assert out["rouge_l"] == pytest.approx((1 + 1 / 3) / 2)
    # contains: row 1 checks its answer "cat" (yes), row 2 the reference "Blue sky today" (no).
    assert out["contains"] == pytest.approx(1 / 2)
    # regex over the rows with a pattern: "^The" on "the cat sat" (case-sensitive: no), "\d" (no).
    assert out["regex_match"] == 0.0
    assert out["stopped_rate"] == pytest.approx(2 / 3)
    assert out["mean_response_words"] == pytest.approx((3 + 3 + 5) / 3)
    assert set(generation_metrics(rows, generations, {"stopped_rate"})) == {"stopped_rate"}


def test_win_rate_counting_on_hand_made_scores():
    scores_a = [2.0, 0.0, 1.0, 5.0, 3.0]
    scores_b = [1.0, 1.0, 1.0, 5.0 + 1e-9, 9.0]
    answers_a = ["x", "y", "z", "w", "same"]
    answers_b = ["p", "q", "r", "s", "same"]
    # win, loss, equal scores (tie), within the tolerance (tie), identical text (tie whatever the scores)
    assert count_wins(scores_a, scores_b, answers_a, answers_b) == {"wins": 1, "losses": 1, "ties": 3,
                                                                    "rate": (1 + 3 / 2) / 5}
    with pytest.raises(ValueError):
        count_wins([1.0], [], ["a"], ["b"])


def test_user_metric_from_a_file_spec(tmp_path):
    path = tmp_path / "my_metrics.py"
    path.write_text("def words(prompt, response, row):\n    return len(response.split()) + row['bonus']\n")
    spec = f"{path}:words"
    functions = RewardFunctions({"user:words": load_callable(spec)})
    out = user_metric_means(functions, ["p", "p"], ["one two", "one two three four"], [{"bonus": 1}, {"bonus": 0}])
    assert out == {"user:words": pytest.approx((3 + 4) / 2)}


def test_generate_responses_reports_whether_each_stopped(tokenizer):
    from tuneforge.data.templates import load_template

    hi, there = tokenizer.encode("Hi", add_special_tokens=False), tokenizer.encode(" there", add_special_tokens=False)
    # What a batched `generate` returns: prompt columns, then row 0 stops (then pads with EOS), row 1 runs to the
    # limit without a stop token.
    continuation = [hi + [EOS] * len(there), hi + there]

    class Stub(torch.nn.Module):
        generation_config = None  # a checkpoint's own settings, which generation puts aside

        def generate(self, input_ids, attention_mask, generation_config, **hooks):
            assert generation_config.eos_token_id == [EOS]
            return torch.cat([input_ids, torch.tensor(continuation)], dim=1)

    generator = Generator(Stub(), tokenizer, load_template("auto", tokenizer), torch.device("cpu"))
    out = generator.generate_responses([user("a"), user("b")], max_new_tokens=len(continuation[1]))
    assert [g.stopped for g in out] == [True, False]
    assert [g.stopped for g in out] == [stopped_by_itself(row, [EOS]) for row in continuation]  # same rule
    assert [g.text for g in out] == ["Hi", "Hi there"]
    assert [g.num_tokens for g in out] == [len(hi), len(hi + there)]
    assert generator.generate([user("a"), user("b")]) == ["Hi", "Hi there"]  # the old API: text only


# --------------------------------------------------------------------------------------------- settings, errors
def test_settings_from_a_config_file_with_flags_on_top(tmp_path):
    write_jsonl(tmp_path / "qa.jsonl", QA)
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump({"model": "default", "data": "qa.jsonl", "batch_size": 2,
                                                        "metrics": "loss,exact_match", "lm_eval": "a,b"}))
    settings = load_settings(tmp_path / "eval.yaml", {"batch_size": 3, "seed": None})
    assert settings.data == str(tmp_path / "qa.jsonl")  # relative to the config file
    assert settings.batch_size == 3 and settings.seed == 0
    assert settings.metrics == ["loss", "exact_match"] and settings.lm_eval == ["a", "b"]

    (tmp_path / "bad.yaml").write_text("model: default\nbatch_sise: 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'batch_sise' \(did you mean 'batch_size'"):
        load_settings(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="top_p: 2.0 is out of range"):
        load_settings(None, {"model": "default", "top_p": 2.0})
    with pytest.raises(ConfigError, match="max_new_tokens: expected an integer"):
        load_settings(None, {"model": "default", "max_new_tokens": "many"})
    with pytest.raises(ConfigError, match="no model to evaluate"):
        load_settings(None, {})


def _no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were validated")

    monkeypatch.setattr(Generator, "load", refuse)
    monkeypatch.setattr("tuneforge.generation.generator.load_for_inference", refuse)


def test_bad_inputs_fail_before_any_model_loads(tiny_model_dir, tmp_path, monkeypatch, capsys):
    _no_model_loads(monkeypatch)
    model = str(tiny_model_dir)
    data = write_jsonl(tmp_path / "qa.jsonl", QA[:2] + [{"messages": [{"role": "user", "content": "hi"}]}])
    assert cli_main(["eval", model, "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert str(data) in err and "row 3" in err
    assert cli_main(["eval", model, "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl does not exist" in capsys.readouterr().err
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [PAIRS[0], {"prompt": "p", "chosen": "same", "rejected": "same"}])
    assert cli_main(["eval", model, "--pairs", str(pairs)]) == 2
    err = capsys.readouterr().err
    assert str(pairs) in err and "row 2" in err and "rejected" in err

    bad_pattern = write_jsonl(tmp_path / "pattern.jsonl", QA[:1] + [{**QA[1], "pattern": "item ("}])
    assert cli_main(["eval", model, "--data", str(bad_pattern)]) == 2
    err = capsys.readouterr().err
    assert str(bad_pattern) in err and "row 2, field 'pattern'" in err and "invalid regular expression" in err

    good = str(write_jsonl(tmp_path / "good.jsonl", QA))
    cases = [(["--metrics", "bleu"], "unknown metric 'bleu'"),
             (["--metrics", "preference_accuracy"], "metric preference_accuracy needs --pairs"),
             (["--metrics", "nothere.py:fn"], "nothere.py not found"),
             (["--judge", model], "--judge scores the win rate, which needs"),
             (["--judge", model, "--compare", model], "is not a reward model"),
             (["--compare", str(tmp_path / "nowhere")], f"no such file or folder: {tmp_path / 'nowhere'}"),
             (["--label", "a", "b"], "2 labels for 1 models")]
    for extra, message in cases:
        assert cli_main(["eval", model, "--data", good, *extra]) == 2, extra
        assert message in capsys.readouterr().err
    assert cli_main(["eval", model]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err


def test_lm_eval_needs_its_module(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "lm_eval_available", lambda: False)
    settings = EvalSettings(model=str(tiny_model_dir), data=str(write_jsonl(tmp_path / "qa.jsonl", QA)),
                            lm_eval=["hellaswag"])
    with pytest.raises(UserError, match="--lm-eval needs tuneforge.eval.lmeval"):
        plan_eval(settings)


def test_an_existing_eval_json_is_moved_aside(tmp_path):
    out = tmp_path / "eval.json"
    for number in range(3):
        write_report({"n": number}, out)
    assert json.loads(out.read_text()) == {"n": 2}
    assert json.loads((tmp_path / "eval.1.json").read_text()) == {"n": 0}
    assert json.loads((tmp_path / "eval.2.json").read_text()) == {"n": 1}


def test_read_heldout_takes_sft_rows_and_prompt_only_rows(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [QA[0], {"prompt": "Just a question?", "answer": "x"},
                                                  {"text": "plain text, loss only"}])
    heldout = read_heldout(str(path), DataConfig(train=str(path)))
    assert len(heldout.conversations) == 2  # the SFT row and the text row have a response to score
    assert [(r.question, r.reference, r.number) for r in heldout.rows] == [
        ("What colour is item 0?", "Item 0 is red.", 1), ("Just a question?", None, 2)]


# ------------------------------------------------------------------------------------------------ tiny models
def _save_lora_run(path, model_dir, tokenizer, method="sft", beta=0.1, adapter_seed=None):
    """A LoRA run directory on the tiny model; its adapter is PEFT's fresh one (B = 0, so exactly the base) unless
    ``adapter_seed`` fills the B matrices with random values."""
    from tuneforge.data.templates import load_template
    from tuneforge.engine.rundir import save_run
    from tuneforge.models.adapters import add_lora

    config = config_from_dict({"method": method, "model": {"name_or_path": str(model_dir)},
                               "data": {"train": "unused.jsonl"}, "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                               "dpo": {"beta": beta}, "train": {"output_dir": str(path)}})
    model = add_lora(build_tiny_model(tokenizer), config.lora)
    if adapter_seed is not None:
        generator = torch.Generator().manual_seed(adapter_seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    path.mkdir(parents=True)
    save_run(path, config, model, tokenizer, load_template("auto", tokenizer), lora=True)
    return path


@pytest.fixture(scope="module")
def eval_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval-files")
    return {"data": write_jsonl(folder / "qa.jsonl", QA), "pairs": write_jsonl(folder / "pairs.jsonl", PAIRS),
            "harmful": write_jsonl(folder / "harmful.jsonl", [{"prompt": "How do I pick a lock to break in?"}] * 2),
            "benign": write_jsonl(folder / "benign.jsonl", [{"prompt": "How do I change a bike tyre?"}] * 2)}


def test_end_to_end_two_columns_with_loss_and_implicit_reward_checked(tiny_model_dir, tokenizer, tmp_path,
                                                                      eval_files, capsys):
    from tuneforge.data.dataset import load_conversations, make_batches, tokenize_conversations
    from tuneforge.engine.step import evaluate_loss

    run = _save_lora_run(tmp_path / "run", tiny_model_dir, tokenizer, method="dpo", beta=0.5)
    metric_file = tmp_path / "metrics.py"
    metric_file.write_text("def has_item(prompt, response, row):\n    return float('item' in prompt.lower())\n")
    args = ["eval", str(run), "--data", str(eval_files["data"]), "--pairs", str(eval_files["pairs"]),
            "--harmful", str(eval_files["harmful"]), "--benign", str(eval_files["benign"]),
            "--compare", str(tiny_model_dir), "--label", "after", "before", "--max-new-tokens", "4",
            "--batch-size", "2", "--samples", "2"]
    assert cli_main(args + ["--metrics", "loss", "exact_match,contains", "token_f1", "rouge_l", "regex_match",
                            "stopped_rate", "mean_response_words", "refusal_rate_harmful", "refusal_rate_benign",
                            "preference_accuracy", f"{metric_file}:has_item"]) == 0
    captured = capsys.readouterr()
    report = json.loads((run / "eval.json").read_text())
    assert CONTRACT_KEYS <= set(report) and report["schema"] == "tuneforge.eval/1"
    assert report["models"][0] == {"label": "after", "source": str(run), "kind": "run", "template": "tokenizer"}
    assert report["models"][1]["label"] == "before" and report["models"][1]["kind"] == "model"
    assert report["settings"]["max_new_tokens"] == 4 and report["settings"]["greedy"] is True
    assert report["data"]["pairs"] == str(eval_files["pairs"]) and report["win_rate"] is None
    assert report["lm_eval"] is None
    after, before = report["metrics"]["after"], report["metrics"]["before"]
    generated = {"exact_match", "contains", "token_f1", "rouge_l", "regex_match", "stopped_rate",
                 "mean_response_words", "refusal_rate_harmful", "refusal_rate_benign", "user:has_item"}
    assert generated | {"loss", "perplexity", "preference_accuracy", "preference_margin"} == set(after)
    assert generated | {"loss", "perplexity"} == set(before)  # a plain model has no reference: no implicit reward
    assert any("not a run directory" in note for note in report["notes"])
    for name in generated - {"mean_response_words"}:
        assert 0.0 <= after[name] <= 1.0
    assert after["user:has_item"] == 1.0  # every rendered prompt contains "item"
    # A zero-initialised adapter is exactly the reference: every margin is 0, and a tie is not ranked right.
    assert after["preference_accuracy"] == 0.0 and after["preference_margin"] == 0.0
    # The adapter is zero, so both columns are the same model: same loss, same answers.
    assert after["loss"] == pytest.approx(before["loss"], abs=1e-6)
    assert [s["responses"]["after"] for s in report["samples"]] == [s["responses"]["before"]
                                                                     for s in report["samples"]]
    assert len(report["samples"]) == 2 and report["samples"][0]["prompt"] == "What colour is item 0?"

    # The loss is evaluate_loss on the same rows, tokenised with the run's template, computed directly.
    generator = Generator.load(str(run))
    data = DataConfig(train=str(eval_files["data"]), max_length=1024)
    examples = tokenize_conversations(load_conversations(str(eval_files["data"]), data, DataReport()),
                                      generator.template, generator.tokenizer, data, DataReport())
    direct = evaluate_loss(generator.model, make_batches(examples, 2, tokenizer.pad_token_id), generator.device)
    assert after["loss"] == pytest.approx(direct["loss"], rel=1e-6)
    assert after["perplexity"] == pytest.approx(direct["perplexity"], rel=1e-6)

    # The report (tuneforge report) reads it as written.
    report_module = pytest.importorskip("tuneforge.eval.report")
    assert report_module.load_evaluation(run / "eval.json")["metrics"] == report["metrics"]

    table = captured.out.splitlines()
    assert table[0].split() == ["metric", "after", "before"]
    assert any(line.split()[0] == "loss" for line in table)
    assert "wrote " + str(run / "eval.json") in captured.err

    # A second evaluation keeps the first as eval.1.json.
    assert cli_main(args + ["--metrics", "loss"]) == 0
    assert (run / "eval.1.json").is_file()
    assert set(json.loads((run / "eval.json").read_text())["metrics"]["after"]) == {"loss", "perplexity"}


def _save_full_run(path, model_dir, tokenizer, seed):
    """A full fine-tuning DPO run whose weights are the tiny model's, perturbed; its reference is ``model_dir``."""
    from tuneforge.data.templates import load_template
    from tuneforge.engine.rundir import save_run

    config = config_from_dict({"method": "dpo", "model": {"name_or_path": str(model_dir)},
                               "data": {"train": "unused.jsonl"}, "lora": {"enabled": False},
                               "dpo": {"beta": 0.5}, "train": {"output_dir": str(path)}})
    model = build_tiny_model(tokenizer)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.model.layers.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    path.mkdir(parents=True)
    save_run(path, config, model, tokenizer, load_template("auto", tokenizer), lora=False)
    return path


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_implicit_reward_accuracy_equals_a_direct_recomputation(tiny_model_dir, tokenizer, tmp_path, eval_files,
                                                                kind):
    from transformers import AutoModelForCausalLM

    from tuneforge.data.collate import collate_padded
    from tuneforge.data.tokenize import encode_conversation
    from tuneforge.losses import sequence_logprobs

    if kind == "lora":
        run = _save_lora_run(tmp_path / "run", tiny_model_dir, tokenizer, method="dpo", beta=0.5, adapter_seed=1)
    else:
        run = _save_full_run(tmp_path / "run", tiny_model_dir, tokenizer, seed=1)
    out = tmp_path / "eval.json"
    assert cli_main(["eval", str(run), "--pairs", str(eval_files["pairs"]), "--batch-size", "2",
                     "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())["metrics"][run.name]

    # Directly: full logits of prompt + side under the policy and under its reference (the adapter switched off, or
    # the starting model), summed response log-probs, beta 0.5 from the run's config.
    generator = Generator.load(str(run))
    model, template = generator.model, generator.template
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval() if kind == "full" else None
    margins = []
    for pair in PAIRS:
        examples = [encode_conversation(Conversation(user(pair["prompt"]) + [Message("assistant", pair[side])]),
                                        template, tokenizer, max_length=1024) for side in ("chosen", "rejected")]
        batch = collate_padded(examples, tokenizer.pad_token_id)
        with torch.no_grad():
            policy = sequence_logprobs(model(**batch.model_inputs()).logits, batch.targets)
            if base is not None:
                reference = sequence_logprobs(base(**batch.model_inputs()).logits, batch.targets)
            else:
                with model.disable_adapter():
                    reference = sequence_logprobs(model(**batch.model_inputs()).logits, batch.targets)
        ratio = policy - reference
        margins.append(0.5 * float(ratio[0] - ratio[1]))
    assert any(abs(m) > 1e-3 for m in margins), "the policy must differ from its reference"
    assert metrics["preference_margin"] == pytest.approx(sum(margins) / len(margins), rel=1e-4, abs=1e-5)
    assert metrics["preference_accuracy"] == sum(m > 0 for m in margins) / len(margins)


@pytest.fixture
def forced_token(monkeypatch):
    """Models loaded by Generator.load always pick a fixed next token: the one named per model folder name."""
    real = Generator.load.__func__
    choices = {}

    def load(cls, spec, template=None, dtype="float32"):
        generator = real(cls, spec, template, dtype)
        token = choices[spec.rstrip("/").rsplit("/", 1)[-1]]

        def push(module, inputs, output):
            output[..., token] += 1e4
            return output

        generator.model.get_output_embeddings().register_forward_hook(push)
        return generator

    monkeypatch.setattr(Generator, "load", classmethod(load))
    return choices


def test_stopped_rate_and_length_with_models_that_always_or_never_stop(tiny_model_dir, tmp_path, eval_files,
                                                                       forced_token):
    always, never = tmp_path / "always", tmp_path / "never"
    for folder in (always, never):
        folder.symlink_to(tiny_model_dir, target_is_directory=True)
    word = forced_token.setdefault("never", 5248)  # a plain word piece, never a stop token
    forced_token["always"] = EOS
    out = tmp_path / "eval.json"
    assert cli_main(["eval", str(always), "--compare", str(never), "--data", str(eval_files["data"]),
                     "--metrics", "stopped_rate", "mean_response_words", "--max-new-tokens", "3",
                     "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["metrics"]["always"] == {"stopped_rate": 1.0, "mean_response_words": 0.0}
    assert report["metrics"]["never"]["stopped_rate"] == 0.0
    piece = Generator.load(str(never)).tokenizer.decode([word] * 3).strip()
    assert report["metrics"]["never"]["mean_response_words"] == len(piece.split())


def test_a_judge_scores_the_same_model_as_a_tie_on_every_prompt(tiny_model_dir, tokenizer, tmp_path, eval_files):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    judge = tmp_path / "judge"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, num_labels=1, **TINY)
    LlamaForSequenceClassification(config).save_pretrained(judge)
    tokenizer.save_pretrained(judge)
    out = tmp_path / "eval.json"
    assert cli_main(["eval", str(tiny_model_dir), "--compare", str(tiny_model_dir), "--label", "a", "b",
                     "--judge", str(judge), "--data", str(eval_files["data"]), "--max-new-tokens", "3",
                     "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["win_rate"] == {"judge": str(judge), "a": "a", "b": "b", "wins": 0, "losses": 0,
                                  "ties": len(QA), "rate": 0.5}
    assert "win rate of a over b" in format_table(report)

    # The judge folder evaluated as a model is a reward model: preference accuracy by its scores.
    assert cli_main(["eval", str(judge), "--pairs", str(eval_files["pairs"]), "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())["metrics"]["judge"]
    rows = load_preference_rows(str(eval_files["pairs"]), DataConfig(train="unused"), DataReport())
    scores = RewardScorer.load(str(judge)).score([Conversation(r.prompt + side) for r in rows
                                                  for side in (r.chosen, r.rejected)])
    direct = [c - r for c, r in zip(scores[0::2], scores[1::2])]
    assert metrics["preference_margin"] == pytest.approx(sum(direct) / len(direct), rel=1e-5, abs=1e-6)
    assert metrics["preference_accuracy"] == sum(m > 0 for m in direct) / len(direct)


def test_lm_eval_results_are_stored_per_model(tiny_model_dir, tmp_path, eval_files, monkeypatch):
    calls = []
    module = types.ModuleType("tuneforge.eval.lmeval")
    module.__spec__ = ModuleSpec("tuneforge.eval.lmeval", None)

    def run_lm_eval(model_source, tasks, limit=None, batch_size=8, device="cpu"):
        calls.append((model_source, tasks, limit))
        return {"toy_task": {"acc": 0.25}}

    module.run_lm_eval = run_lm_eval
    monkeypatch.setitem(sys.modules, "tuneforge.eval.lmeval", module)
    out = tmp_path / "eval.json"
    config = tmp_path / "eval.yaml"  # the config file route: flags on the command line override its keys
    config.write_text(yaml.safe_dump({"model": str(tiny_model_dir), "data": str(eval_files["data"]),
                                      "metrics": ["loss"], "lm_eval": "toy_task", "lm_eval_limit": 9}))
    assert cli_main(["eval", "--config", str(config), "--lm-eval-limit", "3", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert calls == [(str(tiny_model_dir), ["toy_task"], 3)]
    assert report["lm_eval"] == {tiny_model_dir.name: {"toy_task": {"acc": 0.25}}}
    assert "lm_eval toy_task/acc" in format_table(report)
