"""Early stopping on a validation metric, and the overfitting warning (validation up while training down)."""

from __future__ import annotations

import math

from tuneforge.config import EvalConfig
from tuneforge.engine.checkpoint import TrainState


def record_evaluation(state: TrainState, config: EvalConfig, metrics: dict, train_loss: float | None) -> bool:
    """Update ``state`` with one evaluation; returns True when ``config.metric`` improved (a new best).

    An improvement must beat the best by more than ``min_delta``; otherwise the patience counter grows. A
    non-finite value is never an improvement.
    """
    if config.metric not in metrics:
        from tuneforge.errors import ConfigError

        raise ConfigError(f"eval.metric: {config.metric!r} is not among the validation metrics "
                          f"({', '.join(sorted(metrics))})")
    value = metrics[config.metric]
    state.evaluations.append({"step": state.step, **metrics, "train_loss": train_loss})
    minimise = config.minimise()
    if not math.isfinite(value):
        # NaN compares false with everything: taken as the first best, nothing could ever beat it.
        improved = False
    elif state.best_metric is None:
        improved = True
    elif minimise:
        improved = value < state.best_metric - config.min_delta
    else:
        improved = value > state.best_metric + config.min_delta
    if improved:
        state.best_metric, state.best_step = value, state.step
        state.evals_without_improvement = 0
    else:
        state.evals_without_improvement += 1
    return improved


def should_stop(state: TrainState, config: EvalConfig) -> bool:
    return config.patience > 0 and state.evals_without_improvement >= config.patience


def overfitting_start(evaluations: list[dict], rises: int = 2) -> int | None:
    """The step where overfitting began, or None.

    Overfitting here means validation loss rose at ``rises`` consecutive evaluations while the training loss
    (mean over the steps between evaluations) fell over the same evaluations. The step returned is the last
    evaluation before the rise: the point where training should have stopped.
    """
    points = [e for e in evaluations if e.get("val_loss") is not None and e.get("train_loss") is not None]
    for start in range(len(points) - rises):
        window = points[start:start + rises + 1]
        val_up = all(b["val_loss"] > a["val_loss"] for a, b in zip(window, window[1:]))
        train_down = all(b["train_loss"] < a["train_loss"] for a, b in zip(window, window[1:]))
        if val_up and train_down:
            return window[0]["step"]
    return None
