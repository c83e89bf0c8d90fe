"""Checks a training run passes before it locks or creates its run directory and before any data or model loads.

What fails late otherwise: a logger whose package is missing or whose credentials are not set (wandb without an
API key raises a ``UsageError`` from ``wandb.init``, at the first step), an MLflow tracking store the installed
mlflow cannot open (a database without SQLAlchemy, as with ``mlflow-skinny``; a file store that mlflow >= 3.13
refuses), or an output directory that cannot be created. Each check only looks (``importlib.util.find_spec``,
package metadata, files and environment variables): no logger package is imported here. The template and the
reward / metric functions are checked elsewhere, also before any model loads: ``data.template`` when the config
is validated, functions when the recipe imports them.
"""

from __future__ import annotations

import configparser
import importlib.metadata
import importlib.util
import netrc
import os
from pathlib import Path
from urllib.parse import urlparse

from tuneforge.config import RunConfig
from tuneforge.errors import UserError

# The package each logger of ``log.loggers`` imports (``torch.utils.tensorboard`` needs ``tensorboard``).
LOGGER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}
# WANDB_MODE values with which wandb needs no API key.
WANDB_KEYLESS_MODES = ("offline", "disabled", "dryrun")
WANDB_DEFAULT_HOST = "https://api.wandb.ai"
# MLflow's tracking store when MLFLOW_TRACKING_URI is unset: ./mlruns (files) before 3.7, a SQLite file since.
MLFLOW_SQLITE_DEFAULT_SINCE = (3, 7)
MLFLOW_DEFAULT_URIS = ("./mlruns", "sqlite:///mlflow.db")
# Since 3.13 mlflow raises for a file store unless MLFLOW_ALLOW_FILE_STORE is true.
MLFLOW_FILE_STORE_REFUSED_SINCE = (3, 13)
# URI schemes of the stores mlflow opens through SQLAlchemy.
MLFLOW_DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")


def check_before_run(config: RunConfig, writes_run_dir: bool = True) -> None:
    """Raise a one-line :class:`UserError` for anything that would make this run fail after it started
    (``writes_run_dir``: the run will write ``train.output_dir``, so it must be a folder or creatable)."""
    if writes_run_dir:
        check_output_dir(config.train.output_dir)
    for name in config.log.loggers:
        check_logger(name)


def check_output_dir(output_dir: str | Path) -> None:
    """``train.output_dir`` is a folder, or can be made one: its nearest existing ancestor is a writable folder."""
    path = Path(output_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"train.output_dir: {path} is a file, not a folder; choose another train.output_dir")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"train.output_dir: {path} cannot be created, {existing} is a file; choose another "
                        "train.output_dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"train.output_dir: {existing} is not writable; choose another train.output_dir or fix its "
                        "permissions")


def check_logger(name: str) -> None:
    package = LOGGER_PACKAGES.get(name)
    if package is None:
        raise UserError(f"log.loggers: unknown logger {name!r}; use any of {', '.join(LOGGER_PACKAGES)}")
    if importlib.util.find_spec(package) is None:
        raise UserError(f"log.loggers: {name} is not installed; pip install 'tuneforge[{name}]' (or drop {name} from "
                        "log.loggers)")
    if name == "wandb" and not wandb_can_log():
        raise UserError("log.loggers: wandb has no API key and is not in offline mode; set WANDB_API_KEY, run "
                        "`wandb login`, or set WANDB_MODE=offline (or drop wandb from log.loggers)")
    if name == "mlflow":
        check_mlflow_store()


def check_mlflow_store(env: dict | None = None) -> None:
    """The tracking store mlflow will open (``MLFLOW_TRACKING_URI``, else the installed version's default) is one
    it can: a database needs SQLAlchemy (full ``mlflow`` has it, ``mlflow-skinny`` not), and mlflow >= 3.13
    refuses a file store unless ``MLFLOW_ALLOW_FILE_STORE`` is true. A server (``http://``) is not contacted."""
    env = os.environ if env is None else env
    version = _mlflow_version()
    # Like mlflow, the default stays ./mlruns where that folder already holds experiments.
    sqlite_default = version >= MLFLOW_SQLITE_DEFAULT_SINCE and not any(Path("mlruns").glob("[0-9]*/meta.yaml"))
    uri = env.get("MLFLOW_TRACKING_URI") or MLFLOW_DEFAULT_URIS[sqlite_default]
    scheme = urlparse(uri).scheme.split("+")[0]  # postgresql+psycopg2://...
    where = f"MLFLOW_TRACKING_URI={uri}" if env.get("MLFLOW_TRACKING_URI") else f"the default tracking store {uri}"
    if scheme in MLFLOW_DATABASE_SCHEMES and importlib.util.find_spec("sqlalchemy") is None:
        raise UserError(f"log.loggers: mlflow cannot open {where}: a database store needs SQLAlchemy, which "
                        "mlflow-skinny lacks; pip install 'tuneforge[mlflow]' (full mlflow), or set "
                        "MLFLOW_TRACKING_URI to a tracking server (http://...)")
    refused = (scheme in ("", "file") and version >= MLFLOW_FILE_STORE_REFUSED_SINCE
               and env.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("true", "1"))
    if refused:
        raise UserError(f"log.loggers: mlflow {'.'.join(map(str, version))} refuses the file store of {where}; set "
                        "MLFLOW_TRACKING_URI=sqlite:///mlflow.db (or a tracking server), or "
                        "MLFLOW_ALLOW_FILE_STORE=true")


def _mlflow_version() -> tuple[int, ...]:
    """(major, minor) of the installed mlflow or mlflow-skinny (both provide the ``mlflow`` package); (0, 0) when
    neither distribution is found (mlflow on the path by other means: assume the oldest defaults)."""
    for distribution in ("mlflow", "mlflow-skinny"):
        try:
            text = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
        parts = [int(part) if part.isdigit() else 0 for part in text.split(".")[:2]]
        return tuple(parts + [0] * (2 - len(parts)))
    return (0, 0)


def wandb_can_log(env: dict | None = None) -> bool:
    """Whether ``wandb.init`` will start without asking for a key: ``WANDB_MODE`` offline / disabled / dryrun (in
    the environment or a wandb settings file, as ``wandb offline`` writes it), ``WANDB_API_KEY``, or a netrc
    entry for the wandb host (what ``wandb login`` writes)."""
    env = os.environ if env is None else env
    if env.get("WANDB_MODE", "").lower() in WANDB_KEYLESS_MODES or env.get("WANDB_API_KEY"):
        return True
    if env.get("WANDB_DISABLED", "").lower() in ("true", "1", "yes"):
        return True
    if _wandb_settings_mode(env) in WANDB_KEYLESS_MODES:
        return True
    host = urlparse(env.get("WANDB_BASE_URL") or WANDB_DEFAULT_HOST).hostname
    netrc_file = env.get("NETRC") or str(Path("~/.netrc").expanduser())
    try:
        entry = netrc.netrc(netrc_file).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def _wandb_settings_mode(env) -> str:
    """``mode`` of the workspace (``./wandb/settings``) or global wandb settings file, "" when none sets it."""
    config_dir = env.get("WANDB_CONFIG_DIR") or str(Path("~/.config/wandb").expanduser())
    for path in (Path("wandb") / "settings", Path(config_dir) / "settings"):
        parser = configparser.ConfigParser()
        try:
            parser.read(path)
        except configparser.Error:
            continue
        mode = parser.get("default", "mode", fallback="")
        if mode:
            return mode.lower()
    return ""
