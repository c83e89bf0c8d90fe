"""Each optional logger, read back offline with its own reader: a tiny run's losses must be the ones in
metrics.jsonl and its config must be there as hyperparameters. Missing packages and a store mlflow cannot open
are caught before any model loads."""

from __future__ import annotations

import importlib.util
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import QA_ROWS, write_jsonl
from test_engine_preflight import pretend_installed as pretend
from tuneforge.cli import main as cli_main
from tuneforge.config import config_from_dict
from tuneforge.engine import build, preflight
from tuneforge.engine.metrics import MetricsLog, flat_hparams, read_metrics
from tuneforge.errors import UserError
from tuneforge.engine.trainer import run_training

STEPS = 3
LR = 1e-3
LORA_R = 4
# In the dev extra, so tested for real; mlflow and trackio are tested where installed (also in the dev extra).
REQUIRED = ("tensorboard", "wandb")
OPTIONAL = ("mlflow", "trackio")


def quiet(_message):
    pass


@dataclass
class LoggedRun:
    run_dir: Path
    losses: list[float]  # metrics.jsonl's, steps 1..STEPS
    val_loss: float  # metrics.jsonl's last
    loggers: list[str]
    store: Path  # where mlflow and trackio wrote (tmp)


@pytest.fixture(scope="module")
def logged(tiny_model_dir, tmp_path_factory):
    """One 3-step run (with a validation split) logging to every logger installed, each writing offline into tmp:
    wandb in offline mode, mlflow to a file store, trackio to its SQLite store under TRACKIO_DIR."""
    root = tmp_path_factory.mktemp("loggers")
    loggers = [*REQUIRED, *(name for name in OPTIONAL if importlib.util.find_spec(name) is not None)]
    with pytest.MonkeyPatch.context() as patch:
        for name, value in (("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"), ("WANDB_DIR", root / "wandb"),
                            ("WANDB_CONFIG_DIR", root / "wandb-config"), ("WANDB_CACHE_DIR", root / "wandb-cache"),
                            ("WANDB_DATA_DIR", root / "wandb-data"),
                            # The file store needs no SQLAlchemy (mlflow-skinny); mlflow >= 3.13 opens it if allowed.
                            ("MLFLOW_TRACKING_URI", (root / "mlruns").as_uri()), ("MLFLOW_ALLOW_FILE_STORE", "true"),
                            ("TRACKIO_DIR", root / "trackio")):  # read once, when trackio is imported
            patch.setenv(name, str(value))
        config = config_from_dict({
            "model": {"name_or_path": str(tiny_model_dir)},
            "data": {"train": str(write_jsonl(root / "qa.jsonl", QA_ROWS)), "max_length": 128, "val_fraction": 0.25},
            "lora": {"r": LORA_R, "alpha": 8, "dropout": 0.0},
            "train": {"output_dir": str(root / "run"), "max_steps": STEPS, "batch_size": 4, "lr": LR, "seed": 0,
                      "mixed_precision": "no"},
            "log": {"loggers": loggers}})
        preflight.check_before_run(config)  # what `tuneforge train` checks first passes in this setup
        run_training(config, log=quiet)
    records = read_metrics(root / "run" / "metrics.jsonl")
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == STEPS
    return LoggedRun(root / "run", losses, [r["val_loss"] for r in records if "val_loss" in r][-1], loggers, root)


def needs(logged: LoggedRun, name: str) -> None:
    if name in REQUIRED:
        assert importlib.util.find_spec(name), f"{name} is in the dev extra: pip install -e '.[dev]'"
    elif name not in logged.loggers:
        pytest.skip(f"{name} is not installed (pip install 'tuneforge[{name}]')")


def test_flat_hparams_are_dotted_scalars():
    assert flat_hparams({"train": {"lr": 2e-4, "betas": [0.9, 0.99], "max_steps": None}, "method": "sft",
                         "lora": {"enabled": True}}) == {
        "train.lr": 2e-4, "train.betas": "[0.9, 0.99]", "train.max_steps": "None", "method": "sft",
        "lora.enabled": True}


def test_tensorboard_holds_the_losses_and_the_config_as_hparams(logged):
    needs(logged, "tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    folder = logged.run_dir / "tensorboard"
    accumulator = EventAccumulator(str(folder))
    accumulator.Reload()
    assert [e.step for e in accumulator.Scalars("loss")] == [1, 2, 3]
    assert [e.value for e in accumulator.Scalars("loss")] == pytest.approx(logged.losses, rel=1e-6)  # float32
    assert [e.value for e in accumulator.Scalars("val_loss")] == pytest.approx([logged.val_loss], rel=1e-6)
    contents = accumulator.PluginTagToContent("hparams").values()
    (start,) = [s for s in (plugin_data_pb2.HParamsPluginData.FromString(c).session_start_info for c in contents)
                if s.hparams]
    assert start.hparams["train.lr"].number_value == pytest.approx(LR)
    assert start.hparams["lora.r"].number_value == LORA_R
    assert start.hparams["method"].string_value == "sft"
    assert not list(folder.glob("*/events.*"))  # one run folder, not a second one for the hparams


def wandb_records(path: Path):
    """The records of a ``.wandb`` transaction log: wandb's own protobuf ``Record``s, framed as a LevelDB log
    (a 7-byte ``:W&B`` header, then 32 KiB blocks of chunks: crc32 (4), length (2), type (1) and the bytes)."""
    from wandb.proto import wandb_internal_pb2

    block, full, last = 32768, 1, 4
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, pending = 7, b""
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:  # a block's tail too short for a chunk header is zero padding
            position += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position:position + 7])
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (full, last):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_wandb_offline_run_holds_the_losses_and_the_config(logged):
    needs(logged, "wandb")
    (log,) = logged.run_dir.glob("wandb/offline-run-*/run-*.wandb")
    history, config, names = {}, {}, set()
    for record in wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history.setdefault(row["_step"], {}).update(row)
        elif kind == "run":
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
            names.add(record.run.display_name)
    assert [history[step]["loss"] for step in range(1, STEPS + 1)] == pytest.approx(logged.losses, rel=1e-12)
    assert history[STEPS]["val_loss"] == pytest.approx(logged.val_loss, rel=1e-12)
    assert config["train"]["lr"] == pytest.approx(LR) and config["lora"]["r"] == LORA_R
    assert config["method"] == "sft" and names == {"run"}  # named after the run directory


def test_mlflow_file_store_holds_the_losses_and_the_config_as_params(logged):
    needs(logged, "mlflow")
    from mlflow.tracking import MlflowClient

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        client = MlflowClient((logged.store / "mlruns").as_uri())
        experiment = client.get_experiment_by_name("tuneforge")
        (run,) = client.search_runs([experiment.experiment_id])
        history = client.get_metric_history(run.info.run_id, "loss")
        validation = client.get_metric_history(run.info.run_id, "val_loss")
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert [m.step for m in history] == [1, 2, 3]
    assert [m.value for m in history] == pytest.approx(logged.losses, rel=1e-12)
    assert [m.value for m in validation] == pytest.approx([logged.val_loss], rel=1e-12)
    assert float(run.data.params["train.lr"]) == pytest.approx(LR)
    assert run.data.params["lora.r"] == str(LORA_R) and run.data.params["method"] == "sft"


def test_trackio_local_store_holds_the_losses_and_the_config(logged):
    needs(logged, "trackio")
    import trackio.context_vars
    import trackio.utils
    from trackio.api import Api
    from trackio.sqlite_storage import SQLiteStorage

    if trackio.utils.TRACKIO_DIR != logged.store / "trackio":
        pytest.fail(f"trackio was imported before the run, with TRACKIO_DIR {trackio.utils.TRACKIO_DIR}")
    assert (logged.store / "trackio" / "tuneforge.db").is_file()
    (run,) = list(Api().runs("tuneforge"))
    logs = SQLiteStorage.get_logs("tuneforge", run.name, run_id=run.id)
    assert [r["step"] for r in logs if "loss" in r] == [1, 2, 3]
    assert [r["loss"] for r in logs if "loss" in r] == pytest.approx(logged.losses, rel=1e-12)
    assert [r["val_loss"] for r in logs if "val_loss" in r] == pytest.approx([logged.val_loss], rel=1e-12)
    assert run.name == "run"
    assert run.config["train"]["lr"] == pytest.approx(LR) and run.config["lora"]["r"] == LORA_R
    assert trackio.context_vars.current_run.get() is None  # finished and cleared: not finished again at exit


def test_an_mlflow_run_whose_start_fails_is_ended(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")

    def refuse(params):
        raise RuntimeError("params refused")

    monkeypatch.setattr(mlflow, "log_params", refuse)
    with pytest.raises(UserError, match="^log.loggers: mlflow failed to start: RuntimeError: params refused$"):
        MetricsLog(None, 1, show_progress=False, loggers=["mlflow"], run_dir=tmp_path / "run",
                   config={"train": {"lr": LR}})
    assert mlflow.active_run() is None  # else the retry's start_run would be refused
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.status == "FAILED"


# ------------------------------------------------------------------------------------- checked before the run
@pytest.mark.parametrize("logger", ["tensorboard", "wandb", "mlflow", "trackio"])
def test_a_missing_logger_package_is_one_line_before_the_model_loads(logger, tmp_path, qa_file, tiny_model_dir,
                                                                     monkeypatch, capsys):
    monkeypatch.setattr(build, "load_model", lambda *a, **k: pytest.fail("a model was loaded before the check"))
    pretend(monkeypatch, missing={logger})
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"model": {"name_or_path": str(tiny_model_dir)}, "data": {"train": str(qa_file)},
                                  "train": {"output_dir": str(tmp_path / "run"), "max_steps": 1}}))
    assert cli_main(["train", str(config), f"log.loggers=[{logger}]"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"error: log.loggers: {logger} is not installed; pip install 'tuneforge[{logger}]' (or drop "
                     f"{logger} from log.loggers)"]
    assert not (tmp_path / "run").exists()


def test_mlflow_database_store_without_sqlalchemy_is_caught(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    pretend(monkeypatch, missing={"sqlalchemy"})
    monkeypatch.setattr(preflight, "_mlflow_version", lambda: (3, 17))
    with pytest.raises(UserError) as error:
        preflight.check_mlflow_store({})  # unset: mlflow >= 3.7 opens sqlite:///mlflow.db
    assert str(error.value) == (
        "log.loggers: mlflow cannot open the default tracking store sqlite:///mlflow.db: a database store needs "
        "SQLAlchemy, which mlflow-skinny lacks; pip install 'tuneforge[mlflow]' (full mlflow), or set "
        "MLFLOW_TRACKING_URI to a tracking server (http://...)")
    with pytest.raises(UserError, match="MLFLOW_TRACKING_URI=postgresql://db/x: a database store"):
        preflight.check_mlflow_store({"MLFLOW_TRACKING_URI": "postgresql://db/x"})
    preflight.check_mlflow_store({"MLFLOW_TRACKING_URI": "http://mlflow.example.org"})  # a server: not contacted
    pretend(monkeypatch, installed={"sqlalchemy"})
    preflight.check_mlflow_store({})


def test_mlflow_file_store_refused_by_new_mlflow_is_caught(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(preflight, "_mlflow_version", lambda: (3, 17))
    with pytest.raises(UserError, match=r"^log.loggers: mlflow 3.17 refuses the file store of "
                                        r"MLFLOW_TRACKING_URI=file:/x/mlruns; set MLFLOW_TRACKING_URI=sqlite:"):
        preflight.check_mlflow_store({"MLFLOW_TRACKING_URI": "file:/x/mlruns"})
    preflight.check_mlflow_store({"MLFLOW_TRACKING_URI": "file:/x/mlruns", "MLFLOW_ALLOW_FILE_STORE": "true"})
    (tmp_path / "mlruns" / "0").mkdir(parents=True)
    (tmp_path / "mlruns" / "0" / "meta.yaml").write_text("name: Default\n")
    with pytest.raises(UserError, match="refuses the file store of the default tracking store ./mlruns"):
        preflight.check_mlflow_store({})  # existing experiments keep mlflow on ./mlruns
    monkeypatch.setattr(preflight, "_mlflow_version", lambda: (2, 10))
    preflight.check_mlflow_store({"MLFLOW_TRACKING_URI": "file:/x/mlruns"})  # older mlflow opens it
