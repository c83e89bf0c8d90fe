"""Crash safety of checkpoint save, replace and prune: a fault (an OSError, or the process dying) at every
filesystem operation in turn must leave a run that resumes from its newest really complete checkpoint; also a
real SIGKILL while replacing, and what resume does with the folders an older, unsafe replace could leave."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tuneforge.cli import main as cli_main
from tuneforge.config import config_from_dict
from tuneforge.engine import checkpoint as ckpt
from tuneforge.errors import UserError
from tuneforge.engine.trainer import run_training

from conftest import QA_ROWS, write_jsonl

RUN_CONFIG = config_from_dict({"data": {"train": "x.jsonl"}})


class Killed(BaseException):
    """The simulated death of the process: raised by the faulty operation and by every one after it."""


class Faults:
    """Wraps the filesystem operations checkpointing uses so that call number ``at`` fails: with an OSError
    (``mode="raise"``: the process goes on, its error handlers run) or for good (``mode="kill"``: that call and
    every later one raise :class:`Killed`, so no handler can touch the disk any more, as after a SIGKILL)."""

    def __init__(self, monkeypatch, at: int, mode: str):
        self.calls, self.at, self.mode, self.fired = 0, at, mode, False
        for owner, name in ((os, "rename"), (os, "replace"), (os, "unlink"), (os, "rmdir"), (os, "mkdir"),
                            (os, "fsync"), (shutil, "rmtree"), (Path, "write_text"), (ckpt, "save_file"),
                            (torch, "save")):
            monkeypatch.setattr(owner, name, self.wrap(getattr(owner, name)))

    def wrap(self, real):
        def operation(*args, **kwargs):
            self.calls += 1
            if self.fired and self.mode == "kill":
                raise Killed()
            if self.calls == self.at:
                self.fired = True
                if self.mode == "kill":
                    raise Killed()
                raise OSError(errno.EIO, "injected fault")
            return real(*args, **kwargs)
        return operation


def model_with(value: float) -> torch.nn.Linear:
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.fill_(value)
        model.bias.fill_(value)
    return model


def save(run_dir: Path, step: int, value: float) -> Path:
    model = model_with(value)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    return ckpt.save_checkpoint(run_dir, ckpt.TrainState(step=step), model, optimizer, scheduler, RUN_CONFIG)


def faulted_part(run_dir: Path, marks: dict, faults: Faults | None = None) -> None:
    """Save step 3, replace it (what resuming a finished run does), prune to the newest one."""
    save(run_dir, 3, 3.0)
    marks["saved"] = faults.calls if faults else 0
    save(run_dir, 3, 3.5)
    ckpt.prune_checkpoints(run_dir, keep_last=1, best_step=None)


def resume_point(run_dir: Path) -> tuple[int, float]:
    """What a resumed run would do: tidy, choose, load; returns (step, the weights' value)."""
    messages = []
    ckpt.recover_checkpoints(run_dir, messages.append)
    path = ckpt.find_resume_checkpoint(run_dir, None, messages.append)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    state = ckpt.load_checkpoint(path, model, optimizer, scheduler)
    assert state.step == int(path.name.removeprefix(ckpt.PREFIX))
    leftovers = [p.name for p in (run_dir / ckpt.CHECKPOINTS).iterdir() if not p.name.startswith(ckpt.PREFIX)]
    assert leftovers == [], leftovers  # staging and set-aside folders were promoted or removed
    assert ckpt.list_checkpoints(run_dir)[1] == []
    return state.step, model.weight[0, 0].item()


@pytest.mark.parametrize("mode", ["kill", "raise"])
def test_a_fault_at_any_operation_of_save_replace_or_prune_keeps_a_resumable_checkpoint(tmp_path, monkeypatch,
                                                                                         mode):
    versions = {1: {1.0}, 2: {2.0}, 3: {3.0, 3.5}}
    at = 0
    while True:
        at += 1
        run_dir = tmp_path / f"run-{at}"
        save(run_dir, 1, 1.0)
        save(run_dir, 2, 2.0)
        marks = {}
        with monkeypatch.context() as patch:
            faults = Faults(patch, at, mode)
            try:
                faulted_part(run_dir, marks, faults)
            except (Killed, OSError):
                assert faults.fired
        step, value = resume_point(run_dir)
        assert value in versions[step], (at, step, value)  # a checkpoint whole, never a mix of two saves
        # Step 2 was complete before the faults began; step 3, once its first save had returned.
        assert step >= 2, at
        if "saved" in marks and faults.calls > marks["saved"]:
            assert step == 3, (at, marks)
        # The run goes on from there: its next checkpoint saves and is chosen.
        save(run_dir, 4, 4.0)
        ckpt.prune_checkpoints(run_dir, keep_last=1, best_step=None)
        assert resume_point(run_dir) == (4, 4.0)
        if not faults.fired:
            break
    assert at > 20  # every operation of the three was hit once


KILL_WHILE_REPLACING = r"""
import os, signal, sys, torch
from tuneforge.config import config_from_dict
from tuneforge.engine import checkpoint as ckpt

run_dir, value = sys.argv[1], float(sys.argv[2])
model = torch.nn.Linear(2, 2)
torch.nn.init.constant_(model.weight, value)
optimizer = torch.optim.AdamW(model.parameters())
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
unlink = os.unlink
def unlink_then_die(path, *args, **kwargs):
    unlink(path, *args, **kwargs)
    if os.path.basename(path) == "state.json":  # the old checkpoint's state.json is gone, its COMPLETE is not
        os.kill(os.getpid(), signal.SIGKILL)
os.unlink = unlink_then_die
ckpt.save_checkpoint(run_dir, ckpt.TrainState(step=1), model, optimizer, scheduler,
                     config_from_dict({"data": {"train": "x.jsonl"}}))
"""


def test_a_sigkill_while_replacing_a_checkpoint_leaves_it_resumable(tmp_path):
    run_dir = tmp_path / "run"
    save(run_dir, 1, 1.0)
    killed = subprocess.run([sys.executable, "-c", KILL_WHILE_REPLACING, str(run_dir), "5.0"], capture_output=True,
                            text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    step, value = resume_point(run_dir)
    assert step == 1 and value in (1.0, 5.0)


# ------------------------------------------------------------- what an unsafe replace or delete left, on resume
@pytest.fixture
def two_step_run(make_config, tmp_path):
    """A finished 2-step run with checkpoints 1 and 2, and its config file."""
    rows = write_jsonl(tmp_path / "rows.jsonl", QA_ROWS[:16])
    config = make_config(rows, train={"max_steps": 2}, save={"every": 1, "keep_last": 5})
    run_training(config, log=lambda _: None)
    run_dir = tmp_path / "run"
    return run_dir / "config.yaml", run_dir


def test_resume_promotes_a_complete_staging_copy_of_a_half_deleted_checkpoint(two_step_run, capsys):
    config_file, run_dir = two_step_run
    newest = ckpt.checkpoint_dir(run_dir, 2)
    shutil.copytree(newest, newest.with_name(f"{ckpt.STAGING}{newest.name}"))
    (newest / "state.json").unlink()  # what rmtree in place left when killed: COMPLETE without state.json
    assert cli_main(["train", str(config_file), "--resume"]) == 0
    err = capsys.readouterr().err
    assert f"recovered checkpoint {newest} from .staging-{newest.name}" in err
    assert f"resumed from {newest} at step 2" in err
    assert ckpt.missing_files(newest) == []


def test_resume_skips_a_half_deleted_checkpoint_and_says_what_it_lacks(two_step_run, capsys):
    config_file, run_dir = two_step_run
    newest = ckpt.checkpoint_dir(run_dir, 2)
    (newest / "state.json").unlink()
    assert cli_main(["train", str(config_file), "--resume", str(newest)]) == 2
    assert "is incomplete (missing state.json)" in capsys.readouterr().err
    assert cli_main(["train", str(config_file), "--resume"]) == 0
    err = capsys.readouterr().err
    assert f"ignoring incomplete checkpoint {newest} (missing state.json)" in err
    assert f"resumed from {ckpt.checkpoint_dir(run_dir, 1)} at step 1" in err
    assert ckpt.missing_files(newest) == []  # step 2 trained again and saved whole


def test_an_incomplete_staging_folder_is_never_promoted(tmp_path):
    save(tmp_path, 1, 1.0)
    staging = tmp_path / ckpt.CHECKPOINTS / f"{ckpt.STAGING}{ckpt.PREFIX}00000002"
    shutil.copytree(ckpt.checkpoint_dir(tmp_path, 1), staging)
    (staging / "rng.pt").unlink()
    messages = []
    ckpt.recover_checkpoints(tmp_path, messages.append)
    assert not staging.exists() and not ckpt.checkpoint_dir(tmp_path, 2).exists()
    assert any("missing rng.pt" in m for m in messages)
    with pytest.raises(UserError, match="does not exist"):
        ckpt.find_resume_checkpoint(tmp_path, str(ckpt.checkpoint_dir(tmp_path, 2)))
