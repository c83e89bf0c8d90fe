"""GRPO / RLOO recipe on the tiny model: rollouts, rewards, advantages, the loss at the first step, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import write_jsonl
from tuneforge.cli import main as cli_main
from tuneforge.config import config_from_dict
from tuneforge.errors import ConfigError, DataError
from tuneforge.engine.trainer import Trainer
from tuneforge.generation import response_mask
from tuneforge.losses import masked_mean
from tuneforge.recipes import registry
from tuneforge.recipes._online import response_forward
from tuneforge.recipes.grpo import GRPORecipe

HERE = Path(__file__).resolve()
# Prompts of different lengths, so a micro-batch has left padding.
PROMPT_ROWS = [{"prompt": f"What is {i} plus {i}?" + " Think step by step." * (i % 3), "answer": str(2 * i),
                "tag": f"row-{i}"} for i in range(8)]
CALLS: list[tuple[str, str, dict]] = []


# Reward functions, addressed as "<this file>:name" or, where the test reads CALLS, as the module pytest imported
# ("test_grpo:name": a file path would load a second copy of this module, with its own CALLS).
def constant_reward(prompt: str, response: str, row: dict) -> float:
    return 1.0


def length_reward(prompt: str, response: str, row: dict) -> float:
    return float(len(response))


def recording_reward(prompt: str, response: str, row: dict) -> float:
    CALLS.append((prompt, response, row))
    return float(len(response) % 3)


def spec(name: str) -> str:
    return f"{HERE}:{name}"


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "prompts.jsonl", PROMPT_ROWS)


def grpo_config(tiny_model_dir, tmp_path, train_file, method="grpo", **sections):
    values = {
        "method": method,
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"train": str(train_file), "max_length": 128},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"output_dir": str(tmp_path / "run"), "epochs": 1, "batch_size": 2, "lr": 1e-3, "log_every": 1,
                  "seed": 0, "mixed_precision": "no"},
        "grpo": {"num_generations": 4, "max_new_tokens": 8, "reward_functions": [spec("length_reward")]},
    }
    for section, updates in sections.items():
        values.setdefault(section, {}).update(updates)
    return config_from_dict(values)


def ready_recipe(config) -> Trainer:
    trainer = Trainer(config, run_dir=False, log=lambda message: None, show_progress=False)
    trainer.setup()
    return trainer


def first_window(trainer: Trainer) -> list:
    batches = trainer.epoch_batches(shuffle=False)
    return batches[:trainer.config.train.grad_accum]


def step_metrics(trainer: Trainer) -> dict:
    """The numbers the trainer would log for the step so far (its statistics' means, through the recipe)."""
    return trainer.recipe.step_metrics(trainer.stats.means(trainer.dist.enabled))


def test_methods_route_to_the_grpo_recipe():
    assert registry.get("grpo").recipe_class() is GRPORecipe and registry.get("rloo").recipe_class() is GRPORecipe


def test_configs_naming_the_old_module_of_the_reward_functions_still_load():
    from tuneforge.rewards.functions import exact_answer, format_regex, load_callable

    assert load_callable("tuneforge.eval.functions:exact_answer") is exact_answer
    assert load_callable("tuneforge.eval.functions:format_regex") is format_regex


def test_response_mask_keeps_the_first_stop_token_and_nothing_after():
    responses = torch.tensor([[5, 6, 2, 2, 2], [5, 2, 7, 2, 8], [5, 6, 7, 8, 9]])
    mask, stopped = response_mask(responses, [2])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert stopped.tolist() == [True, True, False]


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_a_group_with_identical_rewards_gives_no_gradient(tiny_model_dir, tmp_path, prompts_file, method):
    config = grpo_config(tiny_model_dir, tmp_path, prompts_file, method,
                         grpo={"beta": 0.0, "reward_functions": [spec("constant_reward")]})
    trainer = ready_recipe(config)
    trainer.compute_gradients(trainer.recipe.collect_rollouts(first_window(trainer)))
    rollout = trainer.recipe.last_rollouts[0]
    assert torch.equal(rollout.advantages, torch.zeros_like(rollout.advantages))
    grads = [p.grad for p in trainer.model.parameters() if p.requires_grad]
    assert grads and all(g is None or torch.count_nonzero(g) == 0 for g in grads)


@pytest.mark.parametrize("normalisation", ["token", "sequence"])
def test_first_step_policy_is_the_reference_and_loss_matches_grpo_at_ratio_one(tiny_model_dir, tmp_path,
                                                                                prompts_file, normalisation):
    config = grpo_config(tiny_model_dir, tmp_path, prompts_file, train={"grad_accum": 2},
                         grpo={"beta": 0.04, "normalisation": normalisation})
    trainer = ready_recipe(config)
    loss = float(trainer.compute_gradients(trainer.recipe.collect_rollouts(first_window(trainer))))
    rollouts = trainer.recipe.last_rollouts
    assert len(rollouts) == 2 and all(r.samples.mask.shape[0] == 2 * 4 for r in rollouts)
    assert any(torch.count_nonzero(r.advantages) for r in rollouts)  # the check below is not vacuous
    metrics = step_metrics(trainer)
    # LoRA's B starts at zero: the policy is exactly the reference, so the KL estimate is 0.
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-7)
    # At ratio 1 and KL 0 each response token's loss is -A of its response; averaged over the whole step.
    if normalisation == "token":
        weighted = sum(float((-r.advantages[:, None] * r.samples.mask).sum()) for r in rollouts)
        expected = weighted / sum(float(r.samples.mask.sum()) for r in rollouts)
    else:
        expected = sum(float(-r.advantages.sum()) for r in rollouts) / sum(len(r.advantages) for r in rollouts)
    assert loss == pytest.approx(expected, abs=1e-5)
    # The advantages are GRPO's: each group of 4 centred and scaled by its std.
    rewards = rollouts[0].samples.rewards.reshape(-1, 4)
    centred = (rewards - rewards.mean(dim=1, keepdim=True)) / (rewards.std(dim=1, keepdim=True) + 1e-4)
    assert torch.allclose(rollouts[0].advantages, centred.flatten(), atol=1e-5)
    # The reward is the response's length in characters; the metrics report its mean over the step.
    all_rewards = torch.cat([r.samples.rewards for r in rollouts])
    assert metrics["reward"] == pytest.approx(float(all_rewards.mean()), rel=1e-6)
    assert metrics["reward_length_reward"] == pytest.approx(metrics["reward"], rel=1e-6)
    lengths = torch.cat([r.samples.mask.sum(dim=1) for r in rollouts]).float()
    assert metrics["response_length"] == pytest.approx(float(lengths.mean()))
    assert 0.0 <= metrics["stopped_fraction"] <= 1.0 and metrics["clip_fraction"] == 0.0
    assert masked_mean(rollouts[0].ref_logp, rollouts[0].samples.mask) < 0


def test_token_logprobs_match_each_unpadded_sequence_alone(tiny_model_dir, tmp_path, prompts_file):
    config = grpo_config(tiny_model_dir, tmp_path, prompts_file, grpo={"num_generations": 2})
    trainer = ready_recipe(config)
    torch.manual_seed(0)
    batch = trainer.epoch_batches(shuffle=False)[0]
    rollout = trainer.recipe.rollout(batch)
    model = trainer.model
    with torch.no_grad():
        samples = rollout.samples
        logp = response_forward(model, samples.input_ids, samples.attention_mask, samples.position_ids,
                                samples.prompt_width, samples.mask, chunk_size=7).logp
        for row in range(samples.mask.shape[0]):
            prompt = batch.examples[row // 2].input_ids
            length = int(samples.mask[row].sum())
            response = samples.input_ids[row, samples.prompt_width:samples.prompt_width + length].tolist()
            ids = torch.tensor([prompt + response])
            logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
            expected = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(response)[:, None]).squeeze(1)
            assert torch.allclose(logp[row, :length], expected, atol=1e-4)
            assert torch.count_nonzero(logp[row, length:]) == 0
    # The reference is the model with the adapter off; at the start (LoRA B = 0) the two agree.
    assert torch.allclose(rollout.ref_logp, logp, atol=1e-5)


def test_rewards_read_the_decoded_response_and_the_row(tiny_model_dir, tmp_path, prompts_file, tokenizer):
    config = grpo_config(tiny_model_dir, tmp_path, prompts_file,
                         grpo={"num_generations": 2, "reward_functions": ["test_grpo:recording_reward"]})
    trainer = ready_recipe(config)
    CALLS.clear()
    batch = first_window(trainer)[0]
    trainer.compute_gradients(trainer.recipe.collect_rollouts([batch]))
    rollout = trainer.recipe.last_rollouts[0]
    assert len(CALLS) == 2 * 2
    responses = rollout.samples.input_ids[:, rollout.samples.prompt_width:]
    stops = set(trainer.recipe.online.stop_ids())
    for index, (prompt, response, row) in enumerate(CALLS):
        example = batch.examples[index // 2]
        # The row's fields reach the reward function, whatever they are.
        assert row["tag"] == example.fields["tag"] and row["answer"] == example.fields["answer"]
        assert row["prompt"] in prompt and prompt == example.text
        ids = responses[index][:int(rollout.samples.mask[index].sum())].tolist()
        if ids and ids[-1] in stops:
            ids = ids[:-1]
        assert response == tokenizer.decode(ids, skip_special_tokens=True).strip() == rollout.samples.responses[index]
        assert rollout.samples.rewards[index] == float(len(response) % 3)


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_cli_trains_two_steps_and_logs_rewards(tiny_model_dir, tmp_path, prompts_file, method):
    run_dir = tmp_path / f"run-{method}"
    config = {
        "method": method,
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"train": str(prompts_file), "max_length": 128, "val_fraction": 0.25},
        "lora": {"r": 4, "alpha": 8},
        "train": {"output_dir": str(run_dir), "max_steps": 2, "batch_size": 2, "log_every": 1,
                  "mixed_precision": "no"},
        "eval": {"metric": "val_reward", "every": 2},
        "grpo": {"num_generations": 2, "max_new_tokens": 8,
                 "reward_functions": [spec("length_reward"), spec("constant_reward")],
                 "reward_weights": [1.0, 0.5], "scale_by_std": method == "grpo"},
    }
    path = tmp_path / f"{method}.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli_main(["train", str(path)]) == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for record in steps:
        assert record["reward_constant_reward"] == 1.0
        assert record["reward"] == pytest.approx(record["reward_length_reward"] + 0.5)
        assert {"reward_std", "kl", "clip_fraction", "response_length", "stopped_fraction"} <= set(record)
    evaluations = [r for r in records if "val_reward" in r]
    assert evaluations and evaluations[-1]["step"] == 2
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["metric"] == "val_reward" and summary["best_step"] == 2 and summary["method"] == method


@pytest.mark.parametrize("updates, message", [
    ({"grpo": {"reward_functions": []}}, "grpo.reward_functions"),
    ({"grpo": {"reward_functions": ["no_colon"]}}, "grpo.reward_functions"),
    ({"grpo": {"reward_functions": ["a:b"], "reward_weights": [1.0, 2.0]}}, "grpo.reward_weights"),
    ({"grpo": {"reward_functions": ["a:b"], "num_generations": 1}}, "grpo.num_generations"),
    ({"grpo": {"reward_functions": ["a:b"], "normalisation": "batch"}}, "grpo.normalisation"),
    ({"grpo": {"reward_functions": ["a:b"], "mini_batches": 3}, "train": {"grad_accum": 4}}, "grpo.mini_batches"),
    ({"grpo": {"reward_functions": ["a:b"], "ppo_epochs": 0}}, "grpo.ppo_epochs"),
    ({"grpo": {"reward_functions": ["a:b"]}, "data": {"val_fraction": 0.2}}, "eval.metric"),
    ({"grpo": {"reward_functions": ["a:b"]}, "distributed": {"strategy": "fsdp"}}, "distributed.strategy"),
])
def test_config_errors(tmp_path, updates, message):
    values = {"method": "grpo", "data": {"train": "prompts.jsonl"}, **updates}
    with pytest.raises(ConfigError, match=message):
        config_from_dict(values)


def test_reward_functions_are_not_needed_by_other_methods():
    assert config_from_dict({"method": "sft", "data": {"train": "x.jsonl"}}).grpo.reward_functions == []


def test_bad_prompt_rows_fail_before_the_model_loads(tiny_model_dir, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "fine"}, {"question": "no prompt here"}])
    config = grpo_config(tiny_model_dir, tmp_path, bad)
    with pytest.raises(DataError, match=r"bad.jsonl, row 2, field 'prompt'"):
        ready_recipe(config)
    skipping = grpo_config(tiny_model_dir, tmp_path, bad, data={"on_error": "skip"})
    trainer = ready_recipe(skipping)
    assert len(trainer.data.train) == 1 and trainer.data.reports[0].dropped["missing_field"] == 1


def test_val_reward_is_maximised():
    from tuneforge.engine.checkpoint import TrainState
    from tuneforge.engine.early_stopping import record_evaluation

    config = config_from_dict({"method": "grpo", "data": {"train": "x.jsonl", "val_fraction": 0.2},
                               "eval": {"metric": "val_reward"}, "grpo": {"reward_functions": ["a:b"]}})
    assert not config.eval.minimise()
    state = TrainState()
    assert record_evaluation(state, config.eval, {"val_reward": 0.2}, None)
    state.step = 1
    assert record_evaluation(state, config.eval, {"val_reward": 0.5}, None) and state.best_step == 1
    assert not record_evaluation(state, config.eval, {"val_reward": 0.1}, None)


def test_prompts_without_room_for_the_response_are_dropped_or_raise(tiny_model_dir, tmp_path, prompts_file):
    from tuneforge.errors import UserError

    short = {"max_length": 16}
    with pytest.raises(UserError, match="every prompt is longer than data.max_length - grpo.max_new_tokens"):
        ready_recipe(grpo_config(tiny_model_dir, tmp_path, prompts_file, data=short))
    with pytest.raises(DataError, match=r"prompts.jsonl, row 1, field 'prompt'.*data.max_length=16"):
        ready_recipe(grpo_config(tiny_model_dir, tmp_path, prompts_file, data={**short, "on_truncation": "raise"}))


def test_preview_shows_the_prompts_as_the_model_sees_them(tmp_path, tiny_model_dir, capsys):
    import yaml

    from conftest import write_jsonl
    from tuneforge.cli import main

    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "What is 2 + 3?", "answer": "5"}])
    config = {"method": "grpo", "model": {"name_or_path": str(tiny_model_dir)},
              "data": {"train": str(data), "max_length": 128},
              "grpo": {"reward_functions": ["tuneforge.rewards.functions:exact_answer"]}}
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["data", "preview", str(path), "--no-color"]) == 0
    out = capsys.readouterr().out
    assert "What is 2 + 3?" in out and "<|im_start|>assistant\n" in out and "answer" in out
