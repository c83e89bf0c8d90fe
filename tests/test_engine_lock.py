"""The run directory lock: a live run refuses a second train / --overwrite / --resume (naming its pid and host),
a dead holder's lock is taken over as stale, the lock lives through --overwrite and goes on every exit, and the
reading verbs neither take it nor change a live run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tuneforge.cli import main as cli_main
from tuneforge.engine import lock as lock_module
from tuneforge.engine.lock import LOCK_FILE, RunLock, RunLockedError
from tuneforge.engine.rundir import check_run_dir, prepare_run_dir
from tuneforge.errors import UserError
from tuneforge.engine import build
from tuneforge.engine.trainer import NonFiniteLossError, Trainer, run_training

from conftest import QA_ROWS, poison_loss, write_jsonl

HOLDER = r"""
import sys, time
from tuneforge.engine.lock import RunLock
lock = RunLock.acquire(sys.argv[1], log=lambda m: None)
print("locked", flush=True)
time.sleep(600)
"""


def quiet(_message):
    pass


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


@pytest.fixture
def finished_run(make_config, tmp_path):
    rows = write_jsonl(tmp_path / "rows.jsonl", QA_ROWS[:16])
    config = make_config(rows, train={"max_steps": 2}, save={"every": 1})
    run_training(config, log=quiet)
    run_dir = tmp_path / "run"
    return run_dir / "config.yaml", run_dir


@pytest.fixture
def holder(finished_run):
    """A second process holding the lock of the finished run, through the real lock module."""
    _, run_dir = finished_run
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "locked"
    yield process
    if process.poll() is None:
        process.kill()
    process.wait()


def test_a_live_run_refuses_train_overwrite_and_resume_and_a_dead_ones_lock_is_stale(finished_run, holder, capsys,
                                                                                      monkeypatch):
    config_file, run_dir = finished_run
    before = snapshot(run_dir)

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded for a run that may not start")

    with monkeypatch.context() as patch:
        patch.setattr(build, "load_model", no_model)
        for flags in (["--overwrite"], ["--resume"], []):
            assert cli_main(["train", str(config_file), *flags]) == 2, flags
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith("error: run directory"), err
            assert f"in use by a run that is still training (pid {holder.pid} on host {socket.gethostname()}" in err[0]
    assert snapshot(run_dir) == before  # nothing deleted, nothing written

    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert cli_main(["train", str(config_file), "--resume"]) == 0
    err = capsys.readouterr().err
    assert (f"taking over a stale lock of pid {holder.pid} on host {socket.gethostname()} (that process is gone)"
            in err)
    assert not (run_dir / LOCK_FILE).exists()  # released at the end of the run


def test_the_lock_is_held_through_overwrite_for_the_whole_run(finished_run, make_config, tmp_path):
    _, run_dir = finished_run
    rows = write_jsonl(tmp_path / "other.jsonl", QA_ROWS[:8])
    recipe = Trainer(make_config(rows, train={"max_steps": 1}), overwrite=True, log=quiet, show_progress=False)
    recipe.setup()
    # --overwrite cleared the old run (its checkpoints are gone) but not the lock, which names this process.
    assert not (run_dir / "checkpoints").exists()
    assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == os.getpid()
    with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
        RunLock.acquire(run_dir)  # flock: another open of the file conflicts, even in the same process
    recipe.train()
    with pytest.raises(RunLockedError):
        RunLock.acquire(run_dir)
    recipe.run_lock.release()
    RunLock.acquire(run_dir).release()
    assert not (run_dir / LOCK_FILE).exists()


def test_the_lock_is_released_when_the_run_fails(make_config, qa_file, tmp_path, monkeypatch):
    poison_loss(monkeypatch, 2, only=True)
    with pytest.raises(NonFiniteLossError):
        run_training(make_config(qa_file, train={"max_steps": 3}), log=quiet)
    run_dir = tmp_path / "run"
    assert not (run_dir / LOCK_FILE).exists()
    RunLock.acquire(run_dir).release()


def test_a_refused_start_leaves_no_folder_behind(make_config, tmp_path):
    # A missing data file fails after the lock was taken (it created the folder): the folder goes with the lock.
    config = make_config(tmp_path / "missing.jsonl", train={"output_dir": str(tmp_path / "a" / "b" / "run")})
    with pytest.raises(UserError, match="missing.jsonl"):
        run_training(config, log=quiet)
    assert not (tmp_path / "a").exists()


def test_the_lock_file_does_not_count_as_content(tmp_path):
    run_dir = tmp_path / "run"
    lock = RunLock.acquire(run_dir)
    check_run_dir(run_dir, overwrite=False)  # an empty folder but for the lock: free to use
    (run_dir / "config.yaml").write_text("method: sft\n")
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    with pytest.raises(UserError, match="already exists"):
        check_run_dir(run_dir, overwrite=False)
    prepare_run_dir(run_dir, overwrite=True)
    assert [p.name for p in run_dir.iterdir()] == [LOCK_FILE]
    lock.release()
    assert not run_dir.exists()  # the lock made the folder; nothing else was written in it


def test_reading_verbs_neither_lock_nor_change_a_live_run(finished_run, tmp_path, monkeypatch, capsys):
    _, run_dir = finished_run
    lock = RunLock.acquire(run_dir)  # the run is "live"
    before = snapshot(run_dir)

    def forbidden(*args, **kwargs):
        raise AssertionError("a reading verb took the run lock")

    monkeypatch.setattr(lock_module.RunLock, "acquire", forbidden)
    assert cli_main(["plot", str(run_dir), "--out", str(tmp_path / "curves.png")]) == 0
    assert cli_main(["generate", str(run_dir), "--prompt", "What is item 1?", "--max-new-tokens", "2"]) == 0
    assert cli_main(["merge", str(run_dir), str(tmp_path / "merged")]) == 0
    assert snapshot(run_dir) == before
    lock.release()
