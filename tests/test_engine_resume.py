"""Checkpoints and resume: exact continuation after SIGKILL and SIGTERM (in child processes), partial
checkpoints, config changes on resume, crash-safe saving (full disk), pruning, and the NaN guard's effect on
checkpoints."""

from __future__ import annotations

import errno
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tuneforge.cli import main as cli_main
from tuneforge.config import config_from_dict
from tuneforge.engine import checkpoint as ckpt
from tuneforge.engine.metrics import read_metrics
from tuneforge.errors import UserError
from tuneforge.models.loading import RUN_MARKER
from tuneforge.engine.trainer import NonFiniteLossError, Trainer, run_training

from conftest import QA_ROWS, poison_loss, write_jsonl

# Weights and losses of a resumed run must match the uninterrupted run to this (fp32 on CPU is deterministic
# for a fixed thread count, so in practice they are bit-identical).
EXACT = 1e-6
STEPS_PER_EPOCH, EPOCHS = 3, 3  # 12 training rows, batch 4
TOTAL_STEPS = STEPS_PER_EPOCH * EPOCHS

# A child process: patch one function so the run dies (SIGKILL) or is asked to stop (SIGTERM) at a chosen
# step, then run the CLI. argv: MODE STEP CLI-ARGS...
CHILD = r"""
import os, signal, sys
from tuneforge.engine import checkpoint
from tuneforge.engine.trainer import Trainer
from tuneforge.cli import main

mode, step, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
if mode == "kill-after-save":  # the checkpoint of `step` is complete, then the process dies
    save = checkpoint.save_checkpoint
    def save_then_die(run_dir, state, *args, **kwargs):
        path = save(run_dir, state, *args, **kwargs)
        if state.step == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return path
    checkpoint.save_checkpoint = save_then_die
elif mode == "kill-while-saving":  # dies with the weights of `step` written but the checkpoint unfinished
    save_file = checkpoint.save_file
    def write_then_die(tensors, filename, *args, **kwargs):
        save_file(tensors, filename, *args, **kwargs)
        if os.path.basename(os.path.dirname(filename)) == f".staging-step-{step:08d}":
            os.kill(os.getpid(), signal.SIGKILL)
    checkpoint.save_file = write_then_die
elif mode == "term-after-step":  # SIGTERM arrives during optimiser step `step`
    train_step = Trainer.train_step
    def step_then_term(self, window):
        result = train_step(self, window)
        if self.state.step + 1 == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return result
    Trainer.train_step = step_then_term
sys.exit(main(argv))
"""


def quiet(_message):
    pass


def run_child(mode: str, step: int, *cli_args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHILD, mode, str(step), *map(str, cli_args)],
                          capture_output=True, text=True, timeout=120)


def describe(process: subprocess.CompletedProcess) -> str:
    return f"rc={process.returncode}\nstderr:\n{process.stderr[-3000:]}"


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def val_records(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["val_loss"]) for r in read_metrics(run_dir / "metrics.jsonl") if "val_loss" in r]


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def checkpoint_weights(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's trainable weights under the names PEFT gives them in adapter_model.safetensors."""
    weights = load_file(str(path / "weights.safetensors"))
    return {name.replace(".default.", "."): value for name, value in weights.items()}


def assert_same_weights(got: dict, want: dict, tol: float = EXACT) -> None:
    assert got.keys() == want.keys() and got
    for name in want:
        difference = (got[name] - want[name]).abs().max().item()
        assert difference <= tol, f"{name} differs by {difference}"


def assert_same_records(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> None:
    assert [step for step, _ in got] == [step for step, _ in want]
    for (step, a), (_, b) in zip(got, want):
        assert abs(a - b) <= EXACT, f"step {step}: {a} != {b}"


def complete_steps(run_dir: Path) -> list[int]:
    complete, _ = ckpt.list_checkpoints(run_dir)
    return [int(path.name.removeprefix(ckpt.PREFIX)) for path in complete]


# ------------------------------------------------------------------------------ exact resume in new processes
@pytest.fixture(scope="module")
def resume_setup(tiny_model_dir, tmp_path_factory):
    """Configs (no validation / validation every epoch) and an uninterrupted reference run of each, in-process
    through the same CLI entry point the children use."""
    root = tmp_path_factory.mktemp("resume")
    rows = write_jsonl(root / "rows.jsonl", QA_ROWS[:12])
    rows_val = write_jsonl(root / "rows-val.jsonl", QA_ROWS[:16])  # 12 train + 4 held out
    base = {
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"train": str(rows), "max_length": 128, "shuffle": True},
        # Dropout 0.1: the dropout masks come from the global torch RNG, which resume must restore.
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
        "train": {"epochs": EPOCHS, "batch_size": 4, "lr": 1e-2, "warmup_steps": 1, "scheduler": "cosine",
                  "log_every": 1, "seed": 3, "mixed_precision": "no"},
    }
    configs = {}
    for name, data, evaluation, save in (
            ("plain", {}, {"final": "last"}, {"every": 1}),
            ("validation", {"train": str(rows_val), "val_fraction": 0.25}, {"final": "best"},
             {"every": 3, "keep_last": 1})):
        values = yaml.safe_load(yaml.safe_dump(base))
        values["data"].update(data)
        values["eval"] = evaluation
        values["save"] = save
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(values))
        reference = root / f"reference-{name}"
        assert cli_main(["train", str(path), f"train.output_dir={reference}"]) == 0
        configs[name] = (path, reference)
    return root, configs


def assert_resumed_run_matches(run_dir: Path, reference: Path) -> None:
    # Every step exactly once, with the uninterrupted run's loss; then the same final weights.
    assert_same_records(train_losses(run_dir), train_losses(reference))
    assert [step for step, _ in train_losses(run_dir)] == list(range(1, TOTAL_STEPS + 1))
    assert_same_records(val_records(run_dir), val_records(reference))
    assert_same_weights(adapter(run_dir), adapter(reference))
    got, want = (json.loads((d / "summary.json").read_text()) for d in (run_dir, reference))
    for key in ("steps", "epochs", "tokens", "stop_reason", "best_step", "final_step"):
        assert got[key] == want[key], key
    if want["best_metric"] is not None:
        assert got["best_metric"] == pytest.approx(want["best_metric"], abs=EXACT)
    assert (run_dir / RUN_MARKER).is_file()
    _, partial = ckpt.list_checkpoints(run_dir)
    assert partial == []


@pytest.mark.parametrize("config_name, mode, kill_step, resume_step", [
    ("plain", "kill-after-save", 4, 4),                     # inside epoch 2
    ("plain", "kill-after-save", 6, 6),                     # the last step of epoch 2
    # Dies while writing checkpoint 6 (save.every=3): the unfinished one is ignored, the run goes back to
    # step 3 (an epoch boundary whose validation was logged after its checkpoint) and drops records 4..6.
    ("validation", "kill-while-saving", 6, 3),
], ids=["mid-epoch", "epoch-boundary", "while-saving-with-validation"])
def test_resume_after_sigkill_continues_exactly(resume_setup, tmp_path, config_name, mode, kill_step, resume_step):
    _, configs = resume_setup
    config, reference = configs[config_name]
    run_dir = tmp_path / "run"
    killed = run_child(mode, kill_step, "train", config, f"train.output_dir={run_dir}")
    assert killed.returncode == -signal.SIGKILL, describe(killed)
    assert complete_steps(run_dir)[-1] == resume_step
    assert not (run_dir / RUN_MARKER).exists()
    if mode == "kill-while-saving":
        _, partial = ckpt.list_checkpoints(run_dir)
        assert [p.name for p in partial] == [f".staging-step-{kill_step:08d}"]
        # The killed run had logged steps past its last complete checkpoint: those must not survive.
        assert train_losses(run_dir)[-1][0] == kill_step

    resumed = subprocess.run([sys.executable, "-m", "tuneforge", "train", str(config), f"train.output_dir={run_dir}",
                              "--resume"], capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, describe(resumed)
    assert f"resumed from {ckpt.checkpoint_dir(run_dir, resume_step)} at step {resume_step}" in resumed.stderr
    if mode == "kill-while-saving":
        assert "ignoring incomplete checkpoint" in resumed.stderr
    assert_resumed_run_matches(run_dir, reference)


@pytest.mark.parametrize("stop_step", [2, 3], ids=["mid-epoch", "last-step-of-epoch"])
def test_sigterm_saves_a_checkpoint_and_resume_completes_the_run(resume_setup, tmp_path, stop_step):
    _, configs = resume_setup
    config, reference = configs["plain"]
    run_dir = tmp_path / "run"
    # save.every=0: the only checkpoint is the one the signal makes.
    stopped = run_child("term-after-step", stop_step, "train", config, f"train.output_dir={run_dir}", "save.every=0")
    assert stopped.returncode == 143, describe(stopped)
    assert f"stopped by SIGTERM at step {stop_step}; checkpoint saved" in stopped.stderr
    assert complete_steps(run_dir) == [stop_step]
    assert ckpt.list_checkpoints(run_dir)[1] == []
    assert not (run_dir / RUN_MARKER).exists() and not (run_dir / "adapter").exists()
    assert train_losses(run_dir)[-1][0] == stop_step

    assert cli_main(["train", str(config), f"train.output_dir={run_dir}", "save.every=0", "--resume"]) == 0
    assert_resumed_run_matches(run_dir, reference)


# --------------------------------------------------------------------------------------- partial checkpoints
@pytest.fixture
def qa_run(make_config, qa_file, tmp_path):
    """A finished 3-step run with checkpoints 1, 2, 3 (6 steps per epoch, so resuming trains again)."""
    def make(**sections):
        sections = {"train": {"max_steps": 3}, "save": {"every": 1, "keep_last": 5}, **sections}
        return make_config(qa_file, **sections)

    run_training(make(), log=quiet)
    return make, tmp_path / "run"


def _unmark(path: Path) -> None:
    (path / ckpt.COMPLETE).unlink()


def test_an_incomplete_newest_checkpoint_is_reported_and_skipped(qa_run):
    make, run_dir = qa_run
    reference = adapter(run_dir)
    _unmark(ckpt.checkpoint_dir(run_dir, 3))
    messages = []
    summary = run_training(make(), log=messages.append, resume=True)
    assert f"ignoring incomplete checkpoint {ckpt.checkpoint_dir(run_dir, 3)} (missing COMPLETE)" in messages
    assert any(m.startswith(f"resumed from {ckpt.checkpoint_dir(run_dir, 2)} at step 2") for m in messages)
    assert summary["steps"] == 3
    assert complete_steps(run_dir) == [1, 2, 3]  # the partial folder was replaced by a complete one
    assert_same_weights(adapter(run_dir), reference)
    assert [s for s, _ in train_losses(run_dir)] == [1, 2, 3]


def test_only_incomplete_checkpoints_is_an_error(qa_run):
    make, run_dir = qa_run
    for step in (1, 2, 3):
        _unmark(ckpt.checkpoint_dir(run_dir, step))
    (run_dir / "checkpoints" / ".staging-step-00000004").mkdir()
    messages = []
    with pytest.raises(UserError, match=r"no complete checkpoint .*\(3 incomplete one\(s\) ignored\)"):
        run_training(make(), log=messages.append, resume=True)
    # The empty staging folder is a leftover of a save that never finished: reported, and cleaned up.
    assert any(m.startswith("ignoring incomplete checkpoint") and ".staging-step-00000004" in m for m in messages)
    assert not (run_dir / "checkpoints" / ".staging-step-00000004").exists()


def test_no_checkpoint_is_an_error_never_a_fresh_start(make_config, qa_file, tmp_path):
    config = make_config(qa_file, train={"max_steps": 1})
    run_dir = tmp_path / "run"
    with pytest.raises(UserError, match="no complete checkpoint .*nothing to resume"):
        run_training(config, log=quiet, resume=True)
    assert not run_dir.exists()  # nothing was trained or written
    (run_dir / "checkpoints").mkdir(parents=True)
    with pytest.raises(UserError, match="no complete checkpoint"):
        run_training(config, log=quiet, resume=True)
    assert list(run_dir.rglob("*")) == [run_dir / "checkpoints"]


def test_explicit_checkpoint_must_exist_and_be_complete(qa_run, capsys):
    make, run_dir = qa_run
    _unmark(ckpt.checkpoint_dir(run_dir, 2))
    with pytest.raises(UserError, match="is incomplete"):
        run_training(make(), log=quiet, resume=str(ckpt.checkpoint_dir(run_dir, 2)))
    with pytest.raises(UserError, match="does not exist"):
        run_training(make(), log=quiet, resume=str(run_dir / "checkpoints" / "step-00000009"))
    with pytest.raises(UserError, match="is not a checkpoint"):
        run_training(make(), log=quiet, resume=str(run_dir))  # the run directory, not one of its checkpoints
    # Through the CLI: one line and exit code 2, no traceback.
    config_file = run_dir / "config.yaml"
    assert cli_main(["train", str(config_file), "--resume", str(ckpt.checkpoint_dir(run_dir, 2))]) == 2
    assert "is incomplete" in capsys.readouterr().err


def test_explicit_checkpoint_resumes_from_that_step(qa_run):
    make, run_dir = qa_run
    messages = []
    summary = run_training(make(), log=messages.append, resume=str(ckpt.checkpoint_dir(run_dir, 1)))
    assert any(m.startswith(f"resumed from {ckpt.checkpoint_dir(run_dir, 1)} at step 1") for m in messages)
    assert summary["steps"] == 3
    assert [s for s, _ in train_losses(run_dir)] == [1, 2, 3]


def test_an_explicit_checkpoint_resumed_into_a_new_output_dir(qa_run, make_config, qa_file, tmp_path):
    _, run_dir = qa_run
    branch = tmp_path / "branch"
    config = make_config(qa_file, train={"max_steps": 4, "output_dir": str(branch)}, save={"every": 1})
    try:
        summary = run_training(config, log=quiet, resume=str(ckpt.checkpoint_dir(run_dir, 2)))
    except UserError:
        return  # refusing clearly is acceptable too
    assert summary["steps"] == 4 and (branch / RUN_MARKER).is_file()
    assert [s for s, _ in train_losses(branch)] == [3, 4]


def test_resuming_an_older_checkpoint_with_another_lr_replaces_the_later_checkpoints(qa_run):
    make, run_dir = qa_run
    old = checkpoint_weights(ckpt.checkpoint_dir(run_dir, 3))
    # train.lr does not change what is trained, so no --force is needed.
    run_training(make(train={"max_steps": 3, "lr": 5e-2}), log=quiet, resume=str(ckpt.checkpoint_dir(run_dir, 1)))
    new = checkpoint_weights(ckpt.checkpoint_dir(run_dir, 3))
    assert_same_weights(new, adapter(run_dir))
    assert any((new[n] - old[n]).abs().max() > 1e-4 for n in new)


def test_a_changed_learning_rate_applies_after_resume(make_config, qa_file, tmp_path):
    def make(lr, weight_decay):
        return make_config(qa_file, train={"max_steps": 4, "lr": lr, "weight_decay": weight_decay,
                                           "scheduler": "linear", "warmup_steps": 0}, save={"every": 1, "keep_last": 4})

    run_training(make(1e-3, 0.0), log=quiet)
    # Back to step 2 of 4: the linear schedule is at factor 1/2 for step 3.
    for step in (3, 4):
        _unmark(ckpt.checkpoint_dir(tmp_path / "run", step))
    recipe = Trainer(make(4e-3, 0.1), log=quiet, show_progress=False, resume=True)
    recipe.setup()
    assert recipe.state.step == 2
    assert recipe.scheduler.get_last_lr() == pytest.approx([2e-3])  # LoRA: one group (no 1-D parameters)
    assert [g["lr"] for g in recipe.optimizer.param_groups] == pytest.approx([2e-3])
    assert recipe.optimizer.param_groups[0]["weight_decay"] == 0.1
    recipe.train()
    assert [r["lr"] for r in recipe.history if "loss" in r] == pytest.approx([2e-3, 1e-3])
    # The moments came from the checkpoint: Adam's step count continues.
    assert all(s["step"] == 4 for s in recipe.optimizer.state.values())


def test_resuming_a_finished_run_trains_no_further(qa_run):
    make, run_dir = qa_run
    summary = run_training(make(), log=quiet, resume=True)
    assert summary["steps"] == 3


def test_checkpoints_record_the_elapsed_time(qa_run):
    _, run_dir = qa_run
    state = json.loads((ckpt.checkpoint_dir(run_dir, 1) / "state.json").read_text())
    assert state["elapsed_s"] > 0


# ------------------------------------------------------------------------------------ config changes on resume
@pytest.mark.parametrize("changes, keys", [
    ({"data": {"max_length": 96}}, ["data.max_length"]),
    ({"train": {"max_steps": 3, "batch_size": 2}}, ["train.batch_size"]),
    ({"lora": {"r": 8, "alpha": 8}}, ["lora.r"]),
    ({"data": {"max_length": 96}, "train": {"max_steps": 3, "batch_size": 2}}, ["data.max_length",
                                                                               "train.batch_size"]),
])
def test_resume_refuses_a_config_that_changes_what_is_trained(qa_run, changes, keys):
    make, run_dir = qa_run
    with pytest.raises(UserError) as error:
        run_training(make(**changes), log=quiet, resume=True)
    message = str(error.value)
    assert "--force" in message
    for key in keys:
        assert key in message
    assert message.count("->") == len(keys)


def test_force_resumes_with_another_batch_size(qa_run):
    make, run_dir = qa_run
    summary = run_training(make(train={"max_steps": 5, "batch_size": 2}), log=quiet, resume=True, force=True)
    assert summary["steps"] == 5
    assert [s for s, _ in train_losses(run_dir)] == [1, 2, 3, 4, 5]


def test_force_with_another_lora_rank_is_a_clear_error(qa_run):
    make, _ = qa_run
    with pytest.raises(UserError, match="shape"):
        run_training(make(lora={"r": 8, "alpha": 8}), log=quiet, resume=True, force=True)


def test_unrelated_changes_are_allowed_on_resume(qa_run):
    make, run_dir = qa_run
    summary = run_training(make(train={"max_steps": 6, "log_every": 2}), log=quiet, resume=True)
    assert summary["steps"] == 6
    # Steps 1-3 from the first run, then every second step.
    assert [s for s, _ in train_losses(run_dir)] == [1, 2, 3, 4, 6]


# ------------------------------------------------------------------------------------------------ crash safety
def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(make_config, qa_file, tmp_path, monkeypatch):
    real_save = ckpt.save_file
    calls = []

    def save_file(tensors, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        return real_save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", save_file)
    config = make_config(qa_file, train={"max_steps": 3}, save={"every": 1, "keep_last": 1})
    with pytest.raises(OSError) as error:
        run_training(config, log=quiet)
    assert error.value.errno == errno.ENOSPC
    run_dir = tmp_path / "run"
    assert complete_steps(run_dir) == [1]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000001"]  # no staging left
    assert not (run_dir / RUN_MARKER).exists()

    # The surviving checkpoint loads, and a resume with the disk freed finishes the run.
    recipe = Trainer(config, log=quiet, show_progress=False, run_dir=False)
    recipe.setup()
    state = ckpt.load_checkpoint(ckpt.checkpoint_dir(run_dir, 1), recipe.model, recipe.optimizer, recipe.scheduler)
    assert (state.step, state.epoch_position) == (1, 1)
    monkeypatch.setattr(ckpt, "save_file", real_save)
    assert run_training(config, log=quiet, resume=True)["steps"] == 3
    assert complete_steps(run_dir) == [3]


def test_failed_save_removes_its_staging_folder_and_leaves_others(tmp_path, monkeypatch):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    run_config = config_from_dict({"data": {"train": "x.jsonl"}})
    first = ckpt.save_checkpoint(tmp_path, ckpt.TrainState(step=1), model, optimizer, scheduler, run_config)
    before = {p.name: p.read_bytes() for p in first.iterdir()}

    def broken(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", broken)  # fails after the weights are written
    with pytest.raises(OSError):
        ckpt.save_checkpoint(tmp_path, ckpt.TrainState(step=2), model, optimizer, scheduler, run_config)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000001"]
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before


def test_old_checkpoints_are_removed_only_after_a_newer_one_is_complete(make_config, qa_file, tmp_path, monkeypatch):
    # Validation gets worse after step 1, so step 1 stays the best and is never pruned.
    values = iter([1.0, 2.0, 3.0, 4.0])
    monkeypatch.setattr(Trainer, "evaluate", lambda self: {"val_loss": next(values), "val_perplexity": 1.0})
    real_prune = ckpt.prune_checkpoints
    seen = []

    def prune(run_dir, keep_last, best_step):
        complete = complete_steps(run_dir)
        seen.append(complete)
        assert complete[-1] == max(complete)  # the newest checkpoint is complete before anything is removed
        real_prune(run_dir, keep_last, best_step)

    monkeypatch.setattr(ckpt, "prune_checkpoints", prune)
    config = make_config(qa_file, train={"max_steps": 3}, save={"every": 1, "keep_last": 1}, eval={"every": 1})
    run_training(config, log=quiet)
    run_dir = tmp_path / "run"
    assert seen == [[1], [1, 2], [1, 2, 3]]
    assert complete_steps(run_dir) == [1, 3]
    assert json.loads((run_dir / "summary.json").read_text())["best_step"] == 1


# ---------------------------------------------------------------------------------------------------- NaN guard
def test_a_nan_loss_names_the_step_and_writes_no_checkpoint_from_it(make_config, qa_file, tmp_path, monkeypatch):
    poison_loss(monkeypatch, 3, only=True)
    config = make_config(qa_file, train={"max_steps": 5}, save={"every": 1, "keep_last": 5})
    with pytest.raises(NonFiniteLossError, match="step 3: the loss is nan"):
        run_training(config, log=quiet)
    run_dir = tmp_path / "run"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000001", "step-00000002"]
    assert [s for s, _ in train_losses(run_dir)] == [1, 2]
    assert not (run_dir / RUN_MARKER).exists()
