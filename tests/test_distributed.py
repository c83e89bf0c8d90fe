"""Multi-process training on this machine: 2 CPU processes (gloo) under torchrun must give the same per-step
losses and final weights as 1 process with the same global batch, for DDP and FSDP2, LoRA and full."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

TOLERANCE = 1e-5


def _train(config_file: Path, out: Path, nproc: int, *overrides: str) -> None:
    if nproc == 1:
        command = [sys.executable, "-m", "tuneforge"]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   "-m", "tuneforge"]
    command += ["train", str(config_file), f"train.output_dir={out}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def _one_process_and_two_ranks(config: dict, tmp_path: Path, strategy: str) -> tuple[Path, Path]:
    """Train ``config`` in 1 process and in 2 ranks of half the batch (the same global batch); their run dirs."""
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    single, multi = tmp_path / "single", tmp_path / "multi"
    _train(config_file, single, 1)
    _train(config_file, multi, 2, "train.batch_size=2", f"distributed.strategy={strategy}")
    return single, multi


def _losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r] + [r["val_loss"] for r in records if "val_loss" in r]


def _weights(run: Path, lora: bool) -> dict[str, torch.Tensor]:
    folder = run / ("adapter" if lora else "model")
    return load_file(str(next(folder.glob("*.safetensors"))))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_two_ranks_match_one_process(tiny_model_dir, qa_file, tmp_path, strategy, lora):
    config = {
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"train": str(qa_file), "max_length": 128, "val_fraction": 0.2},
        "lora": {"enabled": lora, "r": 4, "alpha": 8, "dropout": 0.0},
        # An odd row count leaves the last global batch short, so one rank runs a placeholder micro-batch.
        "train": {"epochs": 2, "batch_size": 4, "grad_accum": 2, "lr": 1e-2, "log_every": 1, "seed": 0,
                  "mixed_precision": "no", "scheduler": "linear"},
        "eval": {"every": 3},
    }
    single, multi = _one_process_and_two_ranks(config, tmp_path, strategy)

    want, got = _losses(single), _losses(multi)
    assert len(got) == len(want) and len(want) > 6
    assert got == pytest.approx(want, rel=TOLERANCE, abs=TOLERANCE)
    reference, trained = _weights(single, lora), _weights(multi, lora)
    assert trained.keys() == reference.keys()
    moved = 0.0
    for name, value in reference.items():
        torch.testing.assert_close(trained[name], value, rtol=TOLERANCE, atol=TOLERANCE)
    # The weights must actually have moved, or equality would prove nothing.
    base = load_file(str(next(Path(tiny_model_dir).glob("*.safetensors"))))
    if not lora:
        moved = max((reference[k] - base[k]).abs().max().item() for k in reference if k in base)
        assert moved > 1e-3
    else:
        assert max(v.abs().max().item() for k, v in reference.items() if "lora_B" in k) > 1e-4
    summary = json.loads((multi / "summary.json").read_text())
    assert summary["steps"] == json.loads((single / "summary.json").read_text())["steps"]


@pytest.mark.parametrize("strategy, lora", [("fsdp", False), ("ddp", True)], ids=["fsdp-full", "ddp-lora"])
def test_two_rank_resume_continues_exactly(tiny_model_dir, qa_file, tmp_path, strategy, lora):
    """A 2-rank run resumed from its step-3 checkpoint ends with the weights of the run never interrupted:
    sharded weights and optimiser states are gathered into the checkpoint and scattered back."""
    config = {
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"train": str(qa_file), "max_length": 128},
        "lora": {"enabled": lora, "r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"max_steps": 6, "batch_size": 2, "lr": 1e-3, "log_every": 1, "seed": 0,
                  "mixed_precision": "no"},
        "save": {"every": 1, "keep_last": 10},
        "distributed": {"strategy": strategy},
        "eval": {"final": "last"},
    }
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    whole, branch = tmp_path / "whole", tmp_path / "branch"
    _train(config_file, whole, 2)
    _train(config_file, branch, 2, f"--resume={whole}/checkpoints/step-00000003")
    assert _losses(branch)[-3:] == pytest.approx(_losses(whole)[-3:], rel=1e-6, abs=1e-6)
    reference, resumed = _weights(whole, lora), _weights(branch, lora)
    for name, value in reference.items():
        torch.testing.assert_close(resumed[name], value, rtol=1e-6, atol=1e-6)


def test_resume_with_another_number_of_processes_is_refused(make_config, qa_file, monkeypatch):
    """The global batch is batch_size x grad_accum x world size: a checkpoint of 1 process must not silently
    continue on 2 (checked before any model or process group is touched)."""
    from tuneforge.engine.distributed import DistInfo
    from tuneforge.errors import UserError
    from tuneforge.engine import trainer
    from tuneforge.engine.trainer import run_training

    config = make_config(qa_file, train={"max_steps": 2}, save={"every": 1})
    run_training(config, log=lambda m: None)
    monkeypatch.setattr(trainer, "init_distributed", lambda cfg: DistInfo(rank=0, world_size=2))
    with pytest.raises(UserError, match="trained with 1 process.* this run has 2"):
        run_training(make_config(qa_file, train={"max_steps": 3}, save={"every": 1}), log=lambda m: None,
                     resume=True)


@pytest.mark.parametrize("method,strategy,lora,precompute", [
    ("dpo", "ddp", True, False), ("dpo", "fsdp", True, False), ("dpo", "fsdp", False, True), ("kto", "ddp", True, False)])
def test_preference_two_ranks_match_one_process(tiny_model_dir, tmp_path, method, strategy, lora, precompute):
    """DPO (adapter-disabled reference inside the wrapped forward; or, fully fine-tuned under FSDP, reference
    log-probs precomputed before sharding) and KTO (KL estimate all-reduced across ranks): 2 ranks x batch 2 ==
    1 process x batch 4, including a short last batch (a placeholder pair)."""
    from conftest import write_jsonl

    if method == "kto":
        rows = [{"prompt": f"Is item {i} red?", "completion": "Yes." if i % 3 else "Who knows, maybe.",
                 "label": bool(i % 3)} for i in range(13)]
    else:
        rows = [{"prompt": f"What colour is item {i}?", "chosen": f"Item {i} is red.",
                 "rejected": f"Well, item {i} might be some colour or other."} for i in range(13)]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    config = {
        "method": method,
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"train": str(data), "max_length": 64, "val_fraction": 0.2},
        "lora": {"enabled": lora, "r": 4, "alpha": 8, "dropout": 0.0},
        "dpo": {"precompute_ref": precompute},
        "train": {"epochs": 2, "batch_size": 4, "lr": 1e-2 if lora else 1e-3, "log_every": 1, "seed": 0,
                  "mixed_precision": "no"},
    }
    single, multi = _one_process_and_two_ranks(config, tmp_path, strategy)
    want, got = _losses(single), _losses(multi)
    assert len(got) == len(want) and len(want) >= 6
    assert got == pytest.approx(want, rel=TOLERANCE, abs=TOLERANCE)
    reference, trained = _weights(single, lora), _weights(multi, lora)
    for name, value in reference.items():
        torch.testing.assert_close(trained[name], value, rtol=TOLERANCE, atol=TOLERANCE)
