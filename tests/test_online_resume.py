"""Online RL resumes exactly: a GRPO and a PPO run killed (SIGKILL) right after a checkpoint and resumed log the
uninterrupted run's per-step rewards and losses and end with its weights, in one process and in two DDP ranks.
Sampling draws from a generator the run owns and checkpoints, never from torch's global one."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import write_jsonl
from test_engine_resume import adapter, assert_same_weights, complete_steps, describe, quiet, run_child
from test_grpo import PROMPT_ROWS
from tuneforge.cli import main as cli_main
from tuneforge.config import config_from_dict
from tuneforge.engine import checkpoint as ckpt
from tuneforge.engine.metrics import read_metrics
from tuneforge.engine.trainer import Trainer
from tuneforge.recipes._online import SAMPLING_STATE_KEY
from tuneforge.recipes.ppo import VALUE_HEAD_FILE

# 6 prompts, one per micro-batch, two micro-batches a step: 3 steps an epoch. The run dies after the checkpoint
# of step 2 (mid-epoch) and the resumed run crosses into the second epoch.
PROMPTS = PROMPT_ROWS[:6]
TOTAL_STEPS, KILL_STEP = 4, 2
TIMING = ("elapsed_s", "tokens_per_s")  # the only numbers of a step record that may differ


def method_config(tiny_model_dir: Path, root: Path, method: str) -> dict:
    """A small run of ``method`` with shuffled prompts, several updates per rollout (mini-batches drawn anew each
    pass) and a checkpoint every step; the reward (the response's length) differs between samples."""
    rewards = root / "rewards.py"  # a file of its own: the child processes cannot import the test modules
    rewards.write_text("def length_reward(prompt, response, row):\n    return float(len(response))\n")
    section = {"max_new_tokens": 6, "reward_functions": [f"{rewards}:length_reward"], "ppo_epochs": 2,
               "mini_batches": 2}
    if method == "ppo":
        section.update({"adaptive_kl": True, "kl_horizon": 10, "target_kl": 0.01})
    else:
        section.update({"num_generations": 2, "beta": 0.04})
    return {"method": method, "model": {"name_or_path": str(tiny_model_dir)},
            "data": {"train": str(write_jsonl(root / "prompts.jsonl", PROMPTS)), "max_length": 128,
                     "shuffle": True},
            "lora": {"r": 4, "alpha": 8},
            "train": {"max_steps": TOTAL_STEPS, "batch_size": 1, "grad_accum": 2, "lr": 1e-2, "log_every": 1,
                      "seed": 5, "mixed_precision": "no"},
            "save": {"every": 1, "keep_last": 10},
            "eval": {"final": "last"},
            ("ppo" if method == "ppo" else "grpo"): section}


def step_records(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(run_dir / "metrics.jsonl")
            if "loss" in r]


def trained_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    weights = adapter(run_dir)
    if (run_dir / VALUE_HEAD_FILE).is_file():
        weights.update({f"value_head.{k}": v for k, v in load_file(str(run_dir / VALUE_HEAD_FILE)).items()})
    return weights


@pytest.fixture(scope="module", params=["grpo", "ppo"])
def reference_run(request, tiny_model_dir, tmp_path_factory):
    """(config file, uninterrupted run directory) of each method, trained in-process through the CLI."""
    root = tmp_path_factory.mktemp(request.param)
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(method_config(tiny_model_dir, root, request.param)))
    reference = root / "reference"
    assert cli_main(["train", str(config), f"train.output_dir={reference}"]) == 0
    return config, reference


def test_a_run_killed_after_a_checkpoint_resumes_exactly(reference_run, tmp_path):
    config, reference = reference_run
    want = step_records(reference)
    assert [r["step"] for r in want] == list(range(1, TOTAL_STEPS + 1))
    # The sampled rewards vary from step to step, so equal records below mean the same responses were drawn.
    assert len({r["reward"] for r in want}) > 1

    run_dir = tmp_path / "run"
    killed = run_child("kill-after-save", KILL_STEP, "train", config, f"train.output_dir={run_dir}")
    assert killed.returncode == -signal.SIGKILL, describe(killed)
    assert complete_steps(run_dir) == list(range(1, KILL_STEP + 1))
    state = json.loads((ckpt.checkpoint_dir(run_dir, KILL_STEP) / "state.json").read_text())
    assert state["method_state"][SAMPLING_STATE_KEY]  # the sampling generator travels with the checkpoint

    assert cli_main(["train", str(config), f"train.output_dir={run_dir}", "--resume"]) == 0
    assert step_records(run_dir) == want  # every step once: rewards, losses, KL, lengths, grad norms, exactly
    assert_same_weights(trained_weights(run_dir), trained_weights(reference), tol=0.0)


# ---------------------------------------------------------------------------------------- the sampling generator
def ready(tiny_model_dir: Path, tmp_path: Path, method: str) -> Trainer:
    values = method_config(tiny_model_dir, tmp_path, method)
    trainer = Trainer(config_from_dict(values), run_dir=False, log=quiet, show_progress=False)
    trainer.setup()
    return trainer


def test_sampling_depends_on_the_runs_generator_and_leaves_the_global_one_alone(tiny_model_dir, tmp_path):
    trainer = ready(tiny_model_dir, tmp_path, "grpo")
    online = trainer.recipe.online
    examples = [e for batch in trainer.epoch_batches(shuffle=False)[:4] for e in batch.examples]
    start = online.sampling_generator.get_state()

    torch.manual_seed(1)
    before = torch.get_rng_state()
    first = online.sample(examples, 4).input_ids
    assert torch.equal(torch.get_rng_state(), before)  # dropout masks and user code see the run's global stream

    online.sampling_generator.set_state(start)
    torch.manual_seed(2)  # another global state: the same draws
    assert torch.equal(online.sample(examples, 4).input_ids, first)
    # The generator moved on: the next call draws other responses.
    assert not torch.equal(online.sample(examples, 4).input_ids, first)
    assert trainer.state.method_state[SAMPLING_STATE_KEY] == online.sampling_generator.get_state().tolist()


def test_each_rank_samples_its_own_stream(tiny_model_dir, tmp_path):
    """The generator is the same on every rank (one saved state resumes them all); each call draws one seed per
    rank and rank r samples with the r-th, so ranks do not sample correlated responses."""
    trainer = ready(tiny_model_dir, tmp_path, "grpo")
    online = trainer.recipe.online
    start = online.sampling_generator.get_state()
    seeds = []
    for rank in range(2):
        online.sampling_generator.set_state(start)
        trainer.dist.rank, trainer.dist.world_size = rank, 2
        seeds.append(online.sampling_seed())
    assert seeds[0] != seeds[1]
    trainer.dist.rank, trainer.dist.world_size = 0, 1
    online.sampling_generator.set_state(start)
    assert online.sampling_seed() != online.sampling_seed()


def test_two_ddp_ranks_resume_exactly(tiny_model_dir, tmp_path):
    """2 gloo processes under torchrun: a GRPO run resumed from its step-2 checkpoint logs the uninterrupted run's
    later steps and ends with its weights (each rank's sampling stream is restored, not re-seeded). 3 global
    micro-batches an epoch: a step of two, then a step of one."""
    from test_distributed import _train

    values = method_config(tiny_model_dir, tmp_path, "grpo")
    values["train"]["max_steps"] = 3
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(values))
    whole, branch = tmp_path / "whole", tmp_path / "branch"
    _train(config, whole, 2)
    _train(config, branch, 2, f"--resume={ckpt.checkpoint_dir(whole, 2)}")
    assert step_records(branch) == step_records(whole)[2:]
    assert_same_weights(trained_weights(branch), trained_weights(whole), tol=0.0)
