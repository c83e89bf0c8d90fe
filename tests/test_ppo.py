"""PPO (value head, GAE, several updates per rollout) and what online RL shares with GRPO: the first update's ratio
is 1 and KL 0, rewards sit on the last real token, the advantages are GAE's whitened, the update count, the full
fine-tuning reference, a reward model as the reward, the CLI, resume of the adaptive KL coefficient."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import write_jsonl
from test_grpo import PROMPT_ROWS, spec
from tuneforge.cli import main as cli_main
from tuneforge.config import config_from_dict
from tuneforge.engine.trainer import Trainer
from tuneforge.errors import ConfigError
from tuneforge.losses import gae_advantages, last_token_index
from tuneforge.recipes import registry
from tuneforge.recipes.ppo import VALUE_HEAD_FILE, PPORecipe


@pytest.fixture
def prompts_file(tmp_path):
    return write_jsonl(tmp_path / "prompts.jsonl", PROMPT_ROWS)


def ppo_config(tiny_model_dir, tmp_path, train_file, method="ppo", **sections):
    section = "ppo" if method == "ppo" else "grpo"
    values = {
        "method": method,
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"train": str(train_file), "max_length": 128, "shuffle": False},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1},  # dropout must be switched off by the recipe
        "train": {"output_dir": str(tmp_path / "run"), "epochs": 1, "batch_size": 2, "grad_accum": 2, "lr": 1e-2,
                  "log_every": 1, "seed": 0, "mixed_precision": "no", "warmup_ratio": 0.0, "scheduler": "constant"},
        section: {"max_new_tokens": 8, "reward_functions": [spec("length_reward")]},
    }
    for name, updates in sections.items():
        values.setdefault(name, {}).update(updates)
    return config_from_dict(values)


def ready(config) -> Trainer:
    trainer = Trainer(config, run_dir=False, log=lambda message: None, show_progress=False)
    trainer.setup()
    return trainer


def first_window(trainer: Trainer) -> list:
    return trainer.epoch_batches(shuffle=False)[:trainer.config.train.grad_accum]


def step_metrics(trainer: Trainer) -> dict:
    """The numbers the trainer would log for the step so far (its statistics' means, through the recipe)."""
    return trainer.recipe.step_metrics(trainer.stats.means(trainer.dist.enabled))


def test_ppo_routes_to_its_recipe_and_checks_its_section():
    assert registry.get("ppo").recipe_class() is PPORecipe
    with pytest.raises(ConfigError, match="ppo.reward_functions"):
        config_from_dict({"method": "ppo", "data": {"train": "p.jsonl"}})
    with pytest.raises(ConfigError, match="ppo.lam"):
        config_from_dict({"method": "ppo", "data": {"train": "p.jsonl"}, "ppo": {"reward_model": "rm", "lam": 2}})
    with pytest.raises(ConfigError, match="ppo.mini_batches"):
        config_from_dict({"method": "ppo", "data": {"train": "p.jsonl"}, "train": {"grad_accum": 3},
                          "ppo": {"reward_model": "rm", "mini_batches": 2}})


def test_first_update_has_ratio_one_zero_kl_and_the_ppo_loss(tiny_model_dir, tmp_path, prompts_file):
    config = ppo_config(tiny_model_dir, tmp_path, prompts_file, ppo={"mini_batches": 2, "vf_coef": 0.5})
    trainer = ready(config)
    rollouts = trainer.recipe.collect_rollouts(first_window(trainer))
    assert len(rollouts) == 2
    for rollout in rollouts:
        mask = rollout.samples.mask.bool()
        # LoRA's B starts at zero and dropout is off: the rollout policy is exactly the reference.
        assert torch.equal(rollout.old_logp, rollout.ref_logp)
        # So the per-token reward is the score alone, on the last real token (the stop token when it stopped).
        last = last_token_index(mask)
        rows = torch.arange(mask.shape[0])
        assert torch.allclose(rollout.rewards[rows, last], rollout.samples.rewards)
        rewards = rollout.rewards.clone()
        rewards[rows, last] = 0
        assert torch.count_nonzero(rewards) == 0
        # The value head starts at zero, so with gamma 1 GAE's return at t is the score times lam^(steps to go).
        assert torch.count_nonzero(rollout.old_values) == 0
        to_go = (mask.sum(dim=1, keepdim=True) - 1 - torch.arange(mask.shape[1])).clamp(min=0)
        expected = rollout.samples.rewards[:, None] * config.ppo.lam ** to_go * mask
        assert torch.allclose(rollout.returns, expected, rtol=1e-5)
        assert rollout.entropy[mask].min() > 0
    # The step's advantages are whitened together: mean 0 and unbiased std 1 over all response tokens.
    flat = torch.cat([r.advantages[r.samples.mask.bool()] for r in rollouts])
    assert float(flat.mean()) == pytest.approx(0.0, abs=1e-5) and float(flat.std()) == pytest.approx(1.0, abs=1e-3)

    first = [rollouts[0]]
    loss = float(trainer.compute_gradients(first))
    stats = trainer.stats.entries
    assert stats["approx_kl"][0] == 0.0 and stats["clip_fraction"][0] == 0.0  # ratio exactly 1
    mask = rollouts[0].samples.mask.bool()
    tokens = float(mask.sum())
    # At ratio 1 the policy loss is -mean(A); the values are still 0, so the value loss is 0.5 mean(R^2).
    expected = (-rollouts[0].advantages[mask].sum() + 0.5 * 0.5 * (rollouts[0].returns[mask] ** 2).sum()) / tokens
    assert loss == pytest.approx(float(expected), rel=1e-5)
    metrics = step_metrics(trainer)
    assert metrics["kl"] == 0.0 and metrics["kl_coef"] == config.ppo.kl_coef
    assert metrics["value_loss"] == pytest.approx(float(0.5 * (rollouts[0].returns[mask] ** 2).mean()), rel=1e-5)


def test_a_step_makes_epochs_times_mini_batches_updates_and_the_ratio_moves(tiny_model_dir, tmp_path,
                                                                             prompts_file):
    config = ppo_config(tiny_model_dir, tmp_path, prompts_file, ppo={"mini_batches": 2, "ppo_epochs": 3})
    trainer = ready(config)
    optimizer_steps, scheduler_steps = [], []
    step, schedule = trainer.optimizer.step, trainer.scheduler.step
    trainer.optimizer.step = lambda *a, **k: (optimizer_steps.append(1), step(*a, **k))[1]
    trainer.scheduler.step = lambda *a, **k: (scheduler_steps.append(1), schedule(*a, **k))[1]
    head_before = trainer.model.value_head.linear.weight.detach().clone()
    loss, grad_norm = trainer.train_step(first_window(trainer))
    assert len(optimizer_steps) == 6 and len(scheduler_steps) == 1
    assert torch.isfinite(loss) and float(grad_norm) > 0
    metrics = step_metrics(trainer)
    # Later updates see a moved policy: pi / pi_old is no longer 1 on average.
    assert metrics["approx_kl"] > 0
    assert not torch.equal(trainer.model.value_head.linear.weight, head_before)
    assert {"reward", "kl", "entropy", "clip_fraction", "value_loss", "policy_loss", "value_clip_fraction",
            "response_length", "stopped_fraction", "kl_coef"} <= set(metrics)


def test_gae_of_a_rollout_matches_a_direct_computation(tiny_model_dir, tmp_path, prompts_file):
    config = ppo_config(tiny_model_dir, tmp_path, prompts_file,
                        ppo={"gamma": 0.9, "lam": 0.8, "whiten_advantages": False, "kl_coef": 0.3})
    trainer = ready(config)
    with torch.no_grad():  # values and log-probs away from zero, so the check is not vacuous
        trainer.model.value_head.linear.bias.fill_(0.5)
        trainer.model.value_head.linear.weight.normal_(0, 0.1)
        for name, parameter in trainer.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    rollout = trainer.recipe.collect_rollouts(first_window(trainer)[:1])[0]
    mask = rollout.samples.mask
    assert torch.count_nonzero(rollout.old_logp - rollout.ref_logp) > 0
    for row in range(mask.shape[0]):
        length = int(mask[row].sum())
        values = rollout.old_values[row, :length].tolist()
        rewards = [-0.3 * float(rollout.old_logp[row, t] - rollout.ref_logp[row, t]) for t in range(length)]
        rewards[-1] += float(rollout.samples.rewards[row])
        assert rollout.rewards[row, :length].tolist() == pytest.approx(rewards, abs=1e-5)
        advantage, expected = 0.0, []
        for t in reversed(range(length)):
            next_value = values[t + 1] if t + 1 < length else 0.0
            advantage = rewards[t] + 0.9 * next_value - values[t] + 0.9 * 0.8 * advantage
            expected.insert(0, advantage)
        assert rollout.advantages[row, :length].tolist() == pytest.approx(expected, abs=1e-4)
        assert rollout.returns[row, :length].tolist() == pytest.approx(
            [a + v for a, v in zip(expected, values)], abs=1e-4)
    direct, _ = gae_advantages(rollout.rewards, rollout.old_values, mask, 0.9, 0.8)
    assert torch.allclose(direct, rollout.advantages)


def test_full_fine_tuning_keeps_a_frozen_reference(tiny_model_dir, tmp_path, prompts_file):
    config = ppo_config(tiny_model_dir, tmp_path, prompts_file, "grpo", lora={"enabled": False},
                        grpo={"beta": 0.1, "num_generations": 2})
    trainer = ready(config)
    online = trainer.recipe.online
    window = first_window(trainer)
    start = trainer.recipe.collect_rollouts(window[:1])[0]
    assert torch.equal(start.ref_logp, online.response_forward(trainer.model, start.samples).logp.detach())
    for _ in range(2):
        trainer.train_step(window)
    reference = online.reference_forward(start.samples)
    assert torch.equal(reference, start.ref_logp)  # the copy did not train
    policy = online.response_forward(trainer.model, start.samples).logp.detach()
    assert not torch.allclose(policy, reference)  # the policy did


def test_grpo_with_several_updates_stores_old_logprobs(tiny_model_dir, tmp_path, prompts_file):
    config = ppo_config(tiny_model_dir, tmp_path, prompts_file, "grpo",
                        grpo={"ppo_epochs": 2, "num_generations": 2, "beta": 0.0})
    trainer = ready(config)
    trainer.train_step(first_window(trainer))
    rollout = trainer.recipe.last_rollouts[0]
    assert rollout.old_logp is not None
    assert torch.equal(rollout.old_logp, rollout.old_logp * rollout.samples.mask)
    assert step_metrics(trainer)["clip_fraction"] >= 0.0


@pytest.fixture
def reward_run(tiny_model_dir, tmp_path):
    """A tiny reward model trained for one step (its scores need only be deterministic)."""
    from tuneforge.engine.trainer import run_training

    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"Q{i}?", "chosen": "Yes.", "rejected": "No, never."}
                                                   for i in range(4)])
    config = config_from_dict({
        "method": "reward", "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"train": str(pairs), "max_length": 64}, "lora": {"r": 4, "alpha": 8},
        "train": {"output_dir": str(tmp_path / "rm"), "epochs": 1, "batch_size": 4, "seed": 0,
                  "mixed_precision": "no"}})
    return run_training(config, log=lambda message: None)["run_dir"]


def test_a_reward_model_scores_the_prompt_and_response(tiny_model_dir, tmp_path, prompts_file, reward_run):
    from tuneforge.data.formats import Conversation, Message
    from tuneforge.rewards.scoring import RewardScorer

    config = ppo_config(tiny_model_dir, tmp_path, prompts_file,
                        ppo={"reward_functions": [], "reward_model": reward_run, "reward_model_weight": 2.0})
    trainer = ready(config)
    batch = first_window(trainer)[0]
    rollout = trainer.recipe.collect_rollouts([batch])[0]
    scorer = RewardScorer.load(reward_run)
    conversations = [Conversation([Message("user", row.fields["prompt"]), Message("assistant", text)])
                     for row, text in zip(batch.examples, rollout.samples.responses)]
    expected = torch.tensor(scorer.score(conversations))
    assert torch.allclose(rollout.samples.scores[:, 0], expected, atol=1e-5)
    assert torch.allclose(rollout.samples.rewards, 2.0 * expected, atol=1e-5)
    assert "reward_reward_model" in step_metrics(trainer)


def test_cli_trains_ppo_and_resumes_the_adaptive_kl_coefficient(tiny_model_dir, tmp_path, prompts_file):
    run_dir = tmp_path / "run"
    values = {"method": "ppo", "model": {"name_or_path": str(tiny_model_dir)},
              "data": {"train": str(prompts_file), "validation": str(prompts_file), "max_length": 128},
              "lora": {"r": 4, "alpha": 8},
              "train": {"output_dir": str(run_dir), "max_steps": 3, "batch_size": 2, "lr": 1e-3, "seed": 0,
                        "mixed_precision": "no"},
              "eval": {"metric": "val_reward", "every": 3},
              "save": {"every": 1, "keep_last": 5},
              "ppo": {"max_new_tokens": 6, "reward_functions": [spec("length_reward")], "adaptive_kl": True,
                      "target_kl": 0.01, "kl_horizon": 10, "ppo_epochs": 2}}
    path = tmp_path / "ppo.yaml"
    path.write_text(yaml.safe_dump(values))
    assert cli_main(["train", str(path)]) == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all({"reward", "kl", "entropy", "value_loss", "approx_kl", "kl_coef"} <= set(r) for r in steps)
    # The controller moved beta from its start: up when the KL is above target, down when below.
    assert steps[0]["kl_coef"] == 0.05 and steps[1]["kl_coef"] != 0.05
    assert any("val_reward" in r for r in records)
    head = load_file(str(run_dir / VALUE_HEAD_FILE))
    assert set(head) == {"linear.weight", "linear.bias"}
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    # Resume from step 2: the saved coefficient is the one the run goes on with.
    state = json.loads((run_dir / "checkpoints" / "step-00000002" / "state.json").read_text())
    saved = state["method_state"]["kl_coef"]
    trainer = Trainer(config_from_dict(values), log=lambda message: None, show_progress=False,
                      resume=str(run_dir / "checkpoints" / "step-00000002"))
    trainer.setup()
    assert trainer.recipe.kl_coef == saved == pytest.approx(steps[2]["kl_coef"])
    weights = load_file(str(run_dir / "checkpoints" / "step-00000002" / "weights.safetensors"))
    assert torch.equal(trainer.model.value_head.linear.weight.detach(), weights["value_head.linear.weight"])


@pytest.mark.parametrize("method", ["ppo", "grpo"])
def test_two_ddp_ranks_train_and_reduce_their_statistics(tiny_model_dir, tmp_path, prompts_file, method):
    """2 gloo processes under torchrun: rollouts per rank, counts and statistics summed over ranks. At step 1
    the policy is the reference (KL exactly 0), so the adaptive controller lowers beta by the clipped error 0.2
    times the step's responses *on all ranks* (2 prompts x 2 micro-batches x 2 ranks) over the horizon:
    0.05 (1 - 0.2 x 8 / 10) = 0.042."""
    from test_distributed import _train

    section = "ppo" if method == "ppo" else "grpo"
    rewards = tmp_path / "rewards.py"  # a file of its own: the subprocesses cannot import the test modules
    rewards.write_text("def length_reward(prompt, response, row):\n    return float(len(response)) + 1.0\n")
    values = {"method": method, "model": {"name_or_path": str(tiny_model_dir)},
              "data": {"train": str(prompts_file), "max_length": 128},
              "lora": {"r": 4, "alpha": 8},
              "train": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "batch_size": 2, "grad_accum": 2,
                        "lr": 1e-3, "seed": 0, "mixed_precision": "no"},
              section: {"max_new_tokens": 6, "reward_functions": [f"{rewards}:length_reward"], "mini_batches": 2,
                        "ppo_epochs": 2}}
    if method == "ppo":
        values["ppo"].update({"adaptive_kl": True, "kl_horizon": 10, "target_kl": 1.0})
    else:
        values["grpo"]["num_generations"] = 2
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(values))
    _train(path, tmp_path / "run", 2)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(r["reward"] > 0 for r in steps)
    if method == "ppo":
        assert steps[0]["kl"] == 0.0
        assert steps[1]["kl_coef"] == pytest.approx(0.05 * (1 - 0.2 * 2 * 2 * 2 / 10))
        assert (tmp_path / "run" / VALUE_HEAD_FILE).is_file()


def test_a_missing_reward_model_fails_before_any_model_loads(tiny_model_dir, tmp_path, prompts_file, monkeypatch):
    from tuneforge.engine import build
    from tuneforge.models import loading

    config = ppo_config(tiny_model_dir, tmp_path, prompts_file,
                        ppo={"reward_functions": [], "reward_model": str(tmp_path / "no-such-rm")})

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the reward model was checked")

    monkeypatch.setattr(build, "load_model", no_loading)
    monkeypatch.setattr(loading, "load_model", no_loading)
    with pytest.raises(loading.ModelSourceError, match="no-such-rm"):
        ready(config)


def test_log_probs_are_those_of_the_sampling_policy_at_its_temperature(tiny_model_dir, tmp_path, prompts_file):
    config = ppo_config(tiny_model_dir, tmp_path, prompts_file, ppo={"temperature": 0.5})
    trainer = ready(config)
    batch = first_window(trainer)[0]
    rollout = trainer.recipe.collect_rollouts([batch])[0]
    samples = rollout.samples
    with torch.no_grad():
        for row in range(samples.mask.shape[0]):
            prompt = batch.examples[row].input_ids
            length = int(samples.mask[row].sum())
            response = samples.input_ids[row, samples.prompt_width:samples.prompt_width + length].tolist()
            logits = trainer.model(input_ids=torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1]
            expected = torch.log_softmax(logits.float() / 0.5, dim=-1).gather(
                1, torch.tensor(response)[:, None]).squeeze(1)
            assert torch.allclose(rollout.old_logp[row, :length], expected, atol=1e-4)


def test_a_step_with_a_single_response_token_is_centred_not_whitened(tiny_model_dir, tmp_path, prompts_file):
    config = ppo_config(tiny_model_dir, tmp_path, prompts_file, train={"batch_size": 1, "grad_accum": 1},
                        ppo={"max_new_tokens": 1})
    trainer = ready(config)
    loss, _ = trainer.train_step(first_window(trainer))
    rollout = trainer.recipe.last_rollouts[0]
    assert int(rollout.samples.mask.sum()) == 1 and torch.isfinite(loss)
    assert float(rollout.advantages.abs().max()) == 0.0  # one token: its advantage minus the mean


@pytest.mark.parametrize("method", ["grpo", "ppo"])
def test_bench_times_online_rl_steps_and_counts_what_it_sampled(tiny_model_dir, method):
    from tuneforge.bench import run_bench

    result = run_bench(method=method, model=str(tiny_model_dir), batch_size=2, max_length=64, steps=2, lora_r=4,
                       generations=3, max_new_tokens=5)
    generations = 3 if method == "grpo" else 1
    assert result["generations"] == generations
    # 2 timed steps of 2 prompts, each with its G responses, at most 5 generated tokens each.
    assert result["responses_per_s"] == pytest.approx(result["prompts_per_s"] * generations, rel=1e-3)
    # The bench rounds rates to 0.01 (tokens) and 0.001 (responses): equality (every response 5 tokens long) may
    # come out up to 0.01 apart.
    assert 0 < result["generated_tokens_per_s"] <= 5 * result["responses_per_s"] + 0.01
    assert result["tokens_per_s"] > result["generated_tokens_per_s"]  # prompts count too
    assert 0 < result["sample_share"] < 1 and result["step_time_s"] > 0
