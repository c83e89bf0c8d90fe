"""Rows of a Hub dataset (``org/name``) or of a local folder laid out like a Hub dataset repo, through
``datasets.load_dataset``.

Offline behaviour: when the hub does not answer within ``HUB_TIMEOUT_S`` (or ``HF_HUB_OFFLINE`` is set), the
dataset is loaded from the local ``datasets`` cache (``HF_DATASETS_CACHE``, under ``HF_HOME``) in offline mode, so
nobody has to set offline mode by hand; a dataset that is not cached fails at once with one line naming the id.
Row numbers are the dataset's row indices (0-based), the numbers ``dataset[i]`` looks a row up by.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from pathlib import Path

from tuneforge.data.sources import DataSource
from tuneforge.errors import UserError

DEFAULT_SPLIT = "train"


def is_saved_dataset(folder: Path) -> bool:
    """Whether ``folder`` was written by ``datasets.save_to_disk`` (a Dataset or a DatasetDict)."""
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def load_hub_records(source: DataSource) -> list[dict]:
    """The records of ``source``: a Hub dataset id or a Hub-like local folder, at ``source.split`` (default
    ``train``), with its ``subset``, ``revision`` and ``data_files``. Raises :class:`UserError` (one line) for an id
    neither cached nor reachable, an unknown split or subset, or files ``datasets`` cannot read."""
    datasets = _datasets(source)
    path = str(source.path)
    local = Path(path).is_dir()
    kwargs = {"name": source.subset, "split": source.split or DEFAULT_SPLIT, "data_files": source.data_files}
    if source.revision and not local:
        kwargs["revision"] = source.revision
    kwargs = {key: value for key, value in kwargs.items() if value is not None}
    offline = not local and not hub_answers()
    try:
        with _quiet(datasets), _offline(datasets, offline):
            loaded = datasets.load_dataset(path, **kwargs)
    except (ConnectionError, FileNotFoundError) as error:
        if offline:
            raise UserError(f"{source.label}: Hub dataset {path!r} is neither in the local Hugging Face cache "
                            f"({datasets.config.HF_DATASETS_CACHE}) nor reachable (the hub did not answer); load it "
                            "once where the hub is reachable, or pass a local file") from None
        if local:
            raise UserError(f"{source.label}: a folder must be saved by datasets.save_to_disk or laid out like a Hub "
                            f"dataset repo (data files such as data/train-*.parquet or *.jsonl): "
                            f"{_first_line(error)}") from None
        raise UserError(f"{source.label}: cannot load {path!r}: {_first_line(error)}") from None
    except ValueError as error:  # an unknown split or subset, a data_files glob that matches nothing
        raise UserError(f"{source.label}: {_first_line(error)}") from None
    except Exception as error:  # anything datasets raises for a repo it cannot read (DatasetGenerationError...)
        if type(error).__module__.split(".")[0] not in ("datasets", "huggingface_hub", "pyarrow", "fsspec"):
            raise
        raise UserError(f"{source.label}: cannot load {path!r} ({type(error).__name__}: "
                        f"{_first_line(error)})") from None
    if isinstance(loaded, datasets.DatasetDict):  # only when no split was asked for, which never happens here
        loaded = loaded[DEFAULT_SPLIT]
    return [dict(record) for record in loaded]


def load_saved_records(source: DataSource) -> list[dict]:
    """The records of a folder saved by ``datasets.save_to_disk``: a Dataset, or the ``split`` (default ``train``)
    of a DatasetDict."""
    datasets = _datasets(source)
    path = Path(str(source.path))
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        split = source.split or DEFAULT_SPLIT
        if split not in loaded:
            raise UserError(f"{source.label}: the saved DatasetDict has no {split!r} split (it has {list(loaded)}); "
                            "set split: NAME")
        loaded = loaded[split]
    elif source.split:
        raise UserError(f"{source.label}: split={source.split!r}, but {path} holds one saved Dataset, not a "
                        "DatasetDict; remove split")
    return [dict(record) for record in loaded]


@functools.lru_cache(maxsize=1)
def hub_answers() -> bool:
    """Whether the hub answers (``tuneforge.models.loading.hub_reachable``), asked once a process: a run that reads
    several Hub sources waits for an unreachable hub once."""
    from tuneforge.models.loading import hub_reachable

    return hub_reachable()


def _datasets(source: DataSource):
    try:
        import datasets
    except ImportError:
        raise UserError(f"{source.label}: reading a Hub dataset or a dataset folder needs `datasets`: "
                        "pip install 'tuneforge[datasets]'") from None
    return datasets


@contextlib.contextmanager
def _offline(datasets, offline: bool) -> Iterator[None]:
    """Offline mode of ``datasets`` and ``huggingface_hub`` for one load: both read their flag from module
    constants taken from the environment at import, so setting the variable now would change nothing."""
    if not offline:
        yield
        return
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


@contextlib.contextmanager
def _quiet(datasets) -> Iterator[None]:
    """No progress bars and no "using the latest cached version" warnings while tuneforge reads a dataset: the data
    report says what was read."""
    logger = logging.getLogger("datasets")
    level, bars = logger.level, not datasets.are_progress_bars_disabled()
    logger.setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        logger.setLevel(level)
        if bars:
            datasets.enable_progress_bars()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
