"""Metrics: one JSON object per logging step appended to ``RUN_DIR/metrics.jsonl``, a progress bar on a
terminal (or a line per log step elsewhere), and optional TensorBoard / Weights & Biases / MLflow / trackio
loggers, each given the run's config as its hyperparameters."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from tuneforge.errors import UserError


def is_log_step(step: int, log_every: int, total_steps: int) -> bool:
    """Whether training step ``step`` (counted from 1) is logged: the first (so a run shows it has started), every
    ``log_every``-th and the last. Loops read the step's numbers back from the device only at these steps."""
    return step == 1 or step % log_every == 0 or step >= total_steps


class MetricsLog:
    """Appends records to ``metrics.jsonl`` and forwards them to the configured loggers.

    Args:
        path: the metrics file (None: keep nothing on disk, e.g. in the bench).
        total_steps: for the progress bar.
        show_progress: a tqdm bar; None means "when stderr is a terminal".
        echo: called with a one-line summary of each training record when there is no progress bar.
        loggers: names from ``log.loggers``; ``run_dir`` and ``project`` configure them.
    """

    def __init__(self, path: str | Path | None, total_steps: int, show_progress: bool | None = None,
                 echo=None, loggers: list[str] = (), run_dir: Path | None = None, project: str = "tuneforge",
                 config: dict | None = None):
        self.path = Path(path) if path is not None else None
        self.total_steps = total_steps
        self.echo = echo
        self.bar = None
        if show_progress is None:
            show_progress = sys.stderr.isatty()
        if show_progress:
            from tqdm.auto import tqdm  # a widget in a notebook, a text bar on a terminal

            self.bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True)
        self.sinks = []
        try:
            for name in loggers:
                self.sinks.append(_open_logger(name, run_dir, project, config or {}))
        except BaseException:
            self.close()  # the loggers already started (a wandb run) and the bar end with the failed start
            raise
        # Kinds of record (their key sets) already on file for the step a resumed run starts from.
        self._resumed_step: int | None = None
        self._logged_at_resume: set[frozenset] = set()

    def start_at(self, step: int) -> None:
        """Resume: drop records after ``step`` (written after the checkpoint by the killed run) and move the bar.

        A record of ``step`` itself may also have been written after the checkpoint (the end-of-epoch evaluation
        follows the step's checkpoint); the resumed run writes it again, so a record of ``step`` whose kind is
        already on file is not written twice (see :meth:`log`). A last line cut short by the kill is dropped.
        """
        if self.path is not None and self.path.is_file():
            kept = []
            for record in _parse_lines(self.path):
                if record.get("step", 0) <= step:
                    kept.append(record)
            self.path.write_text("".join(json.dumps(record) + "\n" for record in kept))
            self._resumed_step = step
            self._logged_at_resume = {frozenset(r) for r in kept if r.get("step") == step}
        if self.bar is not None:
            self.bar.update(step)

    def log(self, record: dict) -> None:
        if record.get("step") == self._resumed_step and frozenset(record) in self._logged_at_resume:
            return  # already logged by the run that wrote the checkpoint (same weights, same values)
        if self.path is not None:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
        for sink in self.sinks:
            sink(record)
        if "loss" in record:
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
            elif self.echo is not None:
                self.echo(f"step {record['step']}/{self.total_steps} loss {record['loss']:.4f} "
                          f"lr {record['lr']:.2e} {record['tokens_per_s']:.0f} tok/s")
        else:  # an evaluation: always shown, above the bar on a terminal
            shown = ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k.startswith("val_"))
            if self.bar is not None:
                self.bar.write(f"step {record['step']}: {shown}", file=sys.stderr)
            elif self.echo is not None:
                self.echo(f"step {record['step']}: {shown}")

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        for sink in self.sinks:
            close = getattr(sink, "close", None)
            if close:
                close()


def _open_logger(name: str, run_dir: Path | None, project: str, config: dict):
    """A callable taking a record dict (and a ``close``); the run's ``config`` is logged as its hyperparameters.
    A missing package or a logger that cannot start is a one-line :class:`UserError`."""
    opener = _LOGGERS.get(name)
    if opener is None:
        raise UserError(f"log.loggers: unknown logger {name!r}")
    try:
        return opener(run_dir, project, config)
    except ImportError:
        raise UserError(f"log.loggers: {name} is not installed; pip install 'tuneforge[{name}]'") from None
    except UserError:
        raise
    except Exception as error:
        # A logger that cannot start (credentials, server, permissions) is the user's setup, not a tuneforge bug.
        detail = (str(error).strip().splitlines() or [""])[0]
        raise UserError(f"log.loggers: {name} failed to start: {type(error).__name__}: {detail}") from error


def flat_hparams(config: dict, prefix: str = "") -> dict:
    """``{"train": {"lr": 2e-4}}`` -> ``{"train.lr": 2e-4}``: the config as the flat scalars that TensorBoard's
    hparams and MLflow's params hold. Numbers, booleans and strings stay; lists and None become their text."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flat_hparams(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return flat


def _numbers(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}


def _tensorboard(run_dir: Path | None, project: str, config: dict):
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    writer = SummaryWriter(log_dir=str((run_dir or Path(".")) / "tensorboard"))
    # The config for the HParams dashboard, in the run's own event file (``add_hparams`` would open a second run
    # folder for it), with the losses as the metrics its table shows.
    experiment, session_start, _ = hparams(flat_hparams(config), {"loss": 0.0, "val_loss": 0.0})
    writer.file_writer.add_summary(experiment)
    writer.file_writer.add_summary(session_start)

    def write(record):
        for key, value in _numbers(record).items():
            writer.add_scalar(key, value, record["step"])
        writer.flush()

    write.close = writer.close
    return write


def _wandb(run_dir: Path | None, project: str, config: dict):
    import wandb

    run = wandb.init(project=project, name=run_dir.name if run_dir else None, config=config,
                     dir=str(run_dir) if run_dir else None)
    log = lambda record: run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])  # noqa: E731
    log.close = run.finish
    return log


def _mlflow(run_dir: Path | None, project: str, config: dict):
    import mlflow

    mlflow.set_experiment(project)
    mlflow.start_run(run_name=run_dir.name if run_dir else None)
    try:
        mlflow.log_params(flat_hparams(config))
    except BaseException:
        mlflow.end_run(status="FAILED")  # an active run left behind would refuse the retry's start_run
        raise
    log = lambda record: mlflow.log_metrics(_numbers(record), step=record["step"])  # noqa: E731
    log.close = mlflow.end_run
    return log


def _trackio(run_dir: Path | None, project: str, config: dict):
    import trackio

    # Local-first: a SQLite file per project under TRACKIO_DIR (default ~/.cache/huggingface/trackio);
    # `trackio show` opens the dashboard.
    run = trackio.init(project=project, name=run_dir.name if run_dir else None, config=config)
    log = lambda record: run.log(_numbers(record), step=record["step"])  # noqa: E731
    # trackio.finish ends the current run (this one) and clears it; run.finish alone would leave it current, to be
    # finished a second time at exit.
    log.close = trackio.finish
    return log


# log.loggers names -> the function that starts each (the names config.py and preflight.py know, too).
_LOGGERS = {"tensorboard": _tensorboard, "wandb": _wandb, "mlflow": _mlflow, "trackio": _trackio}


def _parse_lines(path: Path) -> list[dict]:
    """The records of a metrics file; an unreadable *last* line (a write cut short by a crash or a full disk)
    is skipped, an unreadable line elsewhere is an error."""
    lines = [(number, line) for number, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    records = []
    for index, (number, line) in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if index < len(lines) - 1:
                raise UserError(f"{path}, line {number}: not a JSON record; is it a tuneforge metrics.jsonl?") \
                    from None
    return records


def read_metrics(path: str | Path) -> list[dict]:
    return _parse_lines(Path(path))


class StepStats:
    """The named statistics of one optimiser step: each a (2,) float64 device tensor ``[sum, weight]`` added to
    by the loss terms of every micro-batch and update, and by the recipe (rollout statistics). Kept on the device:
    nothing is read back until a log step asks for :meth:`means`."""

    def __init__(self, device: torch.device):
        self.device = device
        self.entries: dict[str, torch.Tensor] = {}

    def reset(self) -> None:
        self.entries = {}

    def add(self, name: str, entry: torch.Tensor) -> None:
        entry = entry.detach().to(self.device, torch.float64)
        self.entries[name] = self.entries[name] + entry if name in self.entries else entry

    def add_all(self, stats: dict[str, torch.Tensor]) -> None:
        for name, entry in stats.items():
            self.add(name, entry)

    def means(self, distributed: bool) -> dict[str, float]:
        """sum / weight of each statistic over all ranks (one all-reduce, one host read); a statistic whose weight
        is 0 everywhere is left out. Every rank must call it (with the same names: the recipe adds the same ones
        on every rank)."""
        return totals_to_means(self.totals(distributed))

    def totals(self, distributed: bool) -> dict[str, tuple[float, float]]:
        """(sum, weight) of each statistic over all ranks."""
        names = sorted(self.entries)
        if not names:
            return {}
        stacked = torch.stack([self.entries[name] for name in names])
        if distributed:
            import torch.distributed as dist

            dist.all_reduce(stacked)
        return {name: (total, weight) for name, (total, weight) in zip(names, stacked.tolist())}


def totals_to_means(totals: dict[str, tuple[float, float]]) -> dict[str, float]:
    return {name: total / weight for name, (total, weight) in totals.items() if weight != 0}
