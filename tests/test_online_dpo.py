"""Online DPO on the tiny model: pairs ranked by the judge, ties skipped and counted, the step's loss against a
recomputation from full logits, batch-geometry invariance, exact resume, the CLI, the Python API and the bench."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import write_jsonl
from test_engine_resume import assert_same_weights, complete_steps, describe, quiet, run_child
from test_grpo import PROMPT_ROWS
from test_online_resume import step_records, trained_weights
from test_training import assert_same_grads, randomise_lora_b, relative_difference
from tuneforge.cli import main as cli_main
from tuneforge.config import config_from_dict
from tuneforge.engine import checkpoint as ckpt
from tuneforge.engine.trainer import Trainer
from tuneforge.errors import ConfigError
from tuneforge.recipes import registry
from tuneforge.recipes._online import SAMPLING_STATE_KEY
from tuneforge.recipes.online_dpo import OnlineDPORecipe, rank_pairs

HERE = Path(__file__).resolve()
TIED_EVERY = 4  # prompts whose tag index is a multiple of this are judged by a constant: their pairs tie


# Judges, addressed as "<this file>:name".
def length_reward(prompt: str, response: str, row: dict) -> float:
    return float(len(response))


def constant_reward(prompt: str, response: str, row: dict) -> float:
    return 1.0


def some_ties(prompt: str, response: str, row: dict) -> float:
    """A constant for every TIED_EVERY-th prompt (its two samples tie), the response's length for the others."""
    return 1.0 if int(row["tag"].split("-")[1]) % TIED_EVERY == 0 else float(len(response))


def spec(name: str) -> str:
    return f"{HERE}:{name}"


def dpo_values(tiny_model_dir, tmp_path, train_file, **sections) -> dict:
    values = {
        "method": "online_dpo",
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"train": str(train_file), "max_length": 128, "shuffle": False},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"output_dir": str(tmp_path / "run"), "epochs": 1, "batch_size": 2, "lr": 1e-2, "log_every": 1,
                  "seed": 0, "mixed_precision": "no"},
        "online_dpo": {"max_new_tokens": 8, "beta": 0.5, "reward_functions": [spec("some_ties")]},
    }
    for section, updates in sections.items():
        values.setdefault(section, {}).update(updates)
    return values


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "prompts.jsonl", PROMPT_ROWS)


@pytest.fixture
def make_trainer(tiny_model_dir, tmp_path, prompts_file):
    def make(**sections) -> Trainer:
        config = config_from_dict(dpo_values(tiny_model_dir, tmp_path, prompts_file, **sections))
        trainer = Trainer(config, run_dir=False, log=quiet, show_progress=False)
        trainer.setup()
        return trainer

    return make


def window(trainer: Trainer, index: int = 0) -> list:
    accum = trainer.config.train.grad_accum
    return trainer.epoch_batches(shuffle=False)[index * accum:(index + 1) * accum]


def step_metrics(trainer: Trainer) -> dict:
    return trainer.recipe.step_metrics(trainer.stats.means(trainer.dist.enabled))


def untied_pairs(rollouts) -> int:
    return sum(int(r.weights.sum()) for r in rollouts)


# ------------------------------------------------------------------------------------------------ the pieces
def test_the_method_is_registered_once_as_an_online_method_with_a_reference():
    spec_ = registry.get("online_dpo")
    assert spec_.recipe_class() is OnlineDPORecipe
    assert spec_.online and spec_.reference and spec_.data == "prompts" and not spec_.loss_validation


def test_rank_pairs_orders_each_prompts_two_samples_by_score():
    better, worse, untied = rank_pairs(torch.tensor([1.0, 2.0, 3.0, 3.0, 5.0, 4.0, -1.0, -0.5]))
    assert better.tolist() == [1, 2, 4, 7] and worse.tolist() == [0, 3, 5, 6]
    assert untied.tolist() == [True, False, True, True]


@pytest.mark.parametrize("updates, message", [
    ({"online_dpo": {"reward_functions": []}}, "online_dpo.reward_functions"),
    ({"online_dpo": {"reward_functions": ["a:b"], "beta": 0.0}}, "online_dpo.beta"),
    ({"online_dpo": {"reward_functions": ["a:b"], "loss": "cdpo"}}, "online_dpo.loss"),
    ({"online_dpo": {"reward_functions": ["a:b"], "clip_range": 0.1}}, "online_dpo.clip_range"),
    ({"online_dpo": {"reward_functions": ["a:b"], "mini_batches": 3}, "train": {"grad_accum": 4}},
     "online_dpo.mini_batches"),
    ({"online_dpo": {"reward_functions": ["a:b"]}, "data": {"val_fraction": 0.2}}, "eval.metric"),
    ({"online_dpo": {"reward_functions": ["a:b"]}, "distributed": {"strategy": "fsdp"}}, "distributed.strategy"),
])
def test_config_errors(updates, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"method": "online_dpo", "data": {"train": "prompts.jsonl"}, **updates})


def test_the_judges_paths_in_a_config_file_are_relative_to_it(tmp_path):
    from tuneforge.config import load_config

    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "run.yaml").write_text(yaml.safe_dump({
        "method": "online_dpo", "data": {"train": "prompts.jsonl"},
        "online_dpo": {"reward_functions": ["judge.py:score", "tuneforge.rewards.functions:exact_answer"],
                       "reward_model": "../runs/rm"}}))
    config = load_config(configs / "run.yaml", ["online_dpo.reward_weights=[1.0, 0.5]"])
    assert config.online_dpo.reward_functions == [f"{configs / 'judge.py'}:score",
                                                  "tuneforge.rewards.functions:exact_answer"]
    assert config.online_dpo.reward_model == str(tmp_path / "runs" / "rm")


# ------------------------------------------------------------------------------------------------- the step
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_at_the_first_step_the_policy_is_the_reference_and_the_loss_is_ln_2(make_trainer, lora):
    trainer = make_trainer(train={"grad_accum": 2}, lora={"enabled": lora},
                           online_dpo={"reward_functions": [spec("length_reward")]})
    rollouts = trainer.recipe.collect_rollouts(window(trainer))
    assert len(rollouts) == 2 and all(r.samples.mask.shape[0] == 2 * 2 for r in rollouts)
    assert untied_pairs(rollouts) > 0  # the check below is not vacuous
    loss = float(trainer.compute_gradients(rollouts))
    assert loss == pytest.approx(math.log(2), abs=1e-6)
    metrics = step_metrics(trainer)
    for name in ("rewards_chosen", "rewards_rejected", "reward_margin"):
        assert metrics[name] == pytest.approx(0.0, abs=1e-6)
    # Not a zero gradient: -log sigmoid(beta h) pulls h up from 0.
    assert any(p.grad is not None and torch.count_nonzero(p.grad) for p in trainer.model.parameters())


def sequence_logprob(model: torch.nn.Module, prompt: list[int], response: list[int], temperature: float) -> float:
    """log pi(response | prompt) of the unpadded sequence alone, from the model's full logits."""
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float() / temperature
    return float(torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(response)[:, None]).sum())


@pytest.mark.parametrize("lora, loss_type, temperature", [(True, "sigmoid", 1.0), (True, "ipo", 0.7),
                                                          (False, "sigmoid", 1.0)], ids=["lora", "ipo-T", "full"])
def test_the_step_loss_is_dpo_recomputed_from_full_logits_on_the_pairs_the_judge_ranked(make_trainer, lora,
                                                                                      loss_type, temperature):
    beta = 0.5
    trainer = make_trainer(train={"grad_accum": 2}, lora={"enabled": lora},
                           online_dpo={"loss": loss_type, "temperature": temperature, "beta": beta})
    trainer.train_step(window(trainer, 0))  # the policy moves away from the reference
    rollouts = trainer.recipe.collect_rollouts(window(trainer, 1))
    loss = float(trainer.compute_gradients(rollouts))

    model = trainer.model
    reference = trainer.recipe.online.reference
    losses, moved = [], False
    with torch.no_grad():
        for rollout, batch in zip(rollouts, window(trainer, 1)):
            samples = rollout.samples
            for pair, example in enumerate(batch.examples):
                rows = [2 * pair, 2 * pair + 1]
                scores = [float(samples.rewards[row]) for row in rows]
                if scores[0] == scores[1]:
                    continue  # a tie: no preference, no loss
                # The judge's order, read here from the scores themselves: better = higher score.
                ordered = sorted(rows, key=lambda row: -float(samples.rewards[row]))
                sides = []
                for row in ordered:
                    length = int(samples.mask[row].sum())
                    response = samples.input_ids[row, samples.prompt_width:samples.prompt_width + length].tolist()
                    policy = sequence_logprob(model, example.input_ids, response, temperature)
                    with reference.model(model) as ref_model:
                        ref = sequence_logprob(ref_model, example.input_ids, response, temperature)
                    moved = moved or abs(policy - ref) > 1e-3
                    sides.append((policy, ref, length))
                (pw, rw, lw), (pl, rl, ll) = sides
                if loss_type == "ipo":
                    h = (pw - rw) / lw - (pl - rl) / ll
                    losses.append((h - 1 / (2 * beta)) ** 2)
                else:
                    h = (pw - rw) - (pl - rl)
                    losses.append(float(-F.logsigmoid(torch.tensor(beta * h))))
    assert moved and losses, "the policy should differ from the reference on some untied pair"
    assert 0 < untied_pairs(rollouts) < sum(len(r.samples.rewards) // 2 for r in rollouts)  # ties were skipped
    assert len(losses) == untied_pairs(rollouts)
    assert loss == pytest.approx(sum(losses) / len(losses), rel=1e-4, abs=1e-5)


def test_pairs_are_ordered_by_the_judge_and_ties_are_skipped_and_counted(make_trainer):
    trainer = make_trainer(train={"grad_accum": 3, "batch_size": 2})
    rollouts = trainer.recipe.collect_rollouts(window(trainer))
    pairs = sum(r.samples.rewards.shape[0] // 2 for r in rollouts)
    tied = 0
    for rollout in rollouts:
        samples, rows = rollout.samples, rollout.rows
        better, worse = rows[0::2], rows[1::2]
        equal = samples.rewards[0::2] == samples.rewards[1::2]  # (B,) each prompt's two samples tie
        tied += int(equal.sum())
        # The trained pairs are exactly the untied ones, each the two samples of one prompt, the better side the
        # one the judge scores higher.
        assert (better // 2).tolist() == (worse // 2).tolist() == (~equal).nonzero().flatten().tolist()
        assert torch.all(samples.rewards[better] > samples.rewards[worse])
        assert rollout.ties == int(equal.sum()) and rollout.weights.tolist() == [1.0] * len(better)
        # The trained rows are those samples, their padding trimmed.
        trained = rollout.pairs
        for index, row in enumerate(rows.tolist()):
            length = int(samples.mask[row].sum())
            assert trained.responses[index] == samples.responses[row]
            assert torch.equal(trained.input_ids[index, trained.prompt_width:trained.prompt_width + length],
                               samples.input_ids[row, samples.prompt_width:samples.prompt_width + length])
            prompt = samples.input_ids[row, :samples.prompt_width][samples.attention_mask[row, :samples.prompt_width]
                                                                     .bool()]
            assert torch.equal(trained.input_ids[index, :trained.prompt_width][
                trained.attention_mask[index, :trained.prompt_width].bool()], prompt)
    assert 0 < tied < pairs
    # Every pair of a TIED_EVERY-th prompt ties (the judge gives it a constant).
    assert tied >= sum(1 for r in PROMPT_ROWS[:pairs] if int(r["tag"].split("-")[1]) % TIED_EVERY == 0)
    trainer.compute_gradients(rollouts)
    metrics = step_metrics(trainer)
    assert metrics["ties"] == tied and metrics["tie_fraction"] == pytest.approx(tied / pairs)
    # The judge's scores of both sides and their lengths are logged over the untied pairs.
    better = torch.cat([r.samples.rewards[r.rows[0::2]] for r in rollouts])
    worse = torch.cat([r.samples.rewards[r.rows[1::2]] for r in rollouts])
    length = torch.cat([r.samples.mask.sum(dim=1)[r.rows[1::2]].float() for r in rollouts])
    assert metrics["score_better"] == pytest.approx(float(better.mean()))
    assert metrics["score_worse"] == pytest.approx(float(worse.mean()))
    assert metrics["score_better"] > metrics["score_worse"]
    assert metrics["length_worse"] == pytest.approx(float(length.mean()))
    assert {"reward_accuracy", "reward_margin", "response_length", "reward", "length_better"} <= set(metrics)


def test_a_micro_batch_whose_pairs_all_tie_keeps_one_at_weight_0(make_trainer):
    """Prompts row-0 and row-4 tie (batch 1): their micro-batches still run (DDP needs every micro-batch of an
    update to go through backward) with one pair at weight 0, which adds nothing to the loss or the count."""
    trainer = make_trainer(train={"batch_size": 1, "grad_accum": 2})
    rollouts = trainer.recipe.collect_rollouts(window(trainer))
    tied, trained = rollouts
    assert tied.ties == 1 and tied.weights.tolist() == [0.0] and tied.count == 0.0 and tied.rows.tolist() == [0, 1]
    assert trained.ties == 0 and trained.count == 1.0
    loss = float(trainer.compute_gradients(rollouts))
    assert loss == pytest.approx(math.log(2), abs=1e-6)  # the mean over the one untied pair


def test_the_judge_reads_the_decoded_response_and_the_row(make_trainer):
    trainer = make_trainer(online_dpo={"reward_functions": [spec("some_ties")]})
    batch = window(trainer)[0]
    rollout = trainer.recipe.collect_rollouts([batch])[0]
    for row, text in enumerate(rollout.samples.responses):
        assert float(rollout.samples.rewards[row]) == some_ties("", text, batch.examples[row // 2].fields)


def test_a_step_where_every_pair_ties_trains_nothing(make_trainer):
    trainer = make_trainer(train={"grad_accum": 2}, online_dpo={"reward_functions": [spec("constant_reward")]})
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    loss, grad_norm = trainer.train_step(window(trainer))
    assert float(loss) == 0.0 and float(grad_norm) == 0.0
    assert not trainer.optimizer.state  # no optimiser step was taken
    for name, parameter in trainer.model.named_parameters():
        if parameter.requires_grad:
            assert torch.equal(parameter, before[name]) and parameter.grad is None
    metrics = step_metrics(trainer)
    assert metrics["ties"] == 4 and metrics["tie_fraction"] == 1.0
    assert "reward_margin" not in metrics  # no pair to report on


def test_mini_batches_skip_only_the_update_that_has_nothing_to_train_on(make_trainer):
    """Two updates per step, one prompt each: prompt row-0 ties (the judge gives it a constant), so its update is
    skipped; row-1's runs, at the starting policy (loss ln 2)."""
    trainer = make_trainer(train={"grad_accum": 2, "batch_size": 1}, online_dpo={"mini_batches": 2})
    rollouts = trainer.recipe.collect_rollouts(window(trainer))
    assert [r.count for r in rollouts] == [0.0, 1.0]
    groups = []

    def update(group):
        groups.append(group)
        return trainer.update(group)

    loss, _ = trainer.recipe.online.optimise(rollouts, update)
    assert len(groups) == 1 and len(groups[0]) == 1 and groups[0][0] is rollouts[1]
    assert float(loss) == pytest.approx(math.log(2), abs=1e-6)


# ------------------------------------------------------------------------------------- batch geometry
class FixedEngine:
    """Responses that depend on the prompt and the sample's index only (not on the batch they are sampled in), so
    two batch geometries train on the same pairs. The two samples of a prompt differ in length."""

    def sample(self, prompts, generations, settings):
        out = []
        for prompt in prompts:
            base = sum(prompt) % 5000
            for g in range(generations):
                out.append([1000 + (base * (g + 3) + 97 * k) % 20000 for k in range(2 + 3 * g + len(prompt) % 3)])
        return out

    def sync(self, model):
        pass


def test_one_micro_batch_of_4_prompts_equals_2_x_2_with_accumulation(make_trainer):
    grads, losses, counts, made = {}, {}, {}, {}
    for batch_size, accum in ((4, 1), (2, 2), (1, 4)):
        trainer = made[batch_size] = make_trainer(train={"batch_size": batch_size, "grad_accum": accum})
        randomise_lora_b(trainer.model)  # policy != reference, and every LoRA weight gets a gradient
        trainer.recipe.online.engine = FixedEngine()
        rollouts = trainer.recipe.collect_rollouts(window(trainer))
        counts[batch_size] = [int(r.weights.sum()) for r in rollouts]
        losses[batch_size] = float(trainer.compute_gradients(rollouts))
        grads[batch_size] = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    # Prompt row-0 ties: micro-batches train different numbers of pairs, so a per-micro-batch mean would weigh
    # them differently.
    assert counts[4] == [3] and counts[2] == [1, 2] and counts[1] == [0, 1, 1, 1]
    for batch_size in (2, 1):
        assert losses[batch_size] == pytest.approx(losses[4], rel=1e-5)
        assert_same_grads(grads[batch_size], grads[4])
    # The test can fail: the mean of each micro-batch's own mean gives another gradient.
    trainer = made[2]
    trainer.model.zero_grad(set_to_none=True)
    for rollout in trainer.recipe.last_rollouts:
        terms = trainer.recipe.loss_terms(trainer.model, rollout)
        (terms.loss_sum / rollout.weights.sum() / len(counts[2])).backward()
    naive = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    assert relative_difference(naive, grads[4]) > 1e-2


# --------------------------------------------------------------------------------------------- exact resume
TOTAL_STEPS, KILL_STEP = 4, 2


def resume_values(tiny_model_dir, root: Path) -> dict:
    """6 shuffled prompts, one per micro-batch, two a step (3 steps an epoch), two updates per step (mini-batches
    drawn anew each pass), a checkpoint every step; the judge (the response's length, in a file of its own: the
    child processes cannot import this module) rarely ties."""
    rewards = root / "rewards.py"
    rewards.write_text("def length_reward(prompt, response, row):\n    return float(len(response))\n")
    return {"method": "online_dpo", "model": {"name_or_path": str(tiny_model_dir)},
            "data": {"train": str(write_jsonl(root / "prompts.jsonl", PROMPT_ROWS[:6])), "max_length": 128,
                     "shuffle": True},
            "lora": {"r": 4, "alpha": 8},
            "train": {"max_steps": TOTAL_STEPS, "batch_size": 1, "grad_accum": 2, "lr": 1e-2, "log_every": 1,
                      "seed": 5, "mixed_precision": "no"},
            "save": {"every": 1, "keep_last": 10},
            "eval": {"final": "last"},
            "online_dpo": {"max_new_tokens": 6, "reward_functions": [f"{rewards}:length_reward"], "ppo_epochs": 2,
                           "mini_batches": 2}}


def test_a_run_killed_after_a_checkpoint_resumes_exactly(tiny_model_dir, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(resume_values(tiny_model_dir, tmp_path)))
    reference = tmp_path / "reference"
    assert cli_main(["train", str(config), f"train.output_dir={reference}"]) == 0
    want = step_records(reference)
    assert [r["step"] for r in want] == list(range(1, TOTAL_STEPS + 1))
    assert len({r.get("score_better") for r in want}) > 1  # sampled pairs differ from step to step

    run_dir = tmp_path / "run"
    killed = run_child("kill-after-save", KILL_STEP, "train", config, f"train.output_dir={run_dir}")
    assert killed.returncode == -signal.SIGKILL, describe(killed)
    assert complete_steps(run_dir) == list(range(1, KILL_STEP + 1))
    state = json.loads((ckpt.checkpoint_dir(run_dir, KILL_STEP) / "state.json").read_text())
    assert state["method_state"][SAMPLING_STATE_KEY]

    assert cli_main(["train", str(config), f"train.output_dir={run_dir}", "--resume"]) == 0
    assert step_records(run_dir) == want  # losses, judge scores, ties, DPO statistics, grad norms: exactly
    assert_same_weights(trained_weights(run_dir), trained_weights(reference), tol=0.0)


# ---------------------------------------------------------------------------------------- CLI, API, bench
def test_cli_trains_logs_the_pair_statistics_and_validates_by_reward(tiny_model_dir, tmp_path, prompts_file):
    run_dir = tmp_path / "cli-run"
    values = dpo_values(tiny_model_dir, tmp_path, prompts_file, data={"val_fraction": 0.25},
                        train={"output_dir": str(run_dir), "max_steps": 2, "epochs": 2},
                        eval={"metric": "val_reward", "every": 2})
    path = tmp_path / "online_dpo.yaml"
    path.write_text(yaml.safe_dump(values))
    assert cli_main(["train", str(path)]) == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for record in steps:
        assert {"rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy", "score_better",
                "score_worse", "ties", "tie_fraction", "length_better", "length_worse", "response_length",
                "reward", "reward_std"} <= set(record)
    assert [r["step"] for r in records if "val_reward" in r][-1] == 2
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["method"] == "online_dpo" and summary["metric"] == "val_reward"
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_python_api_trains_from_rows_in_memory(tiny_model_dir, tmp_path):
    import tuneforge as tf

    run = tf.train("online_dpo", model=tiny_model_dir, data=PROMPT_ROWS, output_dir=tmp_path / "api-run",
                   show_progress=False, log=None, lora={"r": 4, "alpha": 8},
                   train={"max_steps": 2, "batch_size": 2, "log_every": 1, "mixed_precision": "no"},
                   online_dpo={"max_new_tokens": 6, "reward_functions": [spec("length_reward")]})
    assert run.summary["method"] == "online_dpo" and run.summary["steps"] == 2
    assert [r["step"] for r in run.metrics if "loss" in r] == [1, 2]
    assert run.generate([{"role": "user", "content": "What is 1 plus 1?"}], max_new_tokens=4) is not None


def test_bench_times_online_dpo_steps_that_train(tiny_model_dir, capsys):
    assert cli_main(["bench", "--method", "online_dpo", "--model", str(tiny_model_dir), "--batch-size", "2",
                     "--max-length", "64", "--steps", "1", "--lora-r", "4", "--max-new-tokens", "4"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["method"] == "online_dpo" and result["generations"] == 2
    assert result["responses_per_s"] > 0 and 0 < result["sample_share"] < 1
