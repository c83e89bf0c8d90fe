"""Evaluation during training: the early-stopping bookkeeping with hand-made numbers, then runs whose validation
(and training) losses are scripted: where the run stops, which checkpoint survives pruning, which weights the
run directory ends with, and the overfitting warning."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from tuneforge.config import EvalConfig
from tuneforge.engine import checkpoint as ckpt
from tuneforge.engine.checkpoint import TrainState
from tuneforge.engine.early_stopping import overfitting_start, record_evaluation, should_stop
from tuneforge.engine.metrics import read_metrics
from tuneforge.errors import ConfigError
from tuneforge.engine.trainer import Trainer, run_training


def quiet(_message):
    pass


def feed(config: EvalConfig, values: list[float], metric: str = "val_loss") -> tuple[TrainState, list[bool]]:
    """Record one evaluation per step (steps 1, 2, ...); returns the state and the improved flags."""
    state, improved = TrainState(), []
    for step, value in enumerate(values, 1):
        state.step = step
        improved.append(record_evaluation(state, config, {metric: value}, train_loss=None))
    return state, improved


# ------------------------------------------------------------------------------------------------- unit tests
def test_min_mode_tracks_best_and_counts_evaluations_without_improvement():
    config = EvalConfig(patience=2)
    state, improved = feed(config, [3.0, 2.5, 2.6, 2.4, 2.45, 2.5])
    assert improved == [True, True, False, True, False, False]
    assert (state.best_metric, state.best_step, state.evals_without_improvement) == (2.4, 4, 2)
    assert should_stop(state, config)
    assert [e["step"] for e in state.evaluations] == [1, 2, 3, 4, 5, 6]


def test_patience_counts_consecutive_evaluations_only():
    config = EvalConfig(patience=2)
    state, _ = feed(config, [3.0, 3.1])
    assert not should_stop(state, config)  # one without improvement
    state, _ = feed(config, [3.0, 3.1, 2.0, 2.1])
    assert state.evals_without_improvement == 1 and not should_stop(state, config)
    state, _ = feed(config, [3.0, 3.1, 3.2])
    assert should_stop(state, config)


def test_max_mode_for_a_metric_to_maximise():
    config = EvalConfig(metric="val_accuracy", patience=1)
    assert not config.minimise()
    state, improved = feed(config, [0.5, 0.7, 0.6], metric="val_accuracy")
    assert improved == [True, True, False]
    assert (state.best_metric, state.best_step) == (0.7, 2)
    assert should_stop(state, config)
    # mode overrides the guess from the name
    state, improved = feed(EvalConfig(mode="max"), [1.0, 2.0, 1.5])
    assert improved == [True, True, False] and state.best_metric == 2.0


def test_min_delta_improvements_must_be_strictly_larger():
    config = EvalConfig(min_delta=0.1)
    # An improvement must beat the best by more than min_delta: 2.95 and 2.8 do not, 2.85 does.
    state, improved = feed(config, [3.0, 2.95, 2.85, 2.8])
    assert improved == [True, False, True, False]
    assert (state.best_metric, state.best_step) == (2.85, 3)
    _, improved = feed(EvalConfig(mode="max", min_delta=0.5), [1.0, 1.4, 1.6])
    assert improved == [True, False, True]


def test_patience_zero_never_stops():
    config = EvalConfig(patience=0)
    state, _ = feed(config, [1.0] + [2.0] * 10)
    assert state.evals_without_improvement == 10
    assert not should_stop(state, config)


def test_a_non_finite_validation_metric_is_never_the_best():
    config = EvalConfig(patience=3)
    state, improved = feed(config, [float("nan"), 3.0, float("inf"), 2.0])
    assert improved == [False, True, False, True]
    assert (state.best_metric, state.best_step) == (2.0, 4)
    _, improved = feed(EvalConfig(mode="max"), [float("nan"), 0.5])
    assert improved == [False, True]


def test_an_unknown_metric_is_a_config_error():
    with pytest.raises(ConfigError, match="val_accuracy"):
        feed(EvalConfig(metric="val_accuracy"), [1.0])


def _evaluations(val: list[float], train: list[float | None]) -> list[dict]:
    return [{"step": 10 * (i + 1), "val_loss": v, "train_loss": t} for i, (v, t) in enumerate(zip(val, train))]


@pytest.mark.parametrize("val, train, expected", [
    ([3.0, 2.5, 2.6, 2.7], [5.0, 4.0, 3.0, 2.0], 20),        # rises twice while training falls: from step 20
    ([3.0, 2.5, 2.6, 2.5, 2.6], [5, 4, 3, 2, 1], None),      # never two rises in a row
    ([3.0, 2.5, 2.6, 2.7], [5.0, 4.0, 4.5, 3.0], None),      # training rose too: not overfitting
    ([3.0, 3.1, 3.2], [2.0, 1.9, 1.8], 10),                  # from the first evaluation
    ([3.0, 3.1], [2.0, 1.9], None),                          # too few evaluations
    ([3.0, 3.0, 3.1, 3.2], [5, 4, 3, 2], 20),                # a flat evaluation does not count as a rise
    ([3.0, 3.1, 3.2], [None, 1.9, 1.8], None),               # no training loss (first evaluation after resume)
])
def test_overfitting_start(val, train, expected):
    assert overfitting_start(_evaluations(val, train)) == expected


# ----------------------------------------------------------------------------------------------- scripted runs
@pytest.fixture
def scripted(monkeypatch):
    """scripted(val_losses, train_losses=None): evaluation returns the given validation losses in turn; the
    training loss logged (and averaged for the overfitting check) is replaced by the given ones. The weights
    still train for real."""

    def install(val_losses, train_losses=None):
        values = iter(val_losses)
        monkeypatch.setattr(Trainer, "evaluate",
                            lambda self: {"val_loss": (v := next(values)), "val_perplexity": math.exp(v)})
        if train_losses is not None:
            losses = iter(train_losses)
            real = Trainer.train_step

            def train_step(self, window):
                _, grad_norm = real(self, window)
                return torch.tensor(next(losses)), grad_norm

            monkeypatch.setattr(Trainer, "train_step", train_step)

    return install


def adapter(run_dir):
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def checkpoint_weights(run_dir, step):
    path = ckpt.checkpoint_dir(run_dir, step) / "weights.safetensors"
    return {name.replace(".default.", "."): value for name, value in load_file(str(path)).items()}


def same_weights(a: dict, b: dict) -> bool:
    assert a.keys() == b.keys() and a
    return all(torch.equal(a[name], b[name]) for name in a)


@pytest.mark.parametrize("final", ["best", "last"])
def test_early_stopping_stops_keeps_the_best_and_saves_the_chosen_weights(make_config, qa_file, tmp_path, scripted,
                                                                          final):
    scripted([3.0, 2.5, 2.6, 2.7, 2.8])
    messages = []
    # 24 rows, batch 4: 6 planned steps; evaluation every step; patience 2.
    config = make_config(qa_file, train={"lr": 1e-2}, eval={"every": 1, "patience": 2, "final": final},
                         save={"keep_last": 1})
    summary = run_training(config, log=messages.append)
    run_dir = tmp_path / "run"
    assert (summary["stop_reason"], summary["steps"]) == ("early_stopping", 4)
    assert (summary["best_step"], summary["best_metric"]) == (2, 2.5)
    assert any(m.startswith("early stopping at step 4") and "best 2.5000 at step 2" in m for m in messages)
    on_file = json.loads((run_dir / "summary.json").read_text())
    assert (on_file["stop_reason"], on_file["steps"], on_file["best_step"]) == ("early_stopping", 4, 2)
    assert on_file["final_step"] == (2 if final == "best" else 4)
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "val_loss" in r] == [1, 2, 3, 4]

    # keep_last=1 keeps the newest checkpoint, and the best one besides.
    complete, partial = ckpt.list_checkpoints(run_dir)
    assert [p.name for p in complete] == ["step-00000002", "step-00000004"] and partial == []
    best, last = checkpoint_weights(run_dir, 2), checkpoint_weights(run_dir, 4)
    assert not same_weights(best, last)  # the run really trained between them
    assert same_weights(adapter(run_dir), best if final == "best" else last)


def test_overfitting_is_reported_when_validation_rises_while_training_falls(make_config, qa_file, tmp_path,
                                                                           scripted):
    scripted([3.0, 2.5, 2.6, 2.7], train_losses=[5.0, 4.0, 3.0, 2.0])
    messages = []
    config = make_config(qa_file, train={"max_steps": 4}, eval={"every": 1})
    summary = run_training(config, log=messages.append)
    assert summary["stop_reason"] == "max_steps"  # a warning, not a stop (patience 0)
    assert summary["overfitting_from_step"] == 2
    warnings = [m for m in messages if "is overfitting" in m]
    assert len(warnings) == 1 and "since step 2" in warnings[0]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["overfitting_from_step"] == 2


def test_no_overfitting_warning_while_training_loss_also_rises(make_config, qa_file, scripted):
    scripted([3.0, 2.5, 2.6, 2.7], train_losses=[5.0, 4.0, 4.5, 4.6])
    messages = []
    summary = run_training(make_config(qa_file, train={"max_steps": 4}, eval={"every": 1}), log=messages.append)
    assert summary["overfitting_from_step"] is None
    assert not any("is overfitting" in m for m in messages)


def test_training_loss_for_the_overfitting_check_is_the_mean_since_the_last_evaluation(make_config, qa_file,
                                                                                      scripted):
    # Evaluations at steps 2 and 4 (every 2) and the final one at 5.
    scripted([3.0, 3.1, 3.2], train_losses=[6.0, 4.0, 3.0, 2.0, 1.0])
    recipe = Trainer(make_config(qa_file, train={"max_steps": 5}, eval={"every": 2}), log=quiet,
                       show_progress=False, run_dir=False)
    recipe.setup()
    summary = recipe.train()
    assert [(e["step"], e["train_loss"]) for e in recipe.state.evaluations] == [(2, 5.0), (4, 2.5), (5, 1.0)]
    assert summary["overfitting_from_step"] == 2


def test_summary_fields_and_curves_after_a_run_with_validation(make_config, qa_file, tmp_path):
    config = make_config(qa_file, data={"val_fraction": 0.25}, train={"epochs": 2, "lr": 1e-2})
    summary = run_training(config, log=quiet)
    run_dir = tmp_path / "run"
    on_file = json.loads((run_dir / "summary.json").read_text())
    records = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    evaluations = [r for r in records if "val_loss" in r]
    # 18 training rows, batch 4: 5 steps per epoch; validation at the end of each epoch.
    assert on_file["steps"] == summary["steps"] == 10 and on_file["stop_reason"] == "completed"
    assert on_file["epochs"] == 2
    assert on_file["tokens"] == train[-1]["tokens"] > 0
    assert on_file["elapsed_s"] > 0
    assert [r["step"] for r in evaluations] == [5, 10]
    best = min(evaluations, key=lambda r: r["val_loss"])
    assert (on_file["best_step"], on_file["best_metric"]) == (best["step"], best["val_loss"])
    assert on_file["val_loss"] == evaluations[-1]["val_loss"]
    assert on_file["val_perplexity"] == pytest.approx(math.exp(on_file["val_loss"]))
    assert on_file["metric"] == "val_loss" and on_file["final_step"] == best["step"]
    assert on_file["run_dir"] == str(run_dir)
    png = (run_dir / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
