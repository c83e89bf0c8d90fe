"""The rest of the engine around the loop: metrics.jsonl on resume, the curves plot and the ``plot`` verb, signal
handling, extra loggers."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import yaml

from tuneforge.cli import main as cli_main
from tuneforge.engine.metrics import MetricsLog, read_metrics
from tuneforge.engine.plots import plot_runs
from tuneforge.engine.signals import EXIT_CODES, StopRequest
from tuneforge.errors import ConfigError, UserError
from tuneforge.engine.trainer import run_training

PNG_HEADER = b"\x89PNG\r\n\x1a\n"


def quiet(_message):
    pass


def train_record(step: int, loss: float) -> dict:
    return {"step": step, "epoch": 0, "loss": loss, "lr": 1e-3 * step, "grad_norm": 1.0, "tokens": 100 * step,
            "tokens_per_s": 10.0, "elapsed_s": float(step)}


def write_metrics(path: Path, records: list[dict], tail: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return path


# ----------------------------------------------------------------------------------------- metrics on resume
def test_start_at_drops_records_written_after_the_checkpoint_and_a_torn_last_line(tmp_path):
    records = [train_record(s, 5.0 - s) for s in (1, 2, 3, 4)] + [{"step": 4, "val_loss": 2.0}]
    path = write_metrics(tmp_path / "metrics.jsonl", records, tail='{"step": 5, "loss": 0.')  # killed mid-write
    log = MetricsLog(path, total_steps=6, show_progress=False)
    log.start_at(2)
    assert read_metrics(path) == records[:2]
    log.log(train_record(3, 9.0))
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    assert read_metrics(path)[-1]["loss"] == 9.0


def test_a_record_of_the_resume_step_is_not_written_twice(tmp_path):
    # The killed run logged step 3, saved its checkpoint, then logged the end-of-epoch validation of step 3; the
    # resumed run (from step 3) evaluates again and must not add a second validation record for step 3.
    evaluation = {"step": 3, "val_loss": 2.0, "val_perplexity": 7.39}
    path = write_metrics(tmp_path / "metrics.jsonl", [train_record(3, 1.0), evaluation, train_record(4, 0.9)])
    log = MetricsLog(path, total_steps=6, show_progress=False)
    log.start_at(3)
    log.log(dict(evaluation))
    log.log(train_record(4, 0.8))
    log.log({"step": 4, "val_loss": 1.9, "val_perplexity": 6.7})
    steps = [(r["step"], "loss" in r) for r in read_metrics(path)]
    assert steps == [(3, True), (3, False), (4, True), (4, False)]
    assert read_metrics(path)[2]["loss"] == 0.8


def test_a_fresh_log_writes_every_record(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path, total_steps=2, show_progress=False)
    log.start_at(0)
    for record in (train_record(1, 1.0), {"step": 1, "val_loss": 2.0}, {"step": 1, "val_loss": 2.0}):
        log.log(record)
    assert len(read_metrics(path)) == 3


def test_a_corrupt_line_inside_metrics_is_a_user_error(tmp_path):
    path = write_metrics(tmp_path / "metrics.jsonl", [train_record(1, 1.0)], tail="not json\n" + json.dumps(
        train_record(2, 1.0)) + "\n")
    with pytest.raises(UserError, match="line 2"):
        read_metrics(path)


def test_echo_without_progress_bar(tmp_path):
    lines = []
    log = MetricsLog(None, total_steps=5, show_progress=False, echo=lines.append)
    log.log(train_record(2, 1.23456))
    log.log({"step": 2, "val_loss": 2.5, "val_perplexity": 12.18})
    assert lines[0].startswith("step 2/5 loss 1.2346 lr 2.00e-03")
    assert lines[1] == "step 2: val_loss 2.5000, val_perplexity 12.1800"


# ------------------------------------------------------------------------------------------------------ plots
def fake_run(path: Path, offset: float, validation: bool = True) -> Path:
    records = []
    for step in range(1, 21):
        records.append(train_record(step, 4.0 - offset - step * 0.1))
        if validation and step % 5 == 0:
            records.append({"step": step, "val_loss": 4.2 - offset - step * 0.08, "val_perplexity": 1.0})
    write_metrics(path / "metrics.jsonl", records)
    return path


def assert_png(path: Path, min_size: int = 10_000) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_HEADER)
    assert len(data) > min_size


def test_plot_verb_draws_several_runs_in_one_png(tmp_path, capsys):
    first, second = fake_run(tmp_path / "run-a", 0.0), fake_run(tmp_path / "run-b", 0.5, validation=False)
    out = tmp_path / "figures" / "compare.png"  # the folder does not exist yet
    assert cli_main(["plot", str(first), str(second), "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert_png(out)


def test_plot_of_a_folder_without_metrics_is_a_clear_error(tmp_path, capsys):
    run = fake_run(tmp_path / "run", 0.0)
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out.png"
    assert cli_main(["plot", str(run), str(tmp_path / "empty"), "--out", str(out)]) == 2
    assert "has no metrics.jsonl" in capsys.readouterr().err
    assert not out.exists()


def test_runs_with_the_same_folder_name_get_distinct_labels(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    labels = []
    real_legend = Axes.legend

    def legend(self, *args, **kwargs):
        labels.extend(self.get_legend_handles_labels()[1])
        return real_legend(self, *args, **kwargs)

    monkeypatch.setattr(Axes, "legend", legend)
    runs = [fake_run(tmp_path / name / "sft", 0.1 * i) for i, name in enumerate(("a", "b"))]
    plot_runs(runs, tmp_path / "out.png")
    assert len(set(labels)) == 4  # train and validation of each run


def test_a_single_run_with_only_training_records_plots(tmp_path):
    run = fake_run(tmp_path / "run", 0.0, validation=False)
    assert_png(plot_runs([run], tmp_path / "curves.png"))


# ---------------------------------------------------------------------------------------------------- signals
def test_stop_request_records_the_first_signal_and_interrupts_on_the_second():
    before = {number: signal.getsignal(number) for number in StopRequest.SIGNALS}
    with StopRequest() as stop:
        assert stop.requested is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
    assert {number: signal.getsignal(number) for number in StopRequest.SIGNALS} == before
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested == "SIGINT"
    assert {number: signal.getsignal(number) for number in StopRequest.SIGNALS} == before
    assert EXIT_CODES == {"SIGINT": 128 + signal.SIGINT, "SIGTERM": 128 + signal.SIGTERM}


def test_stop_request_outside_the_main_thread_installs_nothing():
    import threading

    before = signal.getsignal(signal.SIGTERM)
    seen = {}

    def body():
        with StopRequest() as stop:
            seen["handler"] = signal.getsignal(signal.SIGTERM)
            seen["requested"] = stop.requested

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert seen == {"handler": before, "requested": None}


# ---------------------------------------------------------------------------------------------------- loggers
def test_tensorboard_logger_writes_events_under_the_run_directory(make_config, qa_file, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = make_config(qa_file, train={"max_steps": 3}, data={"val_fraction": 0.25},
                         log={"loggers": ["tensorboard"]})
    run_training(config, log=quiet)
    folder = tmp_path / "run" / "tensorboard"
    events = list(folder.glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0
    accumulator = EventAccumulator(str(folder))
    accumulator.Reload()
    assert [e.step for e in accumulator.Scalars("loss")] == [1, 2, 3]
    assert [e.step for e in accumulator.Scalars("val_loss")] == [3]
    logged = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert [e.value for e in accumulator.Scalars("loss")] == pytest.approx(logged, rel=1e-6)


def test_unknown_logger_fails_at_config_time(make_config, qa_file, tmp_path, capsys):
    with pytest.raises(ConfigError, match="log.loggers: unknown logger 'tensorbord'"):
        make_config(qa_file, log={"loggers": ["tensorbord"]})
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"data": {"train": str(qa_file)}, "train": {"output_dir": str(tmp_path / "run")},
                                      "log": {"loggers": ["comet"]}}))
    assert cli_main(["train", str(config)]) == 2
    assert "unknown logger 'comet'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_move_takes_every_tensor_of_a_batch_and_keeps_its_counts():
    """``engine.step.move`` (the one mover for all batch kinds): nested batches and optional tensors move, counts
    (including the global ones a batch was given) stay. The meta device stands in for a GPU."""
    import torch

    from tuneforge.data.preference import PairExample, collate_pairs
    from tuneforge.data.tokenize import Example
    from tuneforge.engine.step import move
    from tuneforge.losses import IGNORE_INDEX

    pair = PairExample(Example([1, 2, 3], [IGNORE_INDEX, 2, 3]), Example([1, 2, 4, 5], [IGNORE_INDEX, 2, 4, 5]), 1,
                       ref_chosen=-1.0, ref_rejected=-2.0)
    batch = collate_pairs([pair], pad_id=0)
    batch.global_pairs, batch.sequences.global_tokens = 8, 99
    moved = move(batch, torch.device("meta"))
    assert moved.sequences.input_ids.device.type == "meta" and moved.ref_chosen.device.type == "meta"
    assert moved.weights.device.type == "meta" and moved.margins is None
    assert (moved.global_pairs, moved.sequences.global_tokens, moved.chosen_tokens) == (8, 99, 2)
    assert move(batch, torch.device("cpu")) is batch
