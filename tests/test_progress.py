"""Long work shows progress and little else: the first step, every evaluation and the end of a run print, piped
progress lines every few seconds for validation and eval, and third-party noise is silenced (only it)."""

from __future__ import annotations

import importlib.util
import io
import logging
import os
import subprocess
import sys
import warnings

import pytest
import yaml

from tuneforge.engine.metrics import MetricsLog, is_log_step
from tuneforge.progress import LINE_INTERVAL_S, Progress, progress
from tuneforge.quiet import quiet_third_party

from conftest import write_jsonl

NOISE = ("Failed to load CPU gemm_4bit_forward", "is_gradient_checkpointing", "FutureWarning",
         "fatal: not a git repository")
# Runs tuneforge as bitsandbytes is imported on a CPU with AVX512-BF16 without the `kernels` package (this
# machine may lack AVX512-BF16): bitsandbytes then logs "Failed to load CPU gemm_4bit_forward ..." at import.
AVX512_BF16 = """
import importlib.abc, sys
class AVX512BF16(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "bitsandbytes.backends.cpu.ops":
            import bitsandbytes.functional as functional
            functional.has_avx512bf16 = lambda: True
            sys.modules["kernels"] = None
        return None
sys.meta_path.insert(0, AVX512BF16())
from tuneforge.cli import entry
entry()
"""


def run_piped(args: list[str], cwd) -> subprocess.CompletedProcess:
    """``tuneforge ARGS`` in a fresh process with standard output and error piped (no terminal)."""
    env = {**os.environ, "TUNEFORGE_HOME": str(cwd / "home")}
    env.pop("PYTHONWARNINGS", None)
    done = subprocess.run([sys.executable, "-c", AVX512_BF16, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_log_steps_are_the_first_every_nth_and_the_last():
    assert [s for s in range(1, 13) if is_log_step(s, 5, 12)] == [1, 5, 10, 12]
    assert [s for s in range(1, 4) if is_log_step(s, 5, 3)] == [1, 3]


def test_piped_lines_come_at_most_every_interval_and_once_at_the_end():
    clock, out = Clock(), io.StringIO()
    shown = Progress("validation", total=10, enabled=True, terminal=False, stream=out, clock=clock)
    step = LINE_INTERVAL_S * 0.4
    for _ in range(10):
        clock.now += step
        shown.update()
    shown.close()
    shown.close()
    lines = out.getvalue().splitlines()
    # Updates every 0.4 intervals: a line at the 3rd, 6th and 9th; none at the 10th (the closing line follows).
    assert [line.split(",")[0] for line in lines[:-1]] == ["validation: 3/10 batches (30%)",
                                                           "validation: 6/10 batches (60%)",
                                                           "validation: 9/10 batches (90%)"]
    assert lines[-1] == f"validation: 10 batches in {10 * step:.1f} s"


def test_only_the_main_process_reports_and_a_loop_left_early_does_not_claim_the_end(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    assert list(progress(range(3), "validation")) == [0, 1, 2]
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError):
        for item in progress(range(3), "scoring", unit="row"):
            raise ValueError(item)
    assert capsys.readouterr().err == ""
    assert list(progress(range(1), "scoring", unit="row")) == [0]
    assert capsys.readouterr().err.startswith("scoring: 1 row in ")


def test_a_terminal_gets_a_bar_and_evaluations_print_above_the_training_bar(capsys):
    shown = Progress("validation", total=2, enabled=True, terminal=True)
    assert shown.bar is not None
    shown.update(2)
    shown.close()
    assert "validation" in capsys.readouterr().err
    metrics = MetricsLog(None, 3, show_progress=True)
    metrics.log({"step": 3, "val_loss": 1.5})
    metrics.close()
    assert "step 3: val_loss 1.5000" in capsys.readouterr().err


def test_only_the_named_third_party_messages_are_silenced(caplog):
    with warnings.catch_warnings(record=True) as caught:
        quiet_third_party()
        warnings.warn_explicit("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning,
                               "modeling_utils.py", 1, module="transformers.modeling_utils")
        warnings.warn_explicit("`something_else` is deprecated", FutureWarning, "modeling_utils.py", 2,
                               module="transformers.modeling_utils")
        warnings.warn("`is_gradient_checkpointing` is deprecated, says the user's own code", FutureWarning)
    assert [str(w.message) for w in caught] == ["`something_else` is deprecated",
                                                "`is_gradient_checkpointing` is deprecated, says the user's own code"]
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s.", "no kernels")
    logger.warning("a real bitsandbytes problem")
    assert [record.getMessage() for record in caplog.records] == ["a real bitsandbytes problem"]


def test_piped_training_prints_the_first_step_evaluations_and_the_end_and_no_noise(tiny_model_dir, qa_file,
                                                                                    tmp_path):
    config = {"model": {"name_or_path": str(tiny_model_dir)},
              "data": {"train": str(qa_file), "max_length": 64, "val_fraction": 0.25},
              "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
              "train": {"output_dir": str(tmp_path / "run"), "max_steps": 3, "log_every": 5, "batch_size": 2,
                        "mixed_precision": "no"}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    err = run_piped(["train", str(path)], tmp_path).stderr
    lines = err.splitlines()
    assert any(line.startswith("step 1/3 loss") for line in lines), err
    assert any(line.startswith("step 3/3 loss") for line in lines), err
    assert not any(line.startswith("step 2/3") for line in lines)
    assert any(line.startswith("validation: ") and " batches in " in line for line in lines), err
    assert any(line.startswith("step 3: val_loss") for line in lines), err
    assert any(line.startswith("run directory: ") for line in lines), err
    for noise in NOISE:
        assert noise not in err


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval is not installed")
def test_piped_eval_shows_progress_and_no_noise(tiny_model_dir, qa_file, tmp_path):
    from tuneforge.config import config_from_dict
    from tuneforge.engine.trainer import run_training

    run_training(config_from_dict({
        "model": {"name_or_path": str(tiny_model_dir)}, "data": {"train": str(qa_file), "max_length": 64},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 1, "batch_size": 4, "mixed_precision": "no"}}),
        log=lambda message: None)
    heldout = write_jsonl(tmp_path / "heldout.jsonl", [{"messages": [{"role": "user", "content": f"Q{i}?"},
                                                                     {"role": "assistant", "content": f"A{i}."}]}
                                                       for i in range(5)])
    # A LoRA run (PEFT reads transformers' deprecated property while loading it) and lm-eval, from a folder
    # outside any git checkout.
    done = run_piped(["eval", str(tmp_path / "run"), "--data", str(heldout), "--batch-size", "2",
                      "--max-new-tokens", "2", "--lm-eval", "tuneforge_arithmetic", "--lm-eval-limit", "2",
                      "--out", str(tmp_path / "eval.json")], tmp_path)
    lines = done.stderr.splitlines()
    assert "held-out loss: 3 batches in" in done.stderr and "answers: 3 batches in" in done.stderr, done.stderr
    assert any(line.startswith("run: lm-eval tuneforge_arithmetic") for line in lines)
    assert f"wrote {tmp_path / 'eval.json'}" in lines
    assert "loss" in done.stdout
    for noise in NOISE:
        assert noise not in done.stderr
