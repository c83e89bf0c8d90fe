"""Checks before a run starts (logger packages and wandb credentials, the output path), loggers that fail to
start, and a failed start that must not block its own retry."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tuneforge.cli import main as cli_main
from tuneforge.engine import preflight
from tuneforge.engine.metrics import MetricsLog
from tuneforge.engine.rundir import check_run_dir
from tuneforge.errors import UserError
from tuneforge.models.loading import RUN_MARKER
from tuneforge.engine import build
from tuneforge.engine.trainer import run_training

WANDB_VARIABLES = ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DISABLED", "WANDB_BASE_URL", "WANDB_CONFIG_DIR", "NETRC")


def quiet(_message):
    pass


@pytest.fixture
def no_wandb_setup(tmp_path, monkeypatch):
    """No wandb key, mode, netrc or settings file anywhere the check looks."""
    for name in WANDB_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)


def pretend_installed(monkeypatch, installed: set[str] = frozenset(), missing: set[str] = frozenset()):
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name in missing:
            return None
        if name in installed:
            return importlib.machinery.ModuleSpec(name, None)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(preflight.importlib.util, "find_spec", find_spec)


@pytest.fixture
def no_model(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded before the run was checked")

    monkeypatch.setattr(build, "load_model", forbidden)


def train_config(tmp_path, qa_file, tiny_model_dir):
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps({"model": {"name_or_path": str(tiny_model_dir)},
                                "data": {"train": str(qa_file), "max_length": 128},
                                "train": {"output_dir": str(tmp_path / "run"), "max_steps": 1}}))
    return path


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_a_missing_logger_package_fails_before_anything_is_written_or_loaded(tmp_path, qa_file, tiny_model_dir,
                                                                             monkeypatch, capsys, no_model):
    pretend_installed(monkeypatch, set(), missing={"wandb"})
    assert cli_main(["train", str(train_config(tmp_path, qa_file, tiny_model_dir)), "log.loggers=[wandb]"]) == 2
    assert one_error_line(capsys) == ("error: log.loggers: wandb is not installed; pip install 'tuneforge[wandb]' "
                                      "(or drop wandb from log.loggers)")
    assert not (tmp_path / "run").exists()


def test_wandb_without_a_key_or_offline_mode_fails_before_the_run_starts(tmp_path, qa_file, tiny_model_dir,
                                                                         monkeypatch, capsys, no_model,
                                                                         no_wandb_setup):
    pretend_installed(monkeypatch, {"wandb"})
    assert cli_main(["train", str(train_config(tmp_path, qa_file, tiny_model_dir)), "log.loggers=[wandb]"]) == 2
    line = one_error_line(capsys)
    assert line.startswith("error: log.loggers: wandb has no API key")
    for fix in ("WANDB_API_KEY", "wandb login", "WANDB_MODE=offline"):
        assert fix in line
    assert not (tmp_path / "run").exists()


def test_wandb_credentials_and_offline_modes_are_recognised(tmp_path, monkeypatch, no_wandb_setup):
    assert not preflight.wandb_can_log()
    for name, value in (("WANDB_MODE", "offline"), ("WANDB_MODE", "disabled"), ("WANDB_API_KEY", "k")):
        with monkeypatch.context() as patch:
            patch.setenv(name, value)
            assert preflight.wandb_can_log(), name
    netrc = tmp_path / "home" / ".netrc"
    netrc.parent.mkdir()
    netrc.write_text("machine example.org login user password other\n")
    netrc.chmod(0o600)
    assert not preflight.wandb_can_log()  # an entry for another host is no wandb login
    netrc.write_text("machine api.wandb.ai login user password secret\n")
    assert preflight.wandb_can_log()
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    assert not preflight.wandb_can_log()  # a self-hosted server needs its own entry
    netrc.unlink()
    (tmp_path / "wandb").mkdir()
    (tmp_path / "wandb" / "settings").write_text("[default]\nmode = offline\n")  # what `wandb offline` writes
    assert preflight.wandb_can_log()


def test_an_output_dir_that_cannot_be_made_fails_first(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        preflight.check_output_dir(blocker)
    with pytest.raises(UserError, match="cannot be created, .*file is a file"):
        preflight.check_output_dir(blocker / "run")
    preflight.check_output_dir(tmp_path / "new" / "run")  # fine: made when the run starts
    assert not (tmp_path / "new").exists()


def test_a_logger_that_fails_to_start_is_a_one_line_user_error(tmp_path, monkeypatch):
    import torch.utils.tensorboard

    def broken(*args, **kwargs):
        raise RuntimeError("cannot reach the server\nsecond line")

    monkeypatch.setattr(torch.utils.tensorboard, "SummaryWriter", broken)
    with pytest.raises(UserError) as error:
        MetricsLog(None, 1, show_progress=False, loggers=["tensorboard"], run_dir=tmp_path)
    assert str(error.value) == "log.loggers: tensorboard failed to start: RuntimeError: cannot reach the server"


def test_a_failed_start_does_not_block_its_retry(make_config, qa_file, tmp_path, monkeypatch):
    import torch.utils.tensorboard

    real = torch.utils.tensorboard.SummaryWriter
    config = make_config(qa_file, train={"max_steps": 1}, log={"loggers": ["tensorboard"]})
    with monkeypatch.context() as patch:
        patch.setattr(torch.utils.tensorboard, "SummaryWriter",
                      lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no server")))
        with pytest.raises(UserError, match="tensorboard failed to start"):
            run_training(config, log=quiet)
    run_dir = tmp_path / "run"
    assert (run_dir / "config.yaml").is_file()  # what the failed start left
    assert torch.utils.tensorboard.SummaryWriter is real
    messages = []
    summary = run_training(config, log=messages.append)  # the same command again, no overwrite
    assert summary["steps"] == 1 and (run_dir / RUN_MARKER).is_file()
    assert f"replacing {run_dir}: the leftovers of a run that never completed a step" in messages


@pytest.mark.parametrize("record", [
    {"checkpoints/step-00000001/COMPLETE": "1"},
    {"checkpoints/.staging-step-00000002/weights.safetensors": ""},
    {RUN_MARKER: "{}"},
    {"summary.json": "{}"},
    {"metrics.jsonl": json.dumps({"step": 1, "loss": 2.0}) + "\n"},
    {"metrics.jsonl": "not json\n" + json.dumps({"step": 0, "val_loss": 2.0}) + "\n"},
], ids=["checkpoint", "partial-checkpoint", "finished", "summary", "trained-step", "unreadable-metrics"])
def test_a_run_that_completed_a_step_still_needs_overwrite(tmp_path, record):
    run_dir = tmp_path / "run"
    for name, text in {"config.yaml": "method: sft\n", **record}.items():
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).write_text(text)
    with pytest.raises(UserError, match="already exists"):
        check_run_dir(run_dir, overwrite=False)
    check_run_dir(run_dir, overwrite=True)


def test_leftovers_with_only_a_baseline_evaluation_are_replaced(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("method: sft\n")
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 0, "val_loss": 2.0}) + "\n")
    (run_dir / "checkpoints").mkdir()
    messages = []
    check_run_dir(run_dir, overwrite=False, log=messages.append)
    assert messages == [f"replacing {run_dir}: the leftovers of a run that never completed a step"]
    (run_dir / "config.yaml").unlink()  # no longer tuneforge's: never replaced
    with pytest.raises(UserError, match="already exists"):
        check_run_dir(run_dir, overwrite=False)
